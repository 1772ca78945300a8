"""The hub's request path: validate, place, dispatch, fail over, account.

`HubService.generate` takes one request from the gRPC servicer or the OpenAI API (each has already
parsed its prompt once into a `RequestPrompt`), asks `Placements` for the candidates and the router
for the placement within budget, dispatches the work down an agent's channel (the wire `Input`
unchanged) or to the hub's own backend, fails over mid-stream when a device drops, and counts the
outcome in the metrics. Nothing here knows about gRPC contexts; errors are `HubError`s, mapped to
status codes at the server's edge. Enrollment and credentials are `cloud_hub.registry`'s.
A request's values, the rules it must meet and its translations to the wire (Work, Placement
messages) are cloud_hub.hub_requests'.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from cloud_hub import ensemble, variants
from cloud_hub.backends import ServingBackend
from cloud_hub.calibrations import split_key
from cloud_hub.candidates import Candidate
from cloud_hub.ensemble import EnsembleEngine
from cloud_hub.errors import HubError, InvalidRequest, NotFound, Overloaded, RateLimited, Unavailable
from cloud_hub.estimates import split_estimate, split_plan
from cloud_hub.fleet import Fleet
from cloud_hub.hub_requests import (
    Event,
    Final,
    GenerateSpec,
    Limits,
    Started,
    agent_work,
    placement_of,
    split_placements,
    validate_request,
)
from cloud_hub.journal import Journal
from cloud_hub.metrics import HubMetrics
from cloud_hub.placements import Placements
from cloud_hub.progress import Chunk, Progress
from cloud_hub.prompt import CHAT_TEMPLATE_TOKENS
from cloud_hub.router import Budget, Router
from cloud_hub.split import SplitEngine
from cloud_hub.split_plans import SPLIT_PIN, pinned_split
from models.errors import InvalidRequest as ModelInvalidRequest
from models.generate import Continuation
from models.kvpred import KVReport
from partitioner.split import PlanError
from tandem.v1 import tandem_pb2 as pb
from tandem.wire import kv_report_kwargs, logprob_of, tools_of

log = logging.getLogger("tandem.hub")


class HubService:
    def __init__(
        self,
        fleet: Fleet,
        placements: Placements,
        router: Router,
        cloud: ServingBackend | None,
        limits: Limits = Limits(),  # noqa: B008 (a frozen dataclass: one shared default is safe)
        metrics: HubMetrics | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.fleet, self.placements, self.router, self.cloud = fleet, placements, router, cloud
        self.journal = journal or Journal()
        self.split_dtype = "float16"
        """How split stages send hidden states (models.stage.DTYPES; HubConfig.split_dtype)."""
        """The recent requests, with the router's decision for each (the fleet page reads it)."""
        self.limits = limits
        self.inflight = 0
        self.metrics = metrics or HubMetrics()
        self.rate = limits.rate_limiter()
        self.metrics.queued.set_function(lambda: sum(s.waiting for s in fleet.sessions.values()))

    def admit(self, api_key: str | None) -> None:
        """Count a request against its API key's rate (Limits.rate_per_s), before the key is checked:
        the edges call this first, so that a flood of bad keys is limited too. Raises RateLimited with
        the seconds until the key may start another."""
        if self.rate is None:
            return
        wait = self.rate.take(api_key or "")
        if wait:
            self.metrics.observe_request("none", RateLimited.kind)
            raise RateLimited(
                f"this API key is over its rate of {self.rate.rate_per_s:g} requests/s "
                f"(burst {self.rate.burst:g}); retry in {wait:.2f} s",
                retry_after_s=wait,
            )

    # -- requests --------------------------------------------------------------------------------

    def _route(
        self, spec: GenerateSpec, excluded: set[str], progress: Progress
    ) -> tuple[Candidate, list[pb.Placement]]:
        """The next placement, and its Placement messages (a split's: one per stage). The first honours
        the budget; a failover takes the best that is left, since the caller is already being answered
        and finishing beats failing (a pinned split's failover goes anywhere)."""
        chat = spec.prompt.chat
        candidates = [
            c for c in self.placements.candidates(spec.model, chat) if (c.device_id or "cloud") not in excluded
        ]
        pinned = spec.device.startswith(SPLIT_PIN)
        if pinned and not progress.placements:
            cloud = self.placements.source("cloud")
            candidates = [
                pinned_split(self.fleet, self.cloud, getattr(cloud, "profile", None), spec.device, spec.model)
            ]
        elif pinned:
            candidates = [c for c in candidates if not (c.split and set(dict(c.split.agents)) & excluded)]
        elif spec.device:
            candidates = [c for c in candidates if (c.device_id or "cloud") == spec.device]
            if not candidates and not progress.placements:
                raise NotFound(
                    f"device: {spec.device!r} is not online, or serves no {'chat ' if chat else ''}model "
                    f"{spec.model or 'at all'}"
                )
        if spec.params.skip_ratio > 0:
            candidates = variants.skipping(candidates, spec, first=not progress.placements)
        if spec.params.kv_prediction > 0:
            candidates = variants.predicting(candidates, spec, first=not progress.placements)
        served = {m.name: m for m in self.placements.models()} if spec.model and not candidates else {}
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
        remaining = spec.params.max_tokens * spec.params.n - progress.tokens  # n choices: n answers' energy
        budget = spec.budget if not progress.placements else Budget(best_effort=True)
        if budget.quality_floor and not variants.may_predict(spec.params):  # no variant the agent would refuse
            budget = dataclasses.replace(budget, quality_floor=0.0)
        if budget.quality_floor and not variants.may_skip(spec.params):  # KV prediction may stay; skipping may not
            candidates = [dataclasses.replace(c, skip_variants=()) if c.skip_variants else c for c in candidates]
        # routing_tokens counts the hub's default template size for chat; a model that knows its own
        # (ModelInfo.chat_template_tokens) replaces it.
        template = CHAT_TEMPLATE_TOKENS if chat else 0
        tokens = spec.prompt.routing_tokens + progress.tokens
        choice = self.router.choose(candidates, tokens, remaining, budget, template, spec.prompt)
        if not progress.placements and progress.record is not None:
            self.journal.routed(progress.record, choice, tokens)
        c, est = choice.candidate, choice.estimate
        adm = choice.admitted or est
        progress.ensemble = ensemble.members(choice, self.cloud, self.fleet) if spec.params.n == 1 else ()
        if c.split is not None:
            plan = progress.plan = split_plan(c.split, c.cost, tokens, remaining)  # kept for _run
            return c, split_placements(c, plan, est, adm, choice.quantile)
        if progress.ensemble:
            return c, ensemble.placements(choice, tokens, remaining, template, self.fleet.calibrations.quantile)
        return c, [placement_of(choice, spec.params)]

    def _split_engine(self, c: Candidate, progress: Progress) -> SplitEngine:
        """The engine that runs `c`'s plan (kept by _route): the agents' stages over their
        work channels, the last layers on the hub's own model."""
        plan = progress.plan
        assert plan is not None and self.cloud is not None
        remotes = []
        for stage in plan.stages[:-1]:
            session = self.fleet.sessions.get(stage.device)
            if session is None or session.closed:
                raise Unavailable(f"split stage device {stage.device} went offline")
            remotes.append((session, stage.start, stage.end))
        model = self.cloud.served.loaded.model  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        return SplitEngine(loop, remotes, model, c.model, plan.stages[-1].start, self.split_dtype)

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
            raise Overloaded(f"the hub is serving {self.inflight} requests, its limit; retry later", retry_after_s=1.0)
        self.inflight += 1
        self.metrics.inflight.inc()
        p = spec.params
        rec = self.journal.open(spec.model, spec.prompt.chat, p.max_tokens, p.n, spec.budget, spec.device)
        progress = Progress(arrived=spec.arrived or time.perf_counter(), record=rec)
        placement, outcome = "none", "cancelled"
        try:
            async for ev in self._generate(spec, progress):
                if type(ev) is Chunk:  # one per token: the hot path
                    out = encode(ev)
                    progress.handed_off()
                    yield out
                elif isinstance(ev, Started):
                    placement = ev.placements[-1].kind
                    self.journal.placed(rec, ev.placements)
                    out = encode(ev)
                    progress.routed()
                    yield out
                    progress.mark = time.perf_counter()  # the dispatch that follows is routing time too
                else:
                    outcome = "ok"
                    self.metrics.observe_request(placement, outcome, ev.metrics.ttft_ms, ev.metrics.tpot_ms)
                    self.metrics.observe_budget(placement, spec.budget, ev.metrics)
                    progress.handed_off()  # the WorkDone, relayed as this Final
                    ev.metrics.hub_route_ms, ev.metrics.hub_relay_ms = progress.route_s * 1000, progress.relay_s * 1000
                    self.journal.close(rec, outcome, ev.metrics)
                    yield encode(ev)
        except HubError as exc:
            outcome = exc.kind
            considered = getattr(exc, "considered", ())
            if considered:
                self.journal.refused(rec, considered, getattr(exc, "quantile", 0.0), spec.prompt.routing_tokens)
            self.journal.close(rec, outcome, error=str(exc))
            raise
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()
            if outcome != "ok":
                self.metrics.observe_request(placement, outcome)
                if outcome == "cancelled":
                    self.journal.close(rec, outcome)

    async def _generate(self, spec: GenerateSpec, progress: Progress) -> AsyncIterator[Event]:
        """Route and run one request, yielding Started, Chunks and Final (its metrics' hub times left
        for generate() to fill in).

        If the device serving it disconnects mid-stream, the request goes on from the tokens already
        sent, on the next placement the router picks (re-prefilling prompt plus those tokens there):
        the caller sees one answer, and a Started listing every placement so far, then the rest.
        """
        validate_request(spec, self.limits, self.placements)  # InvalidRequest, naming the field it refuses
        if type(self.router).prepare is not Router.prepare:  # e.g. MoE²'s per-prompt gate: a forward pass
            await asyncio.to_thread(self.router.prepare, spec.prompt)
        excluded = set[str]()
        learn: tuple[Candidate, pb.Placement] | None = None  # the one placement (or split) that served it all
        repair = spec.params.kv_repair
        while True:
            first = not progress.placements
            c, placed = self._route(spec, excluded, progress)
            progress.placements += placed
            placement = placed[0]
            # no await since choose(): the next request's routing sees it; an ensemble holds every member
            release = self.placements.claim(c, *(m for m, _ in progress.ensemble[1:]))
            try:
                yield Started(tuple(progress.placements))
                async for item in self._run(c, spec, progress):
                    yield item
                if first and c.tracker is not None and spec.params.n == 1 and not repair and not progress.ensemble:
                    # what it measured refits its device (n choices' timings are not one answer's; KV
                    # repair's decode steps carry recomputation the cost model does not predict)
                    learn = (c, placement)
                break
            except Unavailable as exc:
                if progress.done(spec.params):
                    break  # it failed after its last token: nothing is missing
                if spec.params.n > 1 and progress.tokens:
                    raise Unavailable(
                        f"{c.device_id or 'cloud'} failed after {progress.tokens} tokens of a request with n > 1, "
                        "whose choices cannot go on elsewhere"
                    ) from exc
                excluded.add(getattr(exc, "failed_device", None) or c.device_id or "cloud")  # an ensemble's: its member
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
                release()
        metrics = progress.metrics()
        if learn is not None:
            self._learn(*learn, metrics, spec.params.max_tokens)
        finishes = tuple(progress.finishes.get(i, progress.finish or "length") for i in range(spec.params.n))
        yield Final(progress.finish or "length", tuple(progress.placements), metrics, finishes)

    def _learn(self, c: Candidate, placement: pb.Placement, m: pb.Metrics, max_tokens: int) -> None:
        """Refit the device's corrections and ratios from one finished request (cloud_hub.calibrations),
        and count its prediction error by device in the metrics."""
        assert c.tracker is not None
        if c.split is not None:  # the pipeline's own tracker, against its plan as a whole
            try:
                raw = split_estimate(c.split, c.cost, max(1, m.prompt_tokens), max_tokens)
            except PlanError as exc:  # the measured prompt no longer fits the plan: nothing to learn from
                log.info("split answer not learnt from: %s", exc)
                return
            c.tracker.observe_split(raw.ttft_ms, raw.tpot_ms, placement, m)
            key = split_key([d for d, _ in c.split.agents])
            self.fleet.calibrations.save(key, c.model)
            self.metrics.observe_prediction(key, placement, m)
            return
        kv_layers = len(c.kv.aux_layers) if c.kv is not None and m.kv_predicted else None
        skip_layers = len(m.skipped_layers) if m.skipped_layers else None  # its decode steps were shorter
        c.tracker.observe(c.profile, c.cost, c.emulated, placement, m, max_tokens, kv_layers, skip_layers)
        self.fleet.calibrations.save(c.device_id, c.model)
        self.metrics.observe_prediction(c.device_id or "cloud", placement, m)

    async def _run(self, c: Candidate, spec: GenerateSpec, progress: Progress) -> AsyncIterator[Chunk]:
        """Chunks from one placement, going on from `progress`, which it updates."""
        remaining = max(1, spec.params.max_tokens - progress.tokens)
        params = (
            spec.params
            if remaining == spec.params.max_tokens
            else dataclasses.replace(spec.params, max_tokens=remaining)
        )
        params = variants.skip_params(c, variants.kv_params(c, params))
        if c.kind in ("cloud", "split") or progress.ensemble:
            assert self.cloud is not None
            engine: SplitEngine | EnsembleEngine | None = None
            if progress.ensemble:
                engine = ensemble.engine(progress.ensemble, self.cloud, self.fleet, asyncio.get_running_loop())
            elif c.kind == "split":
                engine = self._split_engine(c, progress)
            try:
                ids = self.cloud.encode(spec.prompt.value, tools_of(spec.prompt.wire))
            except ModelInvalidRequest as exc:
                raise InvalidRequest(str(exc)) from exc
            cont = Continuation(tuple(progress.ids), progress.chars) if progress.ids else None
            progress.prompt_tokens = len(ids)
            progress.dispatched()
            start, first, n, queued_s = time.perf_counter(), 0.0, 0, None
            stream = self.cloud.stream(ids, params, cont, engine) if engine else self.cloud.stream(ids, params, cont)
            async for piece in stream:
                progress.received = time.perf_counter()
                if not n:
                    queued_s = piece.queued_s
                first, n = first or progress.received, n + 1
                progress.skipping = piece.skipping or progress.skipping  # on the last piece
                progress.kv = piece.kv or progress.kv
                yield progress.add(
                    piece.text, piece.token_ids, piece.finish_reason, piece.tokens, piece.index, piece.logprobs,
                    piece.prompt_logprobs, piece.prompt_ids,
                )  # fmt: skip
            progress.received = time.perf_counter()  # the stream's end, relayed as the Final
            if engine is not None:
                progress.energy_j += engine.energy_j  # the agents' stages or members (the hub's own is cloud)
            progress.engine_ttft_ms = (first - start) * 1000 if first else 0.0
            progress.engine_tpot_ms = (progress.received - first) * 1000 / (n - 1) if n > 1 else 0.0
            if queued_s is not None:  # the backend says how long it waited for the model: the rest is prefill
                progress.queue_ms = queued_s * 1000
                progress.prefill_ms = max(0.0, progress.engine_ttft_ms - progress.queue_ms)
                progress.decode_ms = progress.engine_tpot_ms
            elif c.queued == 0:  # nothing ahead of it in the backend: its first token's time is its prefill
                progress.prefill_ms, progress.decode_ms = progress.engine_ttft_ms, progress.engine_tpot_ms
            return
        session = self.fleet.sessions.get(c.device_id)
        if session is None:
            raise Unavailable(f"device {c.device_id} went offline")
        replies = session.run(agent_work(spec, c.model, params, progress))  # the work is on its way now
        progress.dispatched()
        async for received, item in replies:
            progress.received = received
            if type(item) is pb.TokenChunk:
                ids = tuple(item.token_ids)
                if not (item.logprobs or item.prompt_logprobs or item.index or item.finish_reason):
                    yield progress.add(item.text, ids, None, tokens=len(ids))  # the plain hot path
                    continue
                yield progress.add(
                    item.text, ids, item.finish_reason or None, len(ids), item.index,
                    tuple(logprob_of(m) for m in item.logprobs),  # type: ignore[misc]
                    tuple(logprob_of(m) for m in item.prompt_logprobs), tuple(item.prompt_token_ids),
                )  # fmt: skip
            else:
                progress.finish = item.finish_reason
                progress.energy_j += item.metrics.energy_j
                progress.prompt_tokens = item.metrics.prompt_tokens
                progress.engine_ttft_ms, progress.engine_tpot_ms = item.metrics.ttft_ms, item.metrics.tpot_ms
                progress.prefill_ms, progress.decode_ms = item.metrics.prefill_ms, item.metrics.decode_ms
                progress.queue_ms = item.metrics.queue_ms
                progress.energy_measured = item.metrics.energy_measured
                progress.skipping = variants.skip_report(item.metrics)
                kv = kv_report_kwargs(item.metrics)
                progress.kv = KVReport(**kv) if kv is not None else None
