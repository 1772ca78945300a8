"""The hub's side of split inference: a request whose first layers run on agents, the rest here.

A split plan is an ordered list of stages, each a contiguous layer range: agents' ranges first (in
pipeline order), then the hub's own model's, which ends the model and applies the head. To the
hub's generator the whole pipeline is one `models.generate.StepEngine`: `SplitEngine.prefill`
sends the prompt's ids to the first stage, relays each stage's hidden states to the next, runs its
own layers and returns the logits; `decode` does the same for one token. Sampling, stop strings,
logprobs and detokenizing stay the hub model's own (`LocalModelBackend.stream(engine=...)`), so a
split answer is made exactly as an unsplit one, from the same weights.

The generator runs in a worker thread; every touch of an agent's session goes through the hub's
event loop (`asyncio.run_coroutine_threadsafe`). A stage that drops, times out, or sends hidden
states of the wrong shape or dtype raises `Unavailable`, and the request fails over like any other
(`HubService`: the next placement re-prefills the prompt and the tokens so far, which rebuilds the
KV of every layer it holds).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from cloud_hub.errors import HubError, Unavailable
from cloud_hub.fleet import AgentSession
from models.errors import InvalidRequest
from models.stage import Stage, pack, unpack
from models.transformer import Transformer
from tandem.v1 import tandem_pb2 as pb

T = TypeVar("T")

STEP_TIMEOUT_S = 30.0
"""How long the hub waits for one stage's answer to one input before it counts the stage as lost."""


MEASURABLE_MS = 2.0
"""A prompt transfer shorter than this (after the round trip and the stage's prefill) says nothing
reliable about the link's bandwidth: the measurement is skipped."""


def measure_uplink(session: AgentSession, n_bytes: int, elapsed_ms: float, prefill_ms: float) -> float | None:
    """Fold one prompt transfer into the session's measured uplink (a moving average): the time from
    sending a stage its input to its prompt's hidden states arriving, less the round trip and the
    stage's own prefill, carried `n_bytes`. Returns the sample in Mbit/s (None: too short to tell)."""
    rtt = session.rtt_ms or 0.0
    transfer_ms = elapsed_ms - rtt - prefill_ms
    if transfer_ms < MEASURABLE_MS or n_bytes <= 0:
        return None
    mbps = 8 * n_bytes / (transfer_ms * 1000)
    session.uplink_mbps = mbps if session.uplink_mbps is None else 0.5 * session.uplink_mbps + 0.5 * mbps
    return mbps


def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
    """Run `coro` on the hub's loop from a worker thread and wait for it, at most `timeout` seconds (a
    loop that stops, the hub shutting down, must not strand the thread). Raises Unavailable naming
    `what` when it does not answer."""
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        future.cancel()
        raise Unavailable(f"{what}: the hub's event loop did not answer") from None


async def next_hidden(r: Remote, where: str) -> pb.HiddenStates:
    """A stage's next HiddenStates. Raises Unavailable naming `where` when the stage is lost, slow
    past STEP_TIMEOUT_S, or answers with something else."""
    assert r.replies is not None
    try:
        _, item = await asyncio.wait_for(anext(r.replies), STEP_TIMEOUT_S)
    except TimeoutError:
        raise Unavailable(f"{where}: no answer within {STEP_TIMEOUT_S:g} s") from None
    except StopAsyncIteration:
        raise Unavailable(f"{where}: ended early") from None
    except HubError as exc:
        raise Unavailable(f"{where}: {exc}") from exc
    if type(item) is not pb.HiddenStates:
        raise Unavailable(f"{where}: sent {type(item).__name__}, not hidden states")
    return item


async def close_stage(r: Remote) -> pb.WorkDone | None:
    """End a stage: its WorkDone on a clean end (None if it cannot say goodbye), and its replies
    closed either way (which sends Cancel if it had not finished)."""
    if r.replies is None:
        return None
    try:
        r.session.send_input(pb.StageInput(work_id=r.work_id, end=True))
        _, item = await asyncio.wait_for(anext(r.replies), STEP_TIMEOUT_S)
        return item if type(item) is pb.WorkDone else None
    except (HubError, TimeoutError, StopAsyncIteration):
        return None  # the answer is complete; a stage that cannot say goodbye is cancelled below
    finally:
        await r.replies.aclose()


@dataclass
class Remote:
    """One agent's stage of one request: its session, its layers, and its replies as they come."""

    session: AgentSession
    start: int
    end: int
    work_id: str = field(default_factory=lambda: os.urandom(16).hex())
    replies: AsyncIterator | None = None
    done: pb.WorkDone | None = None
    prompt_s: float = 0.0
    """From sending its first input to its prompt's hidden states arriving."""
    prompt_bytes: int = 0
    """What those hidden states took on the wire."""


