"""MoE² ensembles: k experts answer one request together, their next-token distributions mixed.

The router (cloud_hub.moe2_router, Budget.experts = k > 1) picks the members: the selected subset's
top k experts by the gate that share the top one's tokenizer, with the gate's weights renormalised
over them (Choice.ensemble). Every step, each member computes its next-token logits for the same
prefix, in parallel on its own device, and the hub mixes their distributions:

    p(t) = sum_i w_i softmax(logits_i)(t)        (V,), in float64; `mix` returns log p

To the hub's generator the ensemble is one `models.generate.StepEngine` whose logits are log p, so
sampling, stop strings, logprobs and detokenizing are the hub model's own, as for a split: greedy
decoding takes argmax p, and temperature T samples from p^(1/T) renormalised. The hub's model must
serve the same model as the members, at any precision (`members` checks it).

A member on an agent is a stage over its whole model with `Work.logits` (edge_agent.stage); the
hub's own model as a member runs a local `models.stage.Stage` over all its layers. A member that
drops, stalls or answers with logits of the wrong size raises `Unavailable`, and the request fails
over like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cloud_hub.backends import ServingBackend
from cloud_hub.candidates import Candidate
from cloud_hub.errors import Unavailable
from cloud_hub.estimates import weigh
from cloud_hub.fleet import AgentSession, Fleet
from cloud_hub.registry import model_config
from cloud_hub.router import Choice
from cloud_hub.split import STEP_TIMEOUT_S, Remote, close_stage, next_hidden, on_loop
from models.errors import InvalidRequest
from models.stage import Stage, unpack
from models.transformer import Transformer
from tandem.v1 import tandem_pb2 as pb

log = logging.getLogger("tandem.hub")


def member_lost(device_id: str, message: str) -> Unavailable:
    """Unavailable naming the member that failed (`failed_device`), so that the failover leaves out
    that member, not the ensemble's top expert."""
    exc = Unavailable(message)
    exc.failed_device = device_id  # type: ignore[attr-defined]
    return exc


