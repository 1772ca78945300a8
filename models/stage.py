"""One request's share of a split model: layers [start, end) of a loaded model, and hidden states on
the wire.

A split request runs the same model on several machines, each a contiguous layer range: the first
stage embeds tokens, the last applies the head. Each stage keeps the KV cache of its own layers,
so after the prompt every decode step moves one (1, 1, D) hidden state per stage boundary. Hidden
states travel as little-endian bytes of one of `DTYPES`: fp32 as it is; fp16 (half the bytes) and
int8 (a quarter, at a small cost in exactness) scaled by one fp32 per position (see _TOP).

    stage = Stage(model, 0, k, max_len)      # agent: layers [0, k)
    h = stage.run(tokens=ids)                # (1, T, D) after layer k - 1
    last = Stage(model, k, N, max_len)       # hub: layers [k, N) and the head
    logits = last.logits(last.run(hidden=h)) # (V,)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from models.errors import InvalidRequest
from models.transformer import Step, Transformer

DTYPES = ("float32", "float16", "int8")
"""Wire formats of hidden states: raw values, or int8 with a float32 scale per position first."""


_TOP = {"float16": 32768.0, "int8": 127.0}
"""What each scaled format maps a position's absmax to: int8's largest value; 2**15 for fp16, whose
range (6e-5 to 65504) then holds the small components too. Scaled because Gemma 3's residual stream
grows past 65504 (1e5 by its middle layers): plain fp16 turns it into inf."""


def pack(h: Tensor, dtype: str) -> tuple[list[int], bytes]:
    """(B, T, D) hidden states -> (shape, bytes) in `dtype` (DTYPES). float16 and int8 are scaled:
    B*T float32 scales (a position's absmax / _TOP), then the B*T*D values divided by them."""
    if dtype not in DTYPES:
        raise InvalidRequest(f"hidden-state dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
    x = h.detach().to("cpu", torch.float32).contiguous()
    shape = list(x.shape)
    if dtype == "float32":
        return shape, x.numpy().astype("<f4").tobytes()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / _TOP[dtype]  # (B, T, 1)
    scaled = x / scale
    values = torch.round(scaled).clamp(-127, 127).to(torch.int8) if dtype == "int8" else scaled.to(torch.float16)
    return shape, scale.numpy().astype("<f4").tobytes() + values.numpy().tobytes()


def unpack(shape: Sequence[int], dtype: str, data: bytes, dim: int) -> Tensor:
    """The (B, T, D) float32 tensor that `pack` made. Raises InvalidRequest naming what is wrong: a
    shape that is not (1, T, dim) with T >= 1, an unknown dtype, or a byte count that does not match."""
    if dtype not in DTYPES:
        raise InvalidRequest(f"hidden.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if len(shape) != 3 or shape[0] != 1 or shape[1] < 1 or shape[2] != dim:
        raise InvalidRequest(f"hidden.shape: expected (1, T, {dim}) with T >= 1, got {tuple(shape)}")
    n = shape[1] * dim
    want = {"float32": 4 * n, "float16": 4 * shape[1] + 2 * n, "int8": 4 * shape[1] + n}[dtype]
    if len(data) != want:
        raise InvalidRequest(f"hidden.data: {len(data)} bytes for shape {tuple(shape)} in {dtype}; expected {want}")
    if dtype == "float32":
        return torch.from_numpy(np.frombuffer(data, "<f4").reshape(shape).copy())
    scale = np.frombuffer(data, "<f4", shape[1]).reshape(1, shape[1], 1)
    values = np.frombuffer(data, "<f2" if dtype == "float16" else np.int8, n, offset=4 * shape[1]).reshape(shape)
    return torch.from_numpy(values.astype(np.float32) * scale)


class Stage:
    """Layers [start, end) of `model` for one request, with their KV cache for `max_len` positions.
    Not thread-safe, and it owns the model's caches while it runs: hold the model's serving lock."""

    def __init__(self, model: Transformer, start: int, end: int, max_len: int) -> None:
        n = model.cfg.n_layers
        if not 0 <= start < end <= n:
            raise InvalidRequest(f"layer range [{start}, {end}) is not a non-empty range within [0, {n})")
        if not 1 <= max_len <= model.cfg.context_length:
            raise InvalidRequest(f"max_len {max_len} outside [1, {model.cfg.context_length}] (the context)")
        self.model, self.start, self.end, self.max_len = model, start, end, max_len
        self.pos = 0
        model.setup_cache(1, max_len)

    @property
    def last(self) -> bool:
        """This stage ends the model: its output goes through the head."""
        return self.end == self.model.cfg.n_layers

    @torch.inference_mode()
    def run(self, tokens: Sequence[int] | None = None, hidden: Tensor | None = None) -> Tensor:
        """The next positions: token ids (a stage from layer 0) or (1, T, D) hidden states (any
        other) -> (1, T, D) hidden states after layer end - 1. Raises InvalidRequest for the wrong
        kind of input, or past max_len."""
        if (self.start == 0) != (tokens is not None) or (tokens is None) == (hidden is None):
            want = "token ids" if self.start == 0 else "hidden states"
            raise InvalidRequest(f"a stage from layer {self.start} takes {want}")
        if tokens is not None:
            vocab = self.model.cfg.vocab_size
            if not tokens or not all(0 <= t < vocab for t in tokens):
                raise InvalidRequest(f"token_ids: must be 1 or more ids in [0, {vocab})")
            h = self.model.embed(torch.tensor([list(tokens)], dtype=torch.long))
        else:
            assert hidden is not None
            h = hidden.to(self.model.norm.weight.dtype)
        t = h.shape[1]
        if self.pos + t > self.max_len:
            raise InvalidRequest(f"{self.pos + t} positions exceed this stage's {self.max_len}")
        out = self.model.forward_layers(h, Step.at(self.pos, t), self.start, self.end)
        self.pos += t
        return out

    @torch.inference_mode()
    def logits(self, h: Tensor) -> Tensor:
        """(1, T, D) output of the last stage -> (V,) logits of its last position."""
        if not self.last:
            raise InvalidRequest(f"layers [{self.start}, {self.end}) do not end the model: no head here")
        return self.model.head(h[:, -1])[0]
