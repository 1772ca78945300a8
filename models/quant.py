"""Weight-only quantization of the transformer's weights (round to nearest, no calibration).

- int8: symmetric, one scale per output channel (or per group when group_size is set).
- int4: asymmetric, one scale and one minimum per group of `group_size` inputs (a multiple of 32),
  two codes a byte. GGUF's Q4_1 blocks (32 weights, w = d*q + m) land exactly on this grid, so a
  Q4_1 model quantized to int4 g32 keeps its own weights.
- The token embedding (and the output head tied to it) goes to int8 with a scale per 32 inputs:
  GGUF's Q8_0, exact for SmolLM2 whose embedding is stored that way.

Scales and minima are fp16 and are rounded before the codes are chosen, so dequantization
reproduces the grid the codes were picked on. On CPU the layers run on our kernels
(models/kernels: int16 activations, so results stay within ~1e-5 of the fp32 product of the same
weights); elsewhere, or without a C compiler, they dequantize for each matmul.

int4 codes are packed per block of 32 inputs: byte j of a block holds code j in its low nibble and
code j + 16 in its high nibble (GGUF's own block order).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import kernels, pages
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
T = TypeVar("T")
MATVEC_ROWS = 8  # up to this many input rows run as matrix-vector products; more run the GEMM
PACK_ROWS = 4096  # rows packed for the kernels per piece (a multiple of 4)
SMALL_BYTES = 1 << 16  # pack_for_kernels copies mapped tensors up to this size (norms), never weights


def _pack4(codes: Tensor) -> Tensor:
    """(O, I) codes 0..15 -> (O, I/2) bytes in the block-of-32 layout."""
    out_f, in_f = codes.shape
    c = codes.reshape(out_f, in_f // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(out_f, in_f // 2).contiguous()


def _unpack4(q: Tensor, out_f: int, in_f: int) -> Tensor:
    b = q.reshape(out_f, in_f // 32, 16)
    return torch.cat([b & 0x0F, b >> 4], dim=-1).reshape(out_f, in_f)


class QuantLinear(nn.Module):
    """y = x @ W^T with W = code * scale (+ minimum). Buffers: q (packed codes), scale and, for
    int4, minimum, each (O, G, 1) fp16 for G groups a row."""

    def __init__(self, weight: Tensor | tuple[int, int], bits: int, group_size: int) -> None:
        """`weight`: the (O, I) weight to quantize, or just its shape for an empty layer (zeros,
        to load a saved state dict into without ever holding the fp32 weight)."""
        super().__init__()
        out_f, in_f = weight if isinstance(weight, tuple) else weight.shape
        if bits not in (4, 8):
            raise InvalidRequest(f"quantization bits must be 4 or 8, got {bits}")
        if group_size <= 0 or in_f % group_size:
            raise InvalidRequest(f"group size {group_size} does not divide the input width {in_f}")
        if bits == 4 and group_size % 32:
            raise InvalidRequest(f"int4 group size must be a multiple of 32, got {group_size}")
        self.bits, self.group_size, self.shape = bits, group_size, (out_f, in_f)
        if isinstance(weight, tuple):
            packed = (out_f, in_f) if bits == 8 else (out_f, in_f // 2)
            self.register_buffer("q", torch.zeros(packed, dtype=torch.int8 if bits == 8 else torch.uint8))
            self.register_buffer("scale", torch.zeros(out_f, in_f // group_size, 1, dtype=torch.float16))
            groups = (out_f, in_f // group_size, 1) if bits == 4 else (0,)
            self.register_buffer("minimum", torch.zeros(groups, dtype=torch.float16))
            return
        w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)  # (O, G, g)
        if bits == 8:
            scale = (w.abs().amax(-1, keepdim=True) / 127).half().float().clamp(min=1e-7)
            q = torch.round(w / scale).clamp(-127, 127).to(torch.int8).reshape(out_f, in_f)
            self.register_buffer("minimum", torch.zeros(0))
        else:
            lo = w.amin(-1, keepdim=True).half().float()
            scale = ((w.amax(-1, keepdim=True) - lo) / 15).half().float().clamp(min=1e-7)
            codes = torch.round((w - lo) / scale).clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
            q = _pack4(codes)
            self.register_buffer("minimum", lo.half())
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.half())

    @classmethod
    def empty(cls, out_features: int, in_features: int, bits: int, group_size: int) -> QuantLinear:
        """A layer of the right shapes, to load a saved state dict into."""
        return cls((out_features, in_features), bits, group_size)

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, minimum: Tensor | None = None) -> QuantLinear:
        """A layer holding exactly these codes (a GGUF's own: models.source_quant). `codes` (O, I):
        int8 codes in [-128, 127] when `minimum` is None, else int4 codes in [0, 15]; `scale` and
        `minimum` (O, G) or (O, G, 1), one per group of I/G inputs, stored as fp16 (rounded here).
        Raises InvalidRequest for codes out of range or groups the layer cannot hold."""
        out_f, in_f = codes.shape
        groups = scale.shape[1]  # (O, G) or (O, G, 1)
        bits = 8 if minimum is None else 4
        lo, hi = (-128, 127) if bits == 8 else (0, 15)
        if codes.numel() and not (lo <= int(codes.min()) and int(codes.max()) <= hi):
            raise InvalidRequest(f"int{bits} codes must lie in [{lo}, {hi}]")
        group = in_f // groups if groups and in_f % groups == 0 else 0  # 0: refused by the constructor
        with torch.device("meta"):  # shapes checked, no zeros allocated: every buffer is replaced below
            layer = cls((out_f, in_f), bits, group)
        layer.q = codes.to(torch.int8) if bits == 8 else _pack4(codes.to(torch.uint8))
        layer.scale = scale.reshape(out_f, groups, 1).half()
        layer.minimum = torch.zeros(0) if minimum is None else minimum.reshape(out_f, groups, 1).half()
        return layer

    def codes(self) -> Tensor:
        """(O, I) integer codes, unpacked: int8 in [-127, 127], or uint8 in [0, 15] for int4.
        Weight = code * scale (+ minimum for int4), scale and minimum per (row, group): (O, G, 1)."""
        out_f, in_f = self.shape
        return self.q.reshape(out_f, in_f) if self.bits == 8 else _unpack4(self.q, out_f, in_f)

    def dequantize(self) -> Tensor:
        out_f, in_f = self.shape
        w = self.codes().reshape(out_f, -1, self.group_size).float() * self.scale.float()
        if self.bits == 4:
            w = w + self.minimum.float()
        return w.reshape(out_f, in_f)

    def _memo(self, key: str, build: Callable[[], T], *also: object) -> T:
        """build(), kept on the instance until a buffer is replaced (load_state_dict, .to()) or
        one of `also` changes."""
        current = (self.q, self.scale, self.minimum, *also)
        source, value = self.__dict__.get(key, ((), None))
        if len(source) != len(current) or any(a is not b for a, b in zip(source, current, strict=True)):
            value = build()
            self.__dict__[key] = (current, value)
        return value

    def kernel_view(self, spans: list[pages.Span] | None = None) -> Tensor | None:
        """This weight packed for the kernels (models.kernels.pack; scales expanded to one per 32
        inputs), built once; None if the kernels cannot run it (no compiler, widths not multiples
        of 32). With `spans` (pages.clean_file_mappings), the source pages that lie in them are
        handed back as each piece is packed (pack_for_kernels)."""
        _, in_f = self.shape
        if not kernels.available() or in_f % 32 or self.group_size % 32 or self.q.device.type != "cpu":
            return None
        return self._memo("_kernel_view", lambda: self._pack(spans or []))

    def _pack(self, spans: list[pages.Span]) -> Tensor:
        out_f, in_f = self.shape
        per = self.group_size // 32
        scale = self.scale.reshape(out_f, -1)
        minimum = self.minimum.reshape(out_f, -1) if self.bits == 4 else None
        out = torch.empty(-(-out_f // 4), in_f // 32, kernels.BLOCK_BYTES[self.bits], dtype=torch.uint8)
        # In pieces, each piece's source pages handed back before the next is read: packing the
        # 49k-row head never holds the table twice.
        for r0 in range(0, out_f, PACK_ROWS):
            rows = slice(r0, min(r0 + PACK_ROWS, out_f))
            blocks = [None if t is None else t[rows].repeat_interleave(per, dim=1) for t in (scale, minimum)]
            out[r0 // 4 : -(-rows.stop // 4)] = kernels.pack(self.q[rows], *blocks, bits=self.bits)
            for t in (self.q, scale, minimum):
                if t is not None:
                    pages.release(t[rows], spans)
        return out

    def dense(self, dtype: torch.dtype) -> Tensor:
        """The dequantized (O, I) weight in `dtype`, kept until a buffer is replaced.

        GPUs run quantized layers as dense matmuls over this copy: dequantizing on every call
        launches five kernels and writes the whole weight each time, and a fused int4 GPU kernel
        is not written yet. The copy costs the dense weight's memory on the GPU.
        """
        return self._memo("_dense", lambda: self.dequantize().to(dtype), dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return F.linear(x, self.dense(x.dtype))
        packed = self.kernel_view() if x.dtype == torch.float32 else None
        if packed is None:  # CPU memory is scarcer than time here: dequantize for each call
            return F.linear(x, self.dequantize().to(x.dtype))
        out_f, in_f = self.shape
        flat = x.reshape(-1, in_f)
        if flat.shape[0] <= MATVEC_ROWS:
            y = kernels.qmatvec(flat, packed, self.bits, out_f)
        else:  # many tokens (prefill): a GEMM that dequantizes as it goes, else dequantize + matmul
            y = kernels.qgemm(flat, packed, self.bits, out_f)
            if y is None:
                y = F.linear(flat, kernels.dequantize(packed, self.bits, out_f, in_f))
        return y.reshape(*x.shape[:-1], out_f)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.q, self.scale, self.minimum))


class QuantEmbedding(nn.Module):
    """The token embedding at int8 with one scale per 32 inputs (GGUF's Q8_0); also the output
    head when tied (`project`). Buffers: q (V, D) int8, scale (V, D/32, 1) fp16."""

    def __init__(self, weight: Tensor | tuple[int, int]) -> None:
        super().__init__()
        width = weight[1] if isinstance(weight, tuple) else weight.shape[1]
        if width % 32:
            raise InvalidRequest(f"embedding width {width} is not a multiple of 32")
        self.linear = QuantLinear(weight, 8, 32)

    @classmethod
    def from_linear(cls, linear: QuantLinear) -> QuantEmbedding:
        """The table `linear` holds (int8, groups of 32: a GGUF's own Q8_0 codes, say) as an
        embedding. Raises InvalidRequest for another format."""
        if linear.bits != 8 or linear.group_size != 32:
            raise InvalidRequest(f"a quantized embedding is int8 g32, not int{linear.bits} g{linear.group_size}")
        with torch.device("meta"):
            table = cls(linear.shape)
        table.linear = linear
        return table

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, D) float32 rows."""
        lin = self.linear
        d = lin.shape[1]
        packed = lin.kernel_view() if tokens.device.type == "cpu" else None
        if packed is not None:  # the head's packed copy: one C call, and the source stays unread
            return kernels.dequantize_rows(packed, lin.bits, lin.shape[0], d, tokens)
        rows = lin.q[tokens].float().reshape(*tokens.shape, d // 32, 32) * lin.scale[tokens].float()
        return rows.reshape(*tokens.shape, d)

    def project(self, h: Tensor) -> Tensor:
        """(..., D) -> (..., V) logits against the table."""
        return self.linear(h)

    def nbytes(self) -> int:
        return self.linear.nbytes()


def pack_for_kernels(model: nn.Module) -> int:
    """Pack every quantized layer of a CPU model for the kernels now, handing back the pages of
    memory-mapped sources as it goes (models.pages); the bytes handed back. Without this, layers
    pack at first use and their mapped sources stay resident beside the copy. The heap's free
    pages go back first: the packed copies must not land beside a tokenizer's parse buffers.
    A model is served through models.cpu.prepare_cpu, which calls this."""
    pages.trim_heap()
    spans = pages.clean_file_mappings()
    # The small tensors every forward reads (norms) move to memory of their own first: the page
    # cache may hold the file in 2 MB folios, and one read of a norm maps its whole folio back
    # (a layer's quantized weights with it).
    quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    for m in model.modules() if quantized else ():
        if isinstance(m, QuantLinear):
            continue
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if t is not None and t.numel() * t.element_size() <= SMALL_BYTES and pages.mapped(t, spans):
                if isinstance(t, nn.Parameter):
                    t.data = t.detach().clone()
                else:
                    setattr(m, name, t.clone())
    if isinstance(model, Transformer) and model.decoder is not None:
        model.decoder.reset()  # it would point at the norms' old addresses
    released = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.kernel_view(spans) is not None:
            released += sum(pages.release(t, spans) for t in (m.q, m.scale, m.minimum))  # and pages between pieces
    return released


def quantize_model(
    model: Transformer, bits: int, group_size: int | None = None, empty: bool = False, embeddings: bool = True
) -> Transformer:
    """Replace the blocks' linear layers with QuantLinear (and, with `embeddings`, the embedding
    and an untied head with int8 ones), in place; returns the model.

    group_size defaults to the whole row for int8 (per-channel) and 32 for int4. With empty, the
    layers get zero weights of the right shapes (to load a saved quantized state dict into).
    """
    for block in model.layers:
        for name in QUANTIZED:
            parent_name, attr = name.split(".")
            parent = getattr(block, parent_name)
            linear = getattr(parent, attr)
            size = group_size or (linear.weight.shape[1] if bits == 8 else 32)
            setattr(parent, attr, QuantLinear(tuple(linear.weight.shape) if empty else linear.weight, bits, size))
    if embeddings:
        table = model.tok_embeddings.weight
        model.tok_embeddings = QuantEmbedding(tuple(table.shape) if empty else table)
        if not model.cfg.tied_embeddings:
            out = model.output.weight
            model.output = QuantLinear(tuple(out.shape) if empty else out, 8, 32)
    return model


def dequantized(model: Transformer) -> Transformer:
    """A copy whose quantized layers and embedding are plain fp32 modules of their dequantized
    weights: the same weights computed by torch's own fp32 matmuls (the reference a quantized
    engine's arithmetic is held to; our kernels round activations to int16)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):  # also the QuantLinear inside a quantized embedding
        for name, child in list(module.named_children()):
            if isinstance(child, QuantLinear):
                dense = nn.Linear(child.shape[1], child.shape[0], bias=False)
                dense.weight.data = child.dequantize()
                setattr(module, name, dense)
    if isinstance(model.tok_embeddings, QuantEmbedding):
        model.tok_embeddings = nn.Embedding.from_pretrained(model.tok_embeddings.linear.weight)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights as stored (quantized layers at their packed size)."""
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(m.nbytes() for m in quant)