def mix(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """log(sum_i w_i softmax(logits_i)): (V,) float32 from k (V,) logits and k weights summing to 1.
    In float64, through log-sum-exp, so a member certain of a token that another gives 0 stays exact."""
    if len(logits) != len(weights) or not logits:
        raise ValueError(f"{len(logits)} members' logits for {len(weights)} weights")
    if not math.isclose(sum(weights), 1.0, rel_tol=1e-6) or min(weights) < 0:
        raise ValueError(f"mixing weights must be >= 0 and sum to 1, got {list(weights)}")
    logp = torch.stack([torch.log_softmax(x.to(torch.float64), dim=-1) for x in logits])  # (k, V)
    w = torch.tensor(weights, dtype=torch.float64).log().unsqueeze(1)  # (k, 1); log 0 = -inf drops a member
    return torch.logsumexp(logp + w, dim=0).to(torch.float32)


@dataclass(frozen=True)
class Member:
    """One member of an ensemble: an agent's session (None: the hub's own model), its model, weight."""

    session: AgentSession | None
    model: str
    n_layers: int
    weight: float


class EnsembleEngine:
    """A StepEngine over the members' next-token logits, mixed (module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, members: Sequence[Member], local: Transformer) -> None:
        """`local`: the hub's own model, whose tokenizer decodes the answer (and which runs its member,
        if the hub is one: a member without a session)."""
        if len(members) < 2:
            raise ValueError("an ensemble needs two members at least")
        self.loop, self.members, self.local = loop, list(members), local
        self.weights = [m.weight for m in members]
        self.remotes: dict[int, Remote] = {}
        self._task: asyncio.Task | None = None  # the step under way on the loop
        self.stage: Stage | None = None
        self.energy_j = 0.0
        """Energy the agents' members reported (their WorkDone), once released."""

    # -- StepEngine ------------------------------------------------------------------------------

    def prefill(self, request_id: str, ids: Sequence[int], max_len: int) -> torch.Tensor:
        if self.remotes:  # the service forms no ensemble for n > 1: one prefill a request
            raise RuntimeError("an EnsembleEngine answers one choice; release it before another prefill")
        if any(m.session is None for m in self.members):
            self.stage = Stage(self.local, 0, self.local.cfg.n_layers, max_len)
        return self._step(self._open(list(ids), max_len - len(ids)), list(ids))

    def decode(self, request_id: str, token: int) -> torch.Tensor:
        return self._step(self._send(token), [token])

    def release(self, request_id: str) -> None:
        """Ends every agent member: a clean end collects their WorkDones (energy); a failed request
        cancels them (closing their replies sends Cancel)."""
        on_loop(self.loop, self._close(), len(self.remotes) * STEP_TIMEOUT_S + 5, "ensemble members")

    # -- one step: the agents' logits on the loop while the hub's own member computes here -----------

    def _step(self, remote: Coroutine[Any, Any, dict[int, torch.Tensor]], tokens: list[int]) -> torch.Tensor:
        """`remote` (the agents' logits, on the loop) while the hub's own member, if any, runs `tokens`."""
        future = asyncio.run_coroutine_threadsafe(self._tracked(remote), self.loop)
        try:
            mine = self._local(tokens) if self.stage is not None else None
        except BaseException:
            self._stop(future)  # the agents' step must not run on into release()
            raise
        try:
            theirs = future.result(timeout=STEP_TIMEOUT_S + 5)
        except TimeoutError:
            self._stop(future)
            raise Unavailable("ensemble members: the hub's event loop did not answer") from None
        logits = [mine if m.session is None else theirs[i] for i, m in enumerate(self.members)]
        return mix(logits, self.weights)

    async def _tracked(self, step: Coroutine[Any, Any, dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """`step` run as the task _stop can cancel and wait for."""
        self._task = asyncio.current_task()
        return await step

    def _stop(self, future: object) -> None:
        """Cancel the step under way on the loop and wait, on the loop, until it has ended: its
        TaskGroup has cancelled and awaited every member's read, so release() reads no stream that
        is still being read."""

        async def cancelled() -> None:
            task = self._task
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

        with contextlib.suppress(BaseException):  # its own error is the one being reported
            asyncio.run_coroutine_threadsafe(cancelled(), self.loop).result(timeout=STEP_TIMEOUT_S)

    def _local(self, tokens: list[int]) -> torch.Tensor:
        assert self.stage is not None
        return self.stage.logits(self.stage.run(tokens=tokens))

    async def _open(self, ids: list[int], max_new: int) -> dict[int, torch.Tensor]:
        for i, m in enumerate(self.members):
            if m.session is None:
                continue
            work = pb.Work(model=m.model, layer_start=0, layer_end=m.n_layers, logits=True,
                           sampling=pb.Sampling(max_tokens=max(1, max_new)))  # fmt: skip
            r = Remote(m.session, 0, m.n_layers)
            work.work_id = r.work_id
            work.input.tokens.ids.extend(ids)
            r.replies = m.session.run(work)
            self.remotes[i] = r
        return await self._gather()

    async def _send(self, token: int) -> dict[int, torch.Tensor]:
        for r in self.remotes.values():
            try:
                r.session.send_input(pb.StageInput(work_id=r.work_id, token_ids=[token]))
            except Exception as exc:  # HubError: the session ended
                raise member_lost(r.session.device_id, f"ensemble member on {r.session.device_id} lost: {exc}") from exc
        return await self._gather()

    async def _gather(self) -> dict[int, torch.Tensor]:
        """Every agent member's next logits, waited for together: (V,) float32 each, by member index.
        The first member to fail cancels the others' waits (a TaskGroup) before its error goes up, so
        that release() finds no reply stream still being read."""
        keys = list(self.remotes)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._logits(self.remotes[i])) for i in keys]
        except* Unavailable as failed:
            raise failed.exceptions[0] from None
        return {i: t.result() for i, t in zip(keys, tasks, strict=True)}

    async def _logits(self, r: Remote) -> torch.Tensor:
        device = r.session.device_id
        where = f"ensemble member on {device}"
        try:
            item = await next_hidden(r, where)
        except Unavailable as exc:
            raise member_lost(device, str(exc)) from exc
        try:
            if len(item.shape) != 3 or item.shape[1] != 1:
                raise InvalidRequest(f"logits.shape: expected (1, 1, {self.vocab}), got {tuple(item.shape)}")
            logits = unpack(item.shape, item.dtype, item.data, self.vocab).reshape(-1)
            if not bool(torch.isfinite(logits).any()) or bool(torch.isnan(logits).any()):
                raise InvalidRequest("logits: NaN, or no finite value")
            return logits
        except InvalidRequest as exc:  # refused; the request fails over, the hub keeps serving
            raise member_lost(device, f"{where} sent malformed logits: {exc}") from exc

    @property
    def vocab(self) -> int:
        """The vocabulary every member's logits must span: the hub model's (its tokenizer decodes)."""
        return self.local.cfg.vocab_size

    async def _close(self) -> None:
        for r in self.remotes.values():  # every member is ended, whatever one of them does
            try:
                done = await close_stage(r)
            except Exception as exc:
                log.warning("ensemble member on %s did not end cleanly: %s", r.session.device_id, exc)
                continue
            if done is not None:
                self.energy_j += done.metrics.energy_j


