"""The hub's plain logic: enrollment, authentication, routing and running requests.

The gRPC servicers translate protobuf to the calls here and back; nothing here knows about gRPC
contexts. Errors are `cloud_hub.errors.HubError`s, mapped to status codes at the servicer edge.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from cloud_hub import auth
from cloud_hub.backends import ServingBackend
from cloud_hub.errors import HubError, InvalidRequest, NotFound, Overloaded, Unauthenticated, Unavailable
from cloud_hub.fleet import AgentSession, Fleet
from cloud_hub.metrics import HubMetrics
from cloud_hub.router import Budget, Candidate, Router
from cloud_hub.store import DeviceRecord, SecretStore, SQLStore
from device_profiles import DeviceProfile, ProfileError, load_profile
from models.config import ModelConfig
from models.errors import InvalidRequest as ModelInvalidRequest
from models.generate import Continuation, Prompt
from models.sampling import SamplingParams
from partitioner.cost import ModelCost
from tandem.v1 import tandem_pb2 as pb

log = logging.getLogger("tandem.hub")


@dataclass(frozen=True)
class Limits:
    max_prompt_bytes: int = 64 * 1024
    """Largest prompt (text, or all chat contents together) the hub accepts."""
    max_tokens: int = 4096
    """Largest max_tokens a request may ask for."""
    token_ttl_s: float = 3600.0
    """Default lifetime of an enrollment token."""
    max_inflight: int = 512
    """Requests served at once; beyond it the hub answers RESOURCE_EXHAUSTED (HTTP 429) at once."""


@dataclass(frozen=True)
class MqttAccess:
    """How agents reach the broker; the hub adds each enrolled device as a broker user."""

    host: str
    port: int
    add_user: object = field(repr=False, default=None)
    """Callable (username, password) -> None registering a device with the broker, or None."""


@dataclass(frozen=True)
class GenerateSpec:
    prompt: Prompt
    params: SamplingParams
    budget: Budget
    model: str = ""
    arrived: float = 0.0
    """time.perf_counter() when the request reached the hub (0: when generate() starts); the hub's own
    time counts from here, so that authenticating and parsing the request are in it."""


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Final:
    finish_reason: str
    placements: tuple[pb.Placement, ...]
    metrics: pb.Metrics


@dataclass(frozen=True)
class Started:
    placements: tuple[pb.Placement, ...]
    """Every placement so far; the last is the one starting now."""


Event = Started | Chunk | Final


def create_token(store: SecretStore, ttl_s: float) -> str:
    """A one-time enrollment token valid for ttl_s seconds; only its hash is stored."""
    if not ttl_s > 0:
        raise InvalidRequest(f"token lifetime must be positive, got {ttl_s}")
    token = auth.new_secret("token")
    store.add_token(auth.lookup_key(token), time.time() + ttl_s)
    return token


def create_api_key(store: SecretStore, name: str) -> str:
    """A new SDK API key; only its hash is stored, so this is the one time it is shown."""
    key = auth.new_secret("api_key")
    store.add_api_key(auth.lookup_key(key), name)
    return key


class HubService:
    def __init__(
        self,
        store: SQLStore,
        fleet: Fleet,
        router: Router,
        cloud: ServingBackend | None,
        cloud_profile: DeviceProfile | None,
        mqtt: MqttAccess | None,
        limits: Limits = Limits(),
        metrics: HubMetrics | None = None,
    ) -> None:
        self.store, self.fleet, self.router = store, fleet, router
        self.cloud, self.cloud_profile = cloud, cloud_profile
        self.mqtt, self.limits = mqtt, limits
        self._cloud_inflight = 0
        self.inflight = 0
        self.metrics = metrics or HubMetrics()
        # The cloud's candidate as last built (sessions keep theirs, AgentSession.offers): building one
        # costs more than the rest of routing it, and only its queue changes between requests.
        self._cloud_candidate: Candidate | None = None
        # API keys (lookup digests) the store has confirmed. Keys are never revoked (the store cannot
        # delete one), so a confirmed key stays valid and later requests skip the database (a round
        # trip to PostgreSQL for replicas, on the event loop). Were revocation added, it must clear this.
        self._api_keys: set[str] = set()

    # -- secrets ---------------------------------------------------------------------------------

    def create_token(self, ttl_s: float | None = None) -> str:
        return create_token(self.store, ttl_s or self.limits.token_ttl_s)

    def create_api_key(self, name: str) -> str:
        return create_api_key(self.store, name)

    def check_api_key(self, key: str | None) -> None:
        if not key:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        lookup = auth.lookup_key(key)
        if lookup in self._api_keys:
            return
        if not self.store.has_api_key(lookup):
            raise Unauthenticated("invalid API key")
        self._api_keys.add(lookup)

    # -- devices ---------------------------------------------------------------------------------

    def enroll(
        self, token: str, name: str, profile: str, models: list[pb.ModelInfo], emulated: bool
    ) -> pb.EnrollResponse:
        try:
            load_profile(profile)
        except ProfileError as exc:
            raise InvalidRequest(f"unknown or invalid device profile {profile!r}: {exc}") from exc
        if not name or len(name) > 128:
            raise InvalidRequest("device name must be 1-128 characters")
        for m in models:
            _model_config(m)  # a model the cost model cannot read is refused now, not at routing time
        status = self.store.consume_token(auth.lookup_key(token or ""), time.time())
        if status != "ok":
            raise Unauthenticated(f"enrollment token {status}")
        device_id = "dev-" + secrets.token_hex(6)
        credential = auth.new_secret("credential")
        models_json = tuple(_model_dict(m) for m in models)
        record = DeviceRecord(device_id, name, profile, auth.hash_secret(credential), models_json, emulated)
        self.store.add_device(record)
        mqtt = pb.MqttInfo(topic_prefix=f"tandem/v1/devices/{device_id}")
        if self.mqtt is not None:
            password = secrets.token_urlsafe(24)
            if self.mqtt.add_user is not None:
                self.mqtt.add_user(device_id, password)
            mqtt = pb.MqttInfo(
                host=self.mqtt.host,
                port=self.mqtt.port,
                username=device_id,
                password=password,
                topic_prefix=mqtt.topic_prefix,
            )
        log.info("enrolled %s (%s, profile %s)", device_id, name, profile)
        return pb.EnrollResponse(device_id=device_id, credential=credential, mqtt=mqtt)

    def authenticate_device(self, device_id: str | None, credential: str | None) -> DeviceRecord:
        record = self.store.get_device(device_id or "")
        if record is None or not credential or not auth.check_secret(credential, record.credential_hash):
            raise Unauthenticated("unknown device or wrong device credential")
        return record

    def deregister(self, record: DeviceRecord) -> None:
        session = self.fleet.sessions.get(record.device_id)
        if session is not None:
            self.fleet.detach(session)
        self.store.remove_device(record.device_id)

    def devices(self) -> list[pb.Device]:
        out = []
        for r in self.store.list_devices():
            t = self.fleet.telemetry.get(r.device_id)
            session = self.fleet.sessions.get(r.device_id)
            out.append(
                pb.Device(
                    device_id=r.device_id,
                    name=r.name,
                    profile=r.profile,
                    # The replica holding a device's work channel knows best; others read the registry.
                    status=self.fleet.status_of(r.device_id) if r.device_id in self.fleet.sessions else r.status,
                    models=[pb.ModelInfo(**{k: v for k, v in m.items() if k != "config_json"}) for m in r.models],
                    last_seen_unix=max(r.last_seen, t.at if t else 0.0),
                    load=t.load if t else 0.0,
                    queue_depth=t.queue_depth if t else 0,
                    emulated=r.emulated,
                    connected=session is not None,
                )
            )
        return out

    def models(self) -> list[pb.ModelInfo]:
        seen: dict[str, pb.ModelInfo] = {}
        if self.cloud is not None:
            seen[self.cloud.model] = self.cloud.model_info()
        for s in self.fleet.online():
            for m in s.models:
                seen.setdefault(m.name, m)
        return list(seen.values())

    # -- requests --------------------------------------------------------------------------------

    def validate(self, spec: GenerateSpec) -> None:
        size = _prompt_bytes(spec.prompt)
        if size == 0:
            raise InvalidRequest("prompt must not be empty")
        if size > self.limits.max_prompt_bytes:
            raise InvalidRequest(f"prompt of {size} bytes exceeds the hub's limit of {self.limits.max_prompt_bytes}")
        if spec.params.max_tokens > self.limits.max_tokens:
            raise InvalidRequest(
                f"max_tokens {spec.params.max_tokens} exceeds the hub's limit of {self.limits.max_tokens}"
            )
        b = spec.budget
        if min(b.ttft_ms, b.tpot_ms, b.energy_j) < 0 or any(x != x for x in (b.ttft_ms, b.tpot_ms, b.energy_j)):
            raise InvalidRequest("budget values must be non-negative numbers (0 means no limit)")

    def candidates(self, model: str, chat: bool = False) -> list[Candidate]:
        """Placements that serve `model` (any model when empty); chat prompts need a chat model."""
        out = []
        for s in self.fleet.online():
            offers = s.offers
            if offers is None:
                offers = s.offers = _offers(s)
            for i, (name, is_chat, c) in enumerate(offers):
                if (not model or name == model) and (is_chat or not chat):
                    if c.queued != s.inflight:
                        c = Candidate(c.kind, c.device_id, c.profile, c.model, c.cost, s.inflight, c.emulated)
                        offers[i] = (name, is_chat, c)
                    out.append(c)
        info = self.cloud.model_info() if self.cloud is not None else None
        if (
            info is not None
            and self.cloud_profile is not None
            and (not model or model == info.name)
            and (info.chat or not chat)
        ):
            c = self._cloud_candidate
            if c is None or c.queued != self._cloud_inflight:
                cost = _model_cost(info.config_json, info.weight_bytes)
                c = Candidate("cloud", "", self.cloud_profile, self.cloud.model, cost, self._cloud_inflight)
                self._cloud_candidate = c
            out.append(c)
        return out

    def _route(self, spec: GenerateSpec, excluded: set[str], progress: _Progress) -> tuple[Candidate, pb.Placement]:
        """The next placement. The first honours the budget; a failover takes the best that is left,
        since the caller is already being answered and finishing beats failing."""
        chat = _is_chat(spec.prompt)
        candidates = [c for c in self.candidates(spec.model, chat) if (c.device_id or "cloud") not in excluded]
        served = {m.name: m for m in self.models()} if spec.model and not candidates else {}
        if not candidates and spec.model in served and chat and not served[spec.model].chat:
            raise InvalidRequest(f"model {spec.model!r} is a base model without a chat template: send a plain prompt")
        if not candidates and spec.model and not progress.placements:
            raise NotFound(
                f"model {spec.model!r} is not served by any online device or the cloud; "
                f"served now: {', '.join(sorted(served)) or 'none'}"
            )
        if not candidates and progress.failures:
            raise Unavailable(f"no placement left to go on with this request; failed: {'; '.join(progress.failures)}")
        if not candidates:
            raise Unavailable(
                f"no online device or cloud model can serve this {'chat' if chat else 'completion'} request now"
            )
        remaining = spec.params.max_tokens - progress.tokens
        budget = spec.budget if not progress.placements else Budget(best_effort=True)
        choice = self.router.choose(candidates, _prompt_tokens(spec.prompt) + progress.tokens, remaining, budget)
        c, est = choice.candidate, choice.estimate
        placement = pb.Placement(
            kind=c.kind,
            device_id=c.device_id,
            profile=c.profile.name,
            model=c.model,
            emulated=c.emulated,
            predicted_ttft_ms=est.ttft_ms,
            predicted_tpot_ms=est.tpot_ms,
            predicted_energy_j=est.edge_energy_j,
        )
        return c, placement

    async def generate(self, spec: GenerateSpec, encode: Callable[[Event], Any] = lambda ev: ev) -> AsyncIterator[Any]:
        """Admit, route and run one request (see _generate), counting it in the metrics.

        Yields each event as `encode` makes it (the servicer's translation to protobuf; by default
        the event itself), so that the hub's own time in the Final's metrics runs to each message's
        hand-off to the caller's stream. hub_route_ms: from spec.arrived through authentication,
        validation, routing and Started's encoding, and from Started's hand-off to the work's
        dispatch (failovers' routing added). hub_relay_ms: each token's (and the agent's WorkDone's)
        arrival from the agent to its encoded hand-off, waits in the event loop included. What gRPC
        does before a message reaches the hub's code and after a hand-off is not in either.
        Raises Overloaded at once when max_inflight requests are being served already.
        """
        if self.inflight >= self.limits.max_inflight:
            self.metrics.observe_request("none", "overloaded")
            raise Overloaded(f"the hub is serving {self.inflight} requests, its limit; retry later")
        self.inflight += 1
        self.metrics.inflight.inc()
        progress = _Progress(arrived=spec.arrived or time.perf_counter())
        placement, outcome = "none", "cancelled"
        try:
            async for ev in self._generate(spec, progress):
                if type(ev) is Chunk:  # one per token: the hot path
                    out = encode(ev)
                    progress.handed_off()
                    yield out
                elif isinstance(ev, Started):
                    placement = ev.placements[-1].kind
                    out = encode(ev)
                    progress.routed()
                    yield out
                    progress.mark = time.perf_counter()  # the dispatch that follows is routing time too
                else:
                    outcome = "ok"
                    self.metrics.observe_request(placement, outcome, ev.metrics.ttft_ms, ev.metrics.tpot_ms)
                    progress.handed_off()  # the WorkDone, relayed as this Final
                    ev.metrics.hub_route_ms, ev.metrics.hub_relay_ms = progress.route_s * 1000, progress.relay_s * 1000
                    yield encode(ev)
        except HubError as exc:
            outcome = exc.kind
            raise
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()
            if outcome != "ok":
                self.metrics.observe_request(placement, outcome)

    async def _generate(self, spec: GenerateSpec, progress: _Progress) -> AsyncIterator[Event]:
        """Route and run one request, yielding Started, Chunks and Final (its metrics' hub times left
        for generate() to fill in).

        If the device serving it disconnects mid-stream, the request goes on from the tokens already
        sent, on the next placement the router picks (re-prefilling prompt plus those tokens there):
        the caller sees one answer, and a Started listing every placement so far, then the rest.
        """
        self.validate(spec)
        excluded = set[str]()
        while True:
            c, placement = self._route(spec, excluded, progress)
            progress.placements.append(placement)
            session = self.fleet.sessions.get(c.device_id) if c.kind == "edge" else None
            self._count(c, session, +1)  # no await since choose(): the next request's routing sees this one
            try:
                yield Started(tuple(progress.placements))
                async for item in self._run(c, spec, progress):
                    yield item
                break
            except Unavailable as exc:
                if progress.finish or progress.tokens >= spec.params.max_tokens:
                    break  # it failed after its last token: nothing is missing
                excluded.add(c.device_id or "cloud")
                progress.failures.append(f"{c.device_id or 'cloud'}: {exc}")
                self.metrics.failovers.inc()
                log.warning(
                    "placement %s failed mid-request (%s); failing over after %d tokens",
                    c.device_id or "cloud",
                    exc,
                    progress.tokens,
                )
                progress.mark = time.perf_counter()  # routing the next placement is hub time too
            finally:
                self._count(c, session, -1)
        yield Final(progress.finish or "length", tuple(progress.placements), progress.metrics())

    def _count(self, c: Candidate, session: AgentSession | None, delta: int) -> None:
        if c.kind == "cloud":
            self._cloud_inflight += delta
        elif session is not None:
            session.inflight += delta

    async def _run(self, c: Candidate, spec: GenerateSpec, progress: _Progress) -> AsyncIterator[Chunk]:
        """Chunks from one placement, going on from `progress`, which it updates."""
        remaining = max(1, spec.params.max_tokens - progress.tokens)
        params = (
            spec.params
            if remaining == spec.params.max_tokens
            else dataclasses.replace(spec.params, max_tokens=remaining)
        )
        if c.kind == "cloud":
            assert self.cloud is not None
            try:
                ids = self.cloud.encode(spec.prompt)
            except ModelInvalidRequest as exc:
                raise InvalidRequest(str(exc)) from exc
            cont = Continuation(tuple(progress.ids), progress.chars) if progress.ids else None
            progress.prompt_tokens = len(ids)
            progress.dispatched()
            start, first, n = time.perf_counter(), 0.0, 0
            async for piece in self.cloud.stream(ids, params, cont):
                progress.received = time.perf_counter()
                first, n = first or progress.received, n + 1
                yield progress.add(piece.text, piece.token_ids, piece.finish_reason, tokens=piece.tokens)
            progress.received = time.perf_counter()  # the stream's end, relayed as the Final
            progress.engine_ttft_ms = (first - start) * 1000 if first else 0.0
            progress.engine_tpot_ms = (progress.received - first) * 1000 / (n - 1) if n > 1 else 0.0
            return
        session = self.fleet.sessions.get(c.device_id)
        if session is None:
            raise Unavailable(f"device {c.device_id} went offline")
        replies = session.run(_work(spec, c.model, params, progress))  # the work is on its way now
        progress.dispatched()
        async for received, item in replies:
            progress.received = received
            if type(item) is pb.TokenChunk:
                ids = tuple(item.token_ids)
                yield progress.add(item.text, ids, None, tokens=len(ids))
            else:
                progress.finish = item.finish_reason
                progress.energy_j += item.metrics.energy_j
                progress.prompt_tokens = item.metrics.prompt_tokens
                progress.engine_ttft_ms, progress.engine_tpot_ms = item.metrics.ttft_ms, item.metrics.tpot_ms


@dataclass
class _Progress:
    """What one request has produced so far, across placements."""

    ids: list[int] = field(default_factory=list)
    """Token ids of the answer so far (text-exact; an upstream's are re-tokenized from its text)."""
    tokens: int = 0
    """Tokens generated so far, as the engines counted them."""
    chars: int = 0
    finish: str = ""
    energy_j: float = 0.0
    prompt_tokens: int = 0
    placements: list[pb.Placement] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    first: float = 0.0
    last: float = 0.0
    engine_ttft_ms: float = 0.0
    engine_tpot_ms: float = 0.0
    arrived: float = field(default_factory=time.perf_counter)
    route_s: float = 0.0
    """Hub time routing and dispatching, over all placements (see HubService.generate)."""
    relay_s: float = 0.0
    """Hub time relaying: each token's and the end's arrival to hand-off, summed."""
    mark: float = 0.0
    """Start of the routing stretch under way (0: the arrival)."""
    received: float = 0.0
    """Arrival of the item being relayed now (0: none)."""

    def routed(self) -> None:
        """Started is ready to hand off: routing since `mark` ends (dispatch comes after it)."""
        self.route_s += time.perf_counter() - (self.mark or self.arrived)

    def dispatched(self) -> None:
        """The work has left for its placement: the stretch since Started's hand-off was routing too."""
        self.route_s += time.perf_counter() - self.mark

    def handed_off(self) -> None:
        """What arrived at `received` is handed to the caller's stream: relay time."""
        if self.received:
            self.relay_s += time.perf_counter() - self.received
            self.received = 0.0

    def add(self, text: str, ids: tuple[int, ...], finish: str | None, tokens: int) -> Chunk:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.ids += ids
        self.tokens += tokens
        self.chars += len(text)
        self.finish = finish or self.finish
        return Chunk(text, ids)

    def metrics(self) -> pb.Metrics:
        """The answer's metrics; the hub's own times are filled in at its hand-off."""
        count = self.tokens
        ttft = ((self.first or time.perf_counter()) - self.arrived) * 1000
        tpot = (self.last - self.first) * 1000 / (count - 1) if count > 1 else 0.0
        return pb.Metrics(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=count,
            ttft_ms=ttft,
            tpot_ms=tpot,
            energy_j=self.energy_j,
            engine_ttft_ms=self.engine_ttft_ms,
            engine_tpot_ms=self.engine_tpot_ms,
        )


def _offers(s: AgentSession) -> list[tuple[str, bool, Candidate]]:
    """(model name, chat, candidate) for each model a session serves; candidates count it idle."""
    profile = _profile(s.record.profile)
    out = []
    for m in s.models:
        cost = _model_cost(m.config_json, m.weight_bytes)
        out.append((m.name, m.chat, Candidate("edge", s.device_id, profile, m.name, cost, 0, s.record.emulated)))
    return out


def _work(spec: GenerateSpec, model: str, p: SamplingParams, progress: _Progress) -> pb.Work:
    sampling = pb.Sampling(
        max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, stop=list(p.stop), seed=p.seed
    )
    return pb.Work(
        work_id=os.urandom(16).hex(),  # random like a uuid4, a few times cheaper
        model=model,
        input=prompt_to_input(spec.prompt),
        sampling=sampling,
        continue_ids=progress.ids,
        continue_chars=progress.chars,
    )


def prompt_to_input(prompt: Prompt) -> pb.Input:
    if isinstance(prompt, str):
        return pb.Input(prompt=prompt)
    if prompt and all(isinstance(t, int) for t in prompt):
        return pb.Input(tokens=pb.TokenIds(ids=list(prompt)))  # type: ignore[arg-type]
    msgs = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt]  # type: ignore[index]
    return pb.Input(chat=pb.ChatMessages(messages=msgs))


def _is_chat(prompt: Prompt) -> bool:
    return not isinstance(prompt, str) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _prompt_bytes(prompt: Prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt.encode())
    if prompt and all(isinstance(t, int) for t in prompt):
        return 4 * len(prompt)
    return sum(len(str(m.get("content", "")).encode()) for m in prompt)  # type: ignore[union-attr]


def _prompt_tokens(prompt: Prompt) -> int:
    """Token count for routing: exact for ids, about 4 bytes a token for text."""
    if prompt and not isinstance(prompt, str) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    return max(1, _prompt_bytes(prompt) // 4 + (16 if not isinstance(prompt, str) else 0))


def _model_dict(m: pb.ModelInfo) -> dict:
    return {
        "name": m.name,
        "arch": m.arch,
        "n_layers": m.n_layers,
        "quant": m.quant,
        "weight_bytes": m.weight_bytes,
        "config_json": m.config_json,
    }


@functools.lru_cache(maxsize=256)
def _profile(name: str) -> DeviceProfile:
    """A device's profile, parsed once (load_profile stats the name as a path on every call, and
    the router needs every candidate's profile on every request)."""
    return load_profile(name)


@functools.lru_cache(maxsize=256)
def _model_cost(config_json: str, weight_bytes: int = 0) -> ModelCost:
    """Cost model of a model as served (cached: the router needs it for every candidate of every
    request). Its bits per weight come from the stored weight bytes the server advertised, so an
    int4 bundle is costed as the ~5 bits a weight it reads, not as fp32; its KV cache follows
    ModelCost's rule, which our torch engine keeps: fp16 for quantized weights, else fp32."""
    cfg = _config_from_json(config_json)
    bits = 32.0
    if weight_bytes > 0:
        bits = 8 * weight_bytes / ModelCost.from_config(cfg, bits_per_weight=32.0).n_params
    return ModelCost.from_config(cfg, bits_per_weight=bits)


def _config_from_json(config_json: str) -> ModelConfig:
    return ModelConfig(**json.loads(config_json))


def _model_config(m: pb.ModelInfo) -> ModelConfig:
    try:
        return _config_from_json(m.config_json)
    except Exception as exc:  # malformed JSON, unknown fields, invalid sizes
        raise InvalidRequest(f"model {m.name!r}: config_json is not a valid model config ({exc})") from exc
