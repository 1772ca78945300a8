"""The SDK: call inference on a Tandem hub without caring where it runs.

    from tandem import Client, Budget
    client = Client("127.0.0.1:50051", api_key="tdk_…")
    result = client.generate("Why is the sky blue?", max_tokens=64, budget=Budget(ttft_ms=500))
    print(result.text, result.placement, result.ttft_ms)
    for chunk in client.generate("Tell me a story", stream=True):
        print(chunk.text, end="")

`AsyncClient` has the same methods as coroutines / async iterators. Every call has a deadline
(`timeout`, seconds). Failures raise the typed errors of `tandem.errors`. Pass `tls_ca` (the
deployment's ca.pem from `tandem hub init`) to talk TLS to a hub serving it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from tandem.errors import InvalidRequest, from_rpc_error
from tandem.types import (
    MAX_EXPERTS,
    Budget,
    Choice,
    Chunk,
    EnrollmentToken,
    ExpertWeight,
    GenerateResult,
    Placement,
    TokenLogprob,
)
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tandem.wire import sampling_message

Prompt = str | Sequence[Mapping[str, str]]
MAX_SKIP_RATIO = 0.75
"""The largest share of layers a request may skip: models.sampling.MAX_SKIP_RATIO, which the SDK
cannot import (it knows only its protocol); tests/test_skip_wire.py holds the two equal."""
KV_DEPTHS = (0.25, 0.5, 0.75)
"""The auxiliary depths KV prediction serves: models.sampling.KV_DEPTHS (tests/test_kvpred_wire.py
holds the two equal)."""


def build_request(
    prompt: Prompt,
    *,
    model: str = "",
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    budget: Budget | None = None,
    request_id: str = "",
    device: str = "",
    n: int = 1,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    skip_ratio: float = 0.0,
    lossless: bool = False,
    kv_prediction: float = 0.0,
    kv_repair: bool = False,
) -> pb.GenerateRequest:
    """The wire request; raises InvalidRequest for what can be caught before sending. n: choices for
    the prompt; logprobs=k: each token's log-probability and the k most likely tokens' (k <= 20);
    prompt_logprobs=k: the same for the prompt's tokens; skip_ratio: the share of layers decode skips
    (early layer skipping, on devices whose model has trained routers; 0 = every layer); lossless:
    with skip_ratio, the skipping model only drafts and the whole model verifies every token, so the
    answer is the whole model's; kv_prediction: KV prediction at this auxiliary depth (0.25, 0.5 or
    0.75 of the layers prefill the prompt, on devices whose model has trained predictors; 0 = off);
    kv_repair: with kv_prediction, the whole model recomputes the true cache between decode steps.
    budget.quality_floor lets the hub turn KV prediction on by itself (Budget)."""
    if isinstance(prompt, str):
        inp = pb.Input(prompt=prompt)
    elif isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
        msgs = [pb.ChatMessage(role=str(m.get("role", "")), content=str(m.get("content", ""))) for m in prompt]
        inp = pb.Input(chat=pb.ChatMessages(messages=msgs))
    else:
        raise InvalidRequest("prompt must be a string or a list of {'role', 'content'} messages", "INVALID_ARGUMENT")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be a positive integer, got {max_tokens!r}", "INVALID_ARGUMENT")
    _check_skipping(skip_ratio, lossless)
    _check_kv(kv_prediction, kv_repair, skip_ratio)
    b = budget or Budget()
    _check_quality_floor(b.quality_floor)
    if not isinstance(b.experts, int) or isinstance(b.experts, bool) or not 0 <= b.experts <= MAX_EXPERTS:
        raise InvalidRequest(
            f"budget.experts must be an integer in [0, {MAX_EXPERTS}] (how many MoE² experts answer together), "
            f"got {b.experts!r}",
            "INVALID_ARGUMENT",
        )
    sampling = sampling_message(
        max_tokens, temperature, top_k, top_p, seed, tuple(stop), n, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, skip_ratio=skip_ratio, lossless=lossless, kv_prediction=kv_prediction,
        kv_repair=kv_repair,
    )  # fmt: skip
    return pb.GenerateRequest(
        model=model,
        input=inp,
        sampling=sampling,
        request_id=request_id,
        device=device,
        budget=pb.Budget(
            ttft_ms=b.ttft_ms,
            tpot_ms=b.tpot_ms,
            energy_j=b.energy_j,
            best_effort=b.best_effort,
            quality_floor=b.quality_floor,
            experts=b.experts,
        ),
    )


def _check_skipping(skip_ratio: float, lossless: bool) -> None:
    """InvalidRequest for layer-skipping options the hub would refuse: caught here, before a round trip."""
    number = isinstance(skip_ratio, (int, float)) and not isinstance(skip_ratio, bool)
    if not (number and math.isfinite(skip_ratio) and 0.0 <= skip_ratio <= MAX_SKIP_RATIO):
        raise InvalidRequest(
            f"skip_ratio must be a number in [0, {MAX_SKIP_RATIO}] (the share of layers decode skips), "
            f"got {skip_ratio!r}",
            "INVALID_ARGUMENT",
        )
    if lossless and not skip_ratio > 0:
        raise InvalidRequest(
            "lossless drafts with the layers skip_ratio skips: set skip_ratio > 0 with it", "INVALID_ARGUMENT"
        )


def _check_kv(kv_prediction: float, kv_repair: bool, skip_ratio: float) -> None:
    """InvalidRequest for KV-prediction options the hub would refuse (models.sampling's rules)."""
    number = isinstance(kv_prediction, (int, float)) and not isinstance(kv_prediction, bool)
    if not (number and (kv_prediction == 0 or kv_prediction in KV_DEPTHS)):
        raise InvalidRequest(
            f"kv_prediction must be 0 or one of {', '.join(map(str, KV_DEPTHS))} (the auxiliary model's share "
            f"of the layers), got {kv_prediction!r}",
            "INVALID_ARGUMENT",
        )
    if kv_repair and not kv_prediction:
        raise InvalidRequest("kv_repair repairs a predicted cache: set kv_prediction with it", "INVALID_ARGUMENT")
    if kv_prediction and skip_ratio:
        raise InvalidRequest("kv_prediction and skip_ratio are one at a time: send one of them", "INVALID_ARGUMENT")


def _check_quality_floor(floor: float) -> None:
    number = isinstance(floor, (int, float)) and not isinstance(floor, bool)
    if not (number and math.isfinite(floor) and 0.0 <= floor <= 1.0):
        raise InvalidRequest(
            f"budget.quality_floor must be a number in [0, 1] (the lowest greedy agreement with the unmodified "
            f"model accepted), got {floor!r}",
            "INVALID_ARGUMENT",
        )


def _placement(p: pb.Placement) -> Placement:
    return Placement(
        p.kind,
        p.device_id,
        p.profile,
        p.model,
        p.emulated,
        p.predicted_ttft_ms,
        p.predicted_tpot_ms,
        p.predicted_energy_j,
        p.admitted_ttft_ms,
        p.admitted_tpot_ms,
        p.quantile,
        p.calibrated,
        p.layer_start,
        p.layer_end,
        p.kv_prediction,
        p.skip_ratio,
        tuple(ExpertWeight(e.expert, e.weight) for e in p.experts),
    )


def _fold(result: GenerateResult, msg: pb.GenerateResponse) -> Chunk | None:
    """Add one response message to the result; returns the chunk it carried, if any."""
    if msg.placements:
        result.placements = [_placement(p) for p in msg.placements]
    if msg.finish_reason:
        result.finish_reason = msg.finish_reason
        for c in result.choices:
            c.finish_reason = c.finish_reason or msg.finish_reason
        m = msg.metrics
        result.ttft_ms, result.tpot_ms, result.energy_j = m.ttft_ms, m.tpot_ms, m.energy_j
        result.prompt_tokens, result.completion_tokens = m.prompt_tokens, m.completion_tokens
        result.engine_ttft_ms, result.engine_tpot_ms = m.engine_ttft_ms, m.engine_tpot_ms
        result.hub_route_ms, result.hub_relay_ms = m.hub_route_ms, m.hub_relay_ms
        result.prefill_ms, result.decode_ms, result.queue_ms = m.prefill_ms, m.decode_ms, m.queue_ms
        result.energy_measured = m.energy_measured
        result.skipped_layers, result.lossless = list(m.skipped_layers), m.lossless
        result.drafted, result.accepted = m.drafted, m.accepted
        result.kv_depth, result.kv_predicted = m.kv_depth, m.kv_predicted
        result.kv_repaired_at = m.kv_repaired_at if m.HasField("kv_repaired_at") else None
    if msg.prompt_logprobs:
        result.prompt_logprobs = [_logprob(m) for m in msg.prompt_logprobs]
    if msg.text or msg.token_ids or msg.choice_finish_reason:
        logprobs = tuple(_logprob(m) for m in msg.logprobs)
        while len(result.choices) <= msg.index:
            result.choices.append(Choice(len(result.choices)))
        choice = result.choices[msg.index]
        choice.text += msg.text
        choice.token_ids += msg.token_ids
        choice.logprobs += logprobs  # type: ignore[arg-type]
        choice.finish_reason = msg.choice_finish_reason or choice.finish_reason
        if msg.index == 0:
            result.text += msg.text
            result.token_ids += list(msg.token_ids)
            result.logprobs += logprobs  # type: ignore[arg-type]
        return Chunk(msg.text, tuple(msg.token_ids), msg.index, logprobs)  # type: ignore[arg-type]
    return None


def _logprob(m: pb.TokenLogprob) -> TokenLogprob | None:
    if m.none:
        return None
    return TokenLogprob(m.token_id, m.logprob, tuple((t.token_id, t.logprob) for t in m.top))


class _Base:
    def __init__(self, hub: str, api_key: str | None = None, timeout: float = 120.0, tls_ca: str | None = None) -> None:
        self.hub, self.timeout = hub, timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()) if tls_ca else None


