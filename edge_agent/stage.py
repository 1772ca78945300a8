"""The agent's side of split inference: one stage (a layer range) of a request the hub splits.

The hub opens a stage with a Work naming [layer_start, layer_end) and its first input (the prompt's
token ids for a stage from layer 0, else the previous stage's hidden states). The stage answers each
input with a HiddenStates of its last layer's output, takes the next input from the hub's
StageInput messages (one token, or one position's hidden state), and on `end` answers with a
WorkDone carrying its compute times and energy. Its layers' KV cache lives as long as the stage;
the model's serving lock is held throughout, as for any request the agent runs.

A MoE² ensemble member is a stage over the whole model with `Work.logits`: it answers each input
with its last position's next-token logits, (1, 1, V) float32, which the hub mixes with the other
members' (cloud_hub.ensemble).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch

from models.errors import InvalidRequest
from models.serving import ServedModel
from models.stage import Stage, pack, unpack
from models.threads import GOVERNOR
from tandem.v1 import tandem_pb2 as pb

IDLE_S = 60.0
"""A stage waits this long for its next input before giving up (the hub lost track of it)."""


def hidden_message(work_id: str, layer_end: int, h: object, dtype: str) -> pb.HiddenStates:
    shape, data = pack(h, dtype)  # type: ignore[arg-type]
    return pb.HiddenStates(work_id=work_id, layer_end=layer_end, shape=shape, dtype=dtype, data=data)


def logits_message(work_id: str, layer_end: int, logits: torch.Tensor) -> pb.HiddenStates:
    """(V,) next-token logits as the (1, 1, V) float32 HiddenStates an ensemble member answers with."""
    return hidden_message(work_id, layer_end, logits.reshape(1, 1, -1), "float32")


def serve_stage(
    served: ServedModel,
    work: pb.Work,
    inputs: queue.Queue,
    cancel: threading.Event,
    send: Callable[[pb.AgentMessage], None],
    power_w: float,
) -> pb.AgentMessage | None:
    """Run one stage until the hub ends it (its WorkDone is returned) or cancels it (None). `inputs`
    holds StageInput messages (None wakes it to see `cancel`); `send` hands a message to the work
    channel from this thread. Raises InvalidRequest for a malformed input (the agent reports it)."""
    cfg = served.loaded.config
    start, end = work.layer_start, work.layer_end
    if work.model and work.model != served.name:
        raise InvalidRequest(f"work.model: this agent serves {served.name!r}, not {work.model!r}")
    if work.logits and (start != 0 or end != cfg.n_layers):
        raise InvalidRequest(f"work.logits: a stage answers with logits only over the whole model [0, {cfg.n_layers})")
    if start == 0:
        first_ids = list(work.input.tokens.ids)
        if not first_ids:
            raise InvalidRequest("a stage from layer 0 takes the prompt's token ids in work.input")
        first_len = len(first_ids)
    else:
        first_len = work.hidden.shape[1] if len(work.hidden.shape) == 3 else 0
    max_len = min(cfg.context_length, first_len + max(1, work.sampling.max_tokens))
    dtype = work.hidden_dtype or "float16"
    with served.lock:
        stage = Stage(served.loaded.model, start, end, max_len)

        def compute(tokens: list[int], hidden: pb.HiddenStates) -> pb.HiddenStates:
            """One input (token ids from layer 0, else hidden states) through the stage: its answer."""
            with GOVERNOR.computing_here():  # counted while computing, not while waiting for inputs
                if start == 0:
                    h = stage.run(tokens=tokens)
                else:
                    h = stage.run(hidden=unpack(hidden.shape, hidden.dtype, hidden.data, cfg.dim))
                if work.logits:  # an ensemble member: its next-token logits, for the hub to mix
                    return logits_message(work.work_id, end, stage.logits(h))
                return hidden_message(work.work_id, end, h, dtype)

        began = time.perf_counter()
        first = compute(list(work.input.tokens.ids), work.hidden)
        prefill_s = time.perf_counter() - began
        send(pb.AgentMessage(hidden=first))
        steps, decode_s = 0, 0.0
        while True:
            try:
                item = inputs.get(timeout=IDLE_S)
            except queue.Empty:
                raise InvalidRequest(f"stage {work.work_id}: no input from the hub for {IDLE_S:g} s") from None
            if cancel.is_set() or item is None:
                return None
            if item.end:
                break
            t0 = time.perf_counter()
            message = compute(list(item.token_ids), item.hidden)
            decode_s += time.perf_counter() - t0
            steps += 1
            send(pb.AgentMessage(hidden=message))
    busy = prefill_s + decode_s
    metrics = pb.Metrics(
        prompt_tokens=first_len,
        completion_tokens=steps,
        prefill_ms=prefill_s * 1000,
        decode_ms=decode_s * 1000 / steps if steps else 0.0,
        energy_j=power_w * busy,
    )
    return pb.AgentMessage(done=pb.WorkDone(work_id=work.work_id, finish_reason="stage", metrics=metrics))
