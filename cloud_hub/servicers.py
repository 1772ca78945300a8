"""gRPC servicers: translate protobuf to the registry's and the request path's calls, and back.

Errors are mapped to status codes by `cloud_hub.interceptor.ErrorInterceptor`, not here.
Authentication travels in metadata: SDK calls carry `authorization: Bearer <api key>`; the agent's
calls carry `x-tandem-device-id` and `x-tandem-credential`. Secrets are never logged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator

import grpc

from cloud_hub.errors import InvalidRequest
from cloud_hub.fleet import AgentSession
from cloud_hub.hub_requests import Final, GenerateSpec, Started
from cloud_hub.interceptor import certified_device, device_refusal
from cloud_hub.progress import Chunk
from cloud_hub.prompt import prompt_from_wire
from cloud_hub.registry import Registry
from cloud_hub.router import Budget
from cloud_hub.service import HubService
from cloud_hub.updates import UpdateRefused, Updates
from models.sampling import SamplingParams
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tandem.wire import logprob_message, sampling_kwargs

log = logging.getLogger("tandem.hub")


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def api_key(context: grpc.aio.ServicerContext) -> str | None:
    value = _metadata(context).get("authorization", "")
    return value[7:] if value.startswith("Bearer ") else None


def spec_from_request(req: pb.GenerateRequest, arrived: float = 0.0) -> GenerateSpec:
    """Raises models.errors.InvalidRequest for bad sampling values."""
    params = _sampling(req.sampling.SerializeToString())
    b = req.budget
    budget = Budget(b.ttft_ms, b.tpot_ms, b.energy_j, b.best_effort, b.quality_floor, b.experts)
    return GenerateSpec(prompt_from_wire(req.input), params, budget, req.model, arrived, req.device)


@functools.lru_cache(maxsize=1024)
def _sampling(raw: bytes) -> SamplingParams:
    """The SamplingParams of a serialized pb.Sampling, validated once per distinct value: clients
    repeat theirs, and validating formats every error message whether it fails or not. Invalid
    values raise each time (lru_cache keeps no exceptions)."""
    return SamplingParams(**sampling_kwargs(pb.Sampling.FromString(raw)))


def response(request_id: str, ev: Started | Chunk | Final) -> pb.GenerateResponse:
    """One event of HubService.generate as the message the caller receives."""
    if type(ev) is Chunk:
        if not (ev.index or ev.logprobs or ev.prompt_logprobs or ev.finish_reason):
            return pb.GenerateResponse(text=ev.text, token_ids=ev.token_ids)  # the plain hot path
        return pb.GenerateResponse(
            text=ev.text,
            token_ids=ev.token_ids,
            index=ev.index,
            logprobs=[logprob_message(lp) for lp in ev.logprobs],
            prompt_logprobs=[logprob_message(lp) for lp in ev.prompt_logprobs],
            prompt_token_ids=ev.prompt_ids,
            choice_finish_reason=ev.finish_reason,
        )
    if type(ev) is Started:
        return pb.GenerateResponse(placements=ev.placements, request_id=request_id)
    return pb.GenerateResponse(
        finish_reason=ev.finish_reason, placements=ev.placements, metrics=ev.metrics, request_id=request_id
    )


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, registry: Registry, service: HubService) -> None:
        self.registry, self.service = registry, service

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator:
        arrived = time.perf_counter()  # the hub's own time starts before authentication and parsing
        self.registry.check_api_key(api_key(context))
        spec = spec_from_request(request, arrived)
        async for msg in self.service.generate(spec, functools.partial(response, request.request_id)):
            yield msg

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        self.registry.check_api_key(api_key(context))
        return pb.ListModelsResponse(models=self.service.placements.models())


class RegistryServicer(pb_grpc.RegistryServicer):
    def __init__(self, registry: Registry, updates: Updates | None = None, device_port: int = 0) -> None:
        self.registry, self._updates = registry, updates
        self.device_port = device_port
        """Where devices dial with their certificates (mutual TLS), told in each Enroll answer; 0: none."""

    @property
    def updates(self) -> Updates:
        if self._updates is None:
            raise UpdateRefused("this hub does not carry over-the-air updates")
        return self._updates

    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollResponse:
        answer = self.registry.enroll(
            request.token, request.name, request.profile, list(request.models), request.emulated, request.csr
        )
        answer.device_port = self.device_port
        return answer

    async def Deregister(
        self, request: pb.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeregisterResponse:
        md = _metadata(context)
        record = self.registry.authenticate_device(md.get("x-tandem-device-id"), md.get("x-tandem-credential"))
        self.registry.deregister(record)
        return pb.DeregisterResponse()

    async def ListDevices(
        self, request: pb.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDevicesResponse:
        self.registry.check_api_key(api_key(context))
        return pb.ListDevicesResponse(devices=self.registry.devices())

    async def CreateToken(
        self, request: pb.CreateTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTokenResponse:
        self.registry.check_api_key(api_key(context))
        token, expires = self.registry.issue_token(request.ttl_s)
        return pb.CreateTokenResponse(token=token, expires_unix=expires)

    async def UpdateDevice(
        self, request: pb.UpdateDeviceRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateDeviceResponse:
        self.registry.check_api_key(api_key(context))
        command_id = await self.updates.update_device(request.device_id, request.model, request.quant)
        return pb.UpdateDeviceResponse(command_id=command_id)

    async def FetchBundle(self, request: pb.FetchBundleRequest, context: grpc.aio.ServicerContext) -> AsyncIterator:
        md = _metadata(context)
        record = self.registry.authenticate_device(md.get("x-tandem-device-id"), md.get("x-tandem-credential"))
        async for chunk in self.updates.bundle_chunks(record.device_id, request.command_id):
            yield chunk


class WorkChannelServicer(pb_grpc.WorkChannelServicer):
    """Holds each agent's stream open: work goes down from the session outbox, replies come up."""

    def __init__(
        self,
        registry: Registry,
        hello_timeout_s: float = 10.0,
        ping_every_s: float = 5.0,
        updates: Updates | None = None,
        device_port: int = 0,
    ) -> None:
        self.registry = registry
        self.hello_timeout_s = hello_timeout_s
        self.ping_every_s = ping_every_s
        self.updates = updates
        """Records what each agent reports (its version, its models, its updates' outcomes); None: nothing is."""
        self.device_port = device_port
        """Where devices dial with their certificates (mutual TLS), told in each Welcome; 0: none."""

    def _welcome(self) -> pb.HubMessage:
        """First on every channel, ahead of any work: where the broker and the device port are now
        (either can change across hub restarts). Agents follow these, not what they saved at enrollment."""
        mqtt = self.registry.mqtt
        info = pb.MqttInfo(host=mqtt.host, port=mqtt.port, tls_port=mqtt.tls_port) if mqtt is not None else None
        return pb.HubMessage(welcome=pb.Welcome(mqtt=info, device_port=self.device_port))

    async def Connect(self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext):
        md = _metadata(context)
        record = self.registry.authenticate_device(md.get("x-tandem-device-id"), md.get("x-tandem-credential"))
        if self.device_port and certified_device(context) is None:
            # Mutual TLS, and the main port (no certificate; the interceptor refuses any other
            # mismatch): the device's credential earns the Welcome, then the refusal. An agent whose
            # device port refused it (the hub restarted on another) reads the new port here.
            yield self._welcome()
            refused = device_refusal(context, [record.device_id])
            assert refused is not None  # no certificate
            raise refused
        stream = request_iterator.__aiter__()
        try:
            first = await asyncio.wait_for(stream.__anext__(), self.hello_timeout_s)
        except (StopAsyncIteration, TimeoutError) as exc:
            raise InvalidRequest("the work channel must open with a Hello message") from exc
        if first.WhichOneof("kind") != "hello":
            raise InvalidRequest(f"the work channel must open with a Hello message, got {first.WhichOneof('kind')!r}")
        session = AgentSession(record, tuple(first.hello.models), max(1, first.hello.max_concurrency))
        session.outbox.put_nowait(self._welcome())
        fleet, store = self.registry.fleet, self.registry.store
        fleet.attach(session)
        if self.updates is not None:
            session.on_control = self.updates.on_agent_message
            self.updates.connected(session, first.hello)
        store.set_status(record.device_id, "online", time.time())
        log.info("work channel open: %s", record.device_id)
        reader = asyncio.create_task(self._read(stream, session))
        pinger = asyncio.create_task(self._ping(session))
        # None in the outbox ends the writer below: the reader's end puts one, and so does closing
        # the session (replaced by a reconnect, or the hub stops). One queue to wait on, rather than a
        # wait() over the queue and the reader for every message sent.
        reader.add_done_callback(lambda _: session.outbox.put_nowait(None))
        try:
            while (msg := await session.outbox.get()) is not None:
                yield msg
            if reader.done() and not reader.cancelled():
                reader.result()  # re-raises InvalidRequest for a malformed message
        finally:
            reader.cancel()
            pinger.cancel()
            fleet.detach(session)
            if fleet.sessions.get(record.device_id) is None:  # not replaced by a newer stream
                store.set_status(record.device_id, "offline", time.time())
            log.info("work channel closed: %s", record.device_id)

    async def _ping(self, session: AgentSession) -> None:
        """Measure the link: a Ping now and then (first soon after the channel opens); the agent's Pong
        comes back through AgentSession.deliver, which keeps the round trip's moving average."""
        await asyncio.sleep(0.2)
        while not session.closed:
            session.outbox.put_nowait(pb.HubMessage(ping=pb.Ping(sent_unix=time.time())))
            await asyncio.sleep(self.ping_every_s)

    @staticmethod
    async def _read(stream: AsyncIterator[pb.AgentMessage], session: AgentSession) -> None:
        clock = time.perf_counter
        async for msg in stream:
            session.deliver(msg, clock())