class Client(_Base):
    """Blocking client. Use as a context manager or call close()."""

    def __init__(self, hub: str, api_key: str | None = None, timeout: float = 120.0, tls_ca: str | None = None) -> None:
        super().__init__(hub, api_key, timeout, tls_ca)
        self._channel = grpc.secure_channel(hub, self._credentials) if self._credentials else grpc.insecure_channel(hub)
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._registry = pb_grpc.RegistryStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompt: Prompt, *, stream: bool = False, timeout: float | None = None, **options: Any):
        """Generate; returns a GenerateResult, or with stream=True an iterator of Chunks whose
        `result` attribute (on the iterator) fills in as it is consumed."""
        request = build_request(prompt, **options)
        if stream:
            return _SyncStream(
                self._inference.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
            )
        result = GenerateResult()
        for _ in _SyncStream(
            self._inference.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata), result
        ):
            pass
        return result

    def devices(self, timeout: float | None = None) -> list[pb.Device]:
        """The devices the hub knows, with their status, models (and versions), agent version and last update."""
        return list(self._call(self._registry.ListDevices, pb.ListDevicesRequest(), timeout).devices)

    def create_enrollment_token(self, ttl_s: float = 0.0, timeout: float | None = None) -> EnrollmentToken:
        """A one-time token for enrolling one device, valid `ttl_s` seconds (0: the hub's default)."""
        resp = self._call(self._registry.CreateToken, pb.CreateTokenRequest(ttl_s=ttl_s), timeout)
        return EnrollmentToken(resp.token, resp.expires_unix)

    def update_device(self, device_id: str, model: str, quant: str = "", timeout: float | None = None) -> str:
        """Ask a device to serve `model` (a zoo name) at `quant` (fp32, int8, int4; empty: its profile's)
        over the air; returns the command's id. Its outcome shows in devices()' `update` field.
        The hub prepares the bundle before answering: give a first update of a large model time."""
        req = pb.UpdateDeviceRequest(device_id=device_id, model=model, quant=quant)
        return self._call(self._registry.UpdateDevice, req, timeout or self.timeout).command_id

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout or 10, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