class SplitEngine:
    """A StepEngine over agents' stages and this hub's own layers [local_start, N)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        remotes: Sequence[tuple[AgentSession, int, int]],
        model: Transformer,
        model_name: str,
        local_start: int,
        dtype: str = "float16",
    ) -> None:
        if not remotes:
            raise ValueError("a split needs at least one agent stage")
        ends = [0] + [e for _, _, e in remotes]
        if [s for _, s, _ in remotes] != ends[:-1] or ends[-1] != local_start:
            ranges = [(s, e) for _, s, e in remotes]
            raise ValueError(f"stages must be contiguous from layer 0 to {local_start}: {ranges}")
        self.loop, self.model, self.model_name, self.dtype = loop, model, model_name, dtype
        self.remotes = [Remote(session, start, end) for session, start, end in remotes]
        self.local_start = local_start
        self.local: Stage | None = None
        self._last_bytes = 0
        self.energy_j = 0.0
        """Energy the agents' stages reported (their WorkDone), once released."""

    # -- StepEngine ------------------------------------------------------------------------------

    def prefill(self, request_id: str, ids: Sequence[int], max_len: int) -> torch.Tensor:
        self.local = Stage(self.model, self.local_start, self.model.cfg.n_layers, max_len)
        h = self._call(self._open(list(ids), max_len - len(ids)))
        return self._finish(h)

    def decode(self, request_id: str, token: int) -> torch.Tensor:
        return self._finish(self._call(self._step(token)))

    def release(self, request_id: str) -> None:
        """Ends every stage: a clean end collects their WorkDones (energy); a failed request cancels
        them (closing their replies sends Cancel)."""
        self._call(self._close())

    # -- the relay, on the event loop ----------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return on_loop(self.loop, coro, len(self.remotes) * STEP_TIMEOUT_S + 5, "split stages")

    def _finish(self, h: torch.Tensor | None) -> torch.Tensor:
        """The hub's own layers on the last stage's output, then the head: (V,) logits."""
        assert self.local is not None and h is not None  # the constructor holds one agent stage at least
        return self.local.logits(self.local.run(hidden=h))

    async def _open(self, ids: list[int], max_new: int) -> torch.Tensor | None:
        h: torch.Tensor | None = None
        for r in self.remotes:
            work = pb.Work(
                work_id=r.work_id,
                model=self.model_name,
                layer_start=r.start,
                layer_end=r.end,
                hidden_dtype=self.dtype,
                sampling=pb.Sampling(max_tokens=max(1, max_new)),
            )
            if r.start == 0:
                work.input.tokens.ids.extend(ids)
            else:
                work.hidden.CopyFrom(self._message(r, h))
            sent = time.perf_counter()
            r.replies = r.session.run(work)
            h = await self._hidden(r)
            r.prompt_s, r.prompt_bytes = time.perf_counter() - sent, self._last_bytes
        return h

    async def _step(self, token: int) -> torch.Tensor | None:
        h: torch.Tensor | None = None
        for r in self.remotes:
            try:
                if r.start == 0:
                    r.session.send_input(pb.StageInput(work_id=r.work_id, token_ids=[token]))
                else:
                    r.session.send_input(pb.StageInput(work_id=r.work_id, hidden=self._message(r, h)))
            except HubError as exc:
                raise Unavailable(f"split stage on {r.session.device_id} lost: {exc}") from exc
            h = await self._hidden(r)
        return h

    def _message(self, r: Remote, h: torch.Tensor | None) -> pb.HiddenStates:
        assert h is not None
        shape, data = pack(h, self.dtype)
        return pb.HiddenStates(work_id=r.work_id, layer_end=r.start, shape=shape, dtype=self.dtype, data=data)

    async def _hidden(self, r: Remote) -> torch.Tensor:
        """The stage's next answer, as (1, T, D) float32. Raises Unavailable when the stage is lost,
        slow past STEP_TIMEOUT_S, or answers with something other than hidden states of its width."""
        where = f"split stage [{r.start}, {r.end}) on {r.session.device_id}"
        item = await next_hidden(r, where)
        self._last_bytes = len(item.data)
        try:
            return unpack(item.shape, item.dtype, item.data, self.model.cfg.dim)
        except InvalidRequest as exc:  # refused; the request fails over, the hub keeps serving
            raise Unavailable(f"{where} sent malformed hidden states: {exc}") from exc

    async def _close(self) -> None:
        for r in self.remotes:
            r.done = await close_stage(r)
            if r.done is not None:
                self.energy_j += r.done.metrics.energy_j
                measure_uplink(r.session, r.prompt_bytes, r.prompt_s * 1000, r.done.metrics.prefill_ms)
