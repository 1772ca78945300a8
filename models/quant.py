"""Weight-only quantization of the transformer's linear layers (round to nearest, no calibration).

- int8: symmetric, one scale per output channel (and per group when group_size is set).
- int4: asymmetric, one scale and one minimum per group of `group_size` input weights, two weights
  packed in a byte.

`QuantLinear` keeps the compressed weights and dequantizes them for each matmul: this cuts memory
and bundle size, not time (torch's packed int kernels were slower than fp32 at batch 1 here; fast
kernels belong to the engines). The embedding and the output head (tied to it) stay fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.errors import InvalidRequest
from models.transformer import Transformer

QUANTIZED = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w_gate",
    "feed_forward.w_up",
    "feed_forward.w_down",
)


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T. Buffers: q (packed codes), scale and, for int4, minimum; per group."""

    def __init__(self, weight: Tensor, bits: int, group_size: int) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        if bits not in (4, 8):
            raise InvalidRequest(f"quantization bits must be 4 or 8, got {bits}")
        if group_size <= 0 or in_f % group_size:
            raise InvalidRequest(f"group size {group_size} does not divide the input width {in_f}")
        self.bits, self.group_size, self.shape = bits, group_size, (out_f, in_f)
        w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)  # (O, G, g)
        if bits == 8:
            scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
            q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
            self.register_buffer("minimum", torch.zeros(0))
        else:
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp(min=1e-12)
            codes = torch.round((w - lo) / scale).clamp(0, 15).to(torch.uint8).reshape(out_f, -1)
            q = codes[:, 0::2] | (codes[:, 1::2] << 4)  # two 4-bit codes a byte
            self.register_buffer("minimum", lo.to(torch.float16))
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.to(torch.float16))

    @classmethod
    def empty(cls, out_features: int, in_features: int, bits: int, group_size: int) -> QuantLinear:
        """A layer of the right shapes, to load a saved state dict into."""
        return cls(torch.zeros(out_features, in_features), bits, group_size)

    def codes(self) -> Tensor:
        """(O, I) integer codes, unpacked: int8 in [-127, 127], or uint8 in [0, 15] for int4.
        Weight = code * scale (+ minimum for int4), scale and minimum per (row, group): (O, G, 1)."""
        out_f, in_f = self.shape
        if self.bits == 8:
            return self.q.reshape(out_f, in_f)
        return torch.stack([self.q & 0x0F, self.q >> 4], dim=-1).reshape(out_f, in_f)

    def dequantize(self) -> Tensor:
        out_f, in_f = self.shape
        w = self.codes().reshape(out_f, -1, self.group_size).float() * self.scale.float()
        if self.bits == 4:
            w = w + self.minimum.float()
        return w.reshape(out_f, in_f)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.q, self.scale, self.minimum))


def quantize_model(model: Transformer, bits: int, group_size: int | None = None, empty: bool = False) -> Transformer:
    """Replace the blocks' linear layers with QuantLinear, in place; returns the model.

    group_size defaults to the whole row for int8 (per-channel) and 32 for int4. With empty, the
    layers get zero weights of the right shapes (to load a saved quantized state dict into).
    """
    for block in model.layers:
        for name in QUANTIZED:
            parent_name, attr = name.split(".")
            parent = getattr(block, parent_name)
            linear = getattr(parent, attr)
            size = group_size or (linear.weight.shape[1] if bits == 8 else 32)
            if empty:
                setattr(parent, attr, QuantLinear.empty(*linear.weight.shape, bits, size))
            else:
                setattr(parent, attr, QuantLinear(linear.weight, bits, size))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights as stored (quantized layers at their packed size)."""
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    quantized_params = {id(b) for m in quant for b in m.buffers()}
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in quantized_params)
    return dense + sum(m.nbytes() for m in quant)