class _SyncStream:
    """Iterator of Chunks over a response stream; `result` accumulates the whole answer."""

    def __init__(self, call: Iterator[pb.GenerateResponse], result: GenerateResult | None = None) -> None:
        self._call, self.result = call, result or GenerateResult()

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for msg in self._call:
                chunk = _fold(self.result, msg)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def cancel(self) -> None:
        self._call.cancel()  # type: ignore[attr-defined]


class AsyncClient(_Base):
    """asyncio client (grpc.aio). Use `async with` or await close()."""

    def __init__(self, hub: str, api_key: str | None = None, timeout: float = 120.0, tls_ca: str | None = None) -> None:
        super().__init__(hub, api_key, timeout, tls_ca)
        self._channel = (
            grpc.aio.secure_channel(hub, self._credentials) if self._credentials else grpc.aio.insecure_channel(hub)
        )
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._registry = pb_grpc.RegistryStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generate(self, prompt: Prompt, *, timeout: float | None = None, **options: Any) -> GenerateResult:
        result = GenerateResult()
        async for _ in self.stream(prompt, timeout=timeout, result=result, **options):
            pass
        return result

    async def stream(
        self, prompt: Prompt, *, timeout: float | None = None, result: GenerateResult | None = None, **options: Any
    ) -> AsyncIterator[Chunk]:
        """Chunks as they arrive; pass `result` to collect placement and metrics too."""
        request = build_request(prompt, **options)
        result = result if result is not None else GenerateResult()
        call = self._inference.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for msg in call:
                chunk = _fold(result, msg)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def devices(self, timeout: float | None = None) -> list[pb.Device]:
        """As Client.devices."""
        return list((await self._call(self._registry.ListDevices, pb.ListDevicesRequest(), timeout)).devices)

    async def create_enrollment_token(self, ttl_s: float = 0.0, timeout: float | None = None) -> EnrollmentToken:
        """As Client.create_enrollment_token."""
        resp = await self._call(self._registry.CreateToken, pb.CreateTokenRequest(ttl_s=ttl_s), timeout)
        return EnrollmentToken(resp.token, resp.expires_unix)

    async def update_device(self, device_id: str, model: str, quant: str = "", timeout: float | None = None) -> str:
        """As Client.update_device."""
        req = pb.UpdateDeviceRequest(device_id=device_id, model=model, quant=quant)
        return (await self._call(self._registry.UpdateDevice, req, timeout or self.timeout)).command_id

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=timeout or 10, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