# -- what the hub's service asks of an ensemble ---------------------------------------------------------


def members(choice: Choice, cloud: ServingBackend | None, fleet: Fleet) -> tuple[tuple[Candidate, float], ...]:
    """The router's ensemble (Choice.ensemble) where the hub can mix it: two members at least, each
    the hub's own model or an agent's serving the same model as the hub (the same tokenizer: the
    hub's decodes the answer), at whatever precision. Otherwise none: the request runs on its top
    expert alone (for n > 1 the service asks for none: one prefill per ensemble)."""
    chosen = choice.ensemble
    if len(chosen) < 2 or cloud is None or not hasattr(cloud, "served"):
        return ()
    own = cloud.model_info().name
    for m, _ in chosen:
        info = model_info(m, cloud, fleet)
        why = (
            "a split" if m.split is not None
            else "gone" if info is None
            else f"serves {info.name}, not the hub's {own}" if info.name != own
            else ""
        )  # fmt: skip
        if why:
            log.info("ensemble of %s not mixed (%s: %s); its top expert answers alone",
                     [x.device_id or "cloud" for x, _ in chosen], m.device_id or "cloud", why)  # fmt: skip
            return ()
    return chosen


def model_info(c: Candidate, cloud: ServingBackend | None, fleet: Fleet) -> pb.ModelInfo | None:
    """What candidate `c` serves, as its device (or the hub) advertises it; None when it is gone."""
    if c.kind == "cloud":
        return cloud.model_info() if cloud is not None else None
    session = fleet.sessions.get(c.device_id)
    return next((m for m in session.models if m.name == c.model), None) if session is not None else None


def placements(choice: Choice, tokens: int, remaining: int, template: int, quantile: float) -> list[pb.Placement]:
    """One Placement per member of `choice`'s ensemble, each with its own prediction (estimates.weigh,
    admitted at the hub's `quantile`) and the selected experts' weights."""
    experts = [pb.ExpertWeight(expert=e, weight=w) for e, w in choice.experts]
    out = []
    for m, _ in choice.ensemble:
        est, adm = weigh(m, tokens, remaining, template, quantile)
        out.append(
            pb.Placement(
                kind=m.kind, device_id=m.device_id, profile=m.profile.name, model=m.model, emulated=m.emulated,
                predicted_ttft_ms=est.ttft_ms, predicted_tpot_ms=est.tpot_ms, predicted_energy_j=est.edge_energy_j,
                admitted_ttft_ms=adm.ttft_ms, admitted_tpot_ms=adm.tpot_ms, quantile=choice.quantile,
                experts=experts,
            )
        )  # fmt: skip
    return out


def engine(
    chosen: Sequence[tuple[Candidate, float]],
    cloud: ServingBackend | None,
    fleet: Fleet,
    loop: asyncio.AbstractEventLoop,
) -> EnsembleEngine:
    """The engine that mixes `chosen` (from `members`): agents over their work channels, the hub's own
    model here. Raises Unavailable when a member went offline meanwhile."""
    assert cloud is not None
    out = []
    for m, w in chosen:
        info = model_info(m, cloud, fleet)
        session = fleet.sessions.get(m.device_id) if m.kind != "cloud" else None
        if info is None or (m.kind != "cloud" and (session is None or session.closed)):
            raise Unavailable(f"ensemble member {m.device_id or 'cloud'} went offline")
        out.append(Member(session, m.model, model_config(info).n_layers, w))
    return EnsembleEngine(loop, out, cloud.served.loaded.model)  # type: ignore[attr-defined]
