"""Decode steps replayed from a CUDA graph: one launch a token instead of about 25 a layer.

At batch 1 a small model's decode step on a GPU is a few hundred tiny kernels, each of which
takes the CPU longer to launch than the GPU takes to run it. Capturing the whole step (embedding,
every layer, head) once and replaying it removes the launch cost. The step must have fixed
shapes and must never read a value back to the host: Transformer.forward_fixed is that step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.kv_cache import KVCache
from models.transformer import Transformer


def decode_step(model: Transformer, token: Tensor, position: Tensor) -> Tensor:
    """(V,) logits of token (1, 1) at cache slot position (1,), through every layer."""
    return model.head(model.forward_fixed(model.embed(token), position))[0, -1]


class DecodeGraph:
    """One captured decode step over one set of KV caches.

    The graph reads its inputs from two static tensors (`token`, `position`) and writes `logits`;
    it is bound to the caches and RoPE tables it was captured with, so an engine keeps the graph
    with them and may hand all three to a later request of the same cache length.
    """

    WARMUP = 3  # runs before capture: cuBLAS allocates its workspace, torch.compile compiles

    def __init__(
        self, model: Transformer, token: int, position: int, step: Callable[..., Tensor] = decode_step
    ) -> None:
        """`step`: decode_step, or a torch.compile of it (the graph then captures its fused kernels)."""
        device = model.norm.weight.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, not {device}")
        self.model = model
        # The buffers the graph reads and writes by address: kept alive with it, handed on with it.
        self.caches: list[KVCache | None] = list(model.caches)
        self.rope = model.rope
        self.max_len = model.max_len
        self.step = step
        self._check(position)  # the warm-up below writes this slot
        self.token = torch.full((1, 1), token, dtype=torch.long, device=device)
        self.position = torch.full((1,), position, dtype=torch.long, device=device)
        # Warm up on a side stream, as capture requires; these runs write this token's true keys
        # and values, which the first replay writes again.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()  # (V,), rewritten by every replay

    def _check(self, position: int) -> None:
        # On the host: a slot beyond the cache would be a device-side assert, fatal to the context.
        if not 0 <= position < self.max_len:
            raise ValueError(f"cache slot {position} beyond the cache of {self.max_len} slots")

    def _step(self) -> Tensor:
        return self.step(self.model, self.token, self.position)

    def run(self, token: int, position: int) -> Tensor:
        """(V,) logits of `token` at cache slot `position`, its keys and values written."""
        self._check(position)
        self.token.fill_(token)
        self.position.fill_(position)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites self.logits
