"""Serve a GGUF at its own precision, tensor by tensor: `models.runtime.load(..., quant="source")`.

Each matmul tensor of a GGUF (the blocks' projections, models.quant.QUANTIZED, and an untied
output head) and its token embedding (also the tied head) keeps the precision the file stores it
at, on the grids our CPU kernels run (models.quant: int4 or int8 codes, an fp16 scale, and for
int4 an fp16 minimum, per group of 32 inputs):

| GGUF type | served as | fidelity |
|---|---|---|
| Q4_0 | int4 g32: codes q, scale d, minimum -8d | exact |
| Q4_1 | int4 g32: codes q, scale d, minimum m | exact |
| Q4_K | int4 g32: codes q, scale d*sc, minimum -dmin*m (each 32 of its 256) | "fp16 scales" (1) |
| Q5_0 | int8 g32: codes q-16, scale d | exact |
| Q8_0 | int8 g32: codes q, scale d | exact |
| Q5_1, Q5_K, Q6_K, any other quantized type | int8 g32, rounded to nearest | "rounded" (2) |
| F32, F16, BF16 | kept as stored: dense fp32 (nn.Linear, nn.Embedding) | exact |

(1) The products d*sc and dmin*m rounded to fp16 (the kernels' packed format holds fp16 scales and
minima per 32): each weight moves by at most 2^-11 of 15*scale + |minimum|.
(2) From the dequantized weights: within half an int8 step, 1/254 of the group's largest
magnitude (Q6_K's own step is ~1/32 of it).

The embedding (and tied head) follows the same table: int8 becomes models.quant.QuantEmbedding.
Types below 4 bits (Q2_K, Q3_K, IQ*) go to int8 as well: their 16-weight sub-blocks fit no int4 g32
grid, and rounding them to one would add error on top of theirs. A matmul tensor kept dense leaves
the model off the kernels' one-call decode (models.fast_decode needs every block quantized); no zoo
model has one.

Codes are read back off each tensor's own grid: the block headers give every group's scale (and
minimum), and the codes are the dequantized weights (gguf.quants.dequantize: what the fp32 model
holds) divided back onto that grid. An exact type therefore dequantizes bit for bit to the fp32
model's weight; `quantize_from_source` checks that as it builds (GGUFError if not).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from models.errors import GGUFError
from models.quant import QUANTIZED, QuantEmbedding, QuantLinear
from models.transformer import Transformer

if TYPE_CHECKING:
    from gguf import ReaderTensor

    from models.config import ModelConfig
    from models.gguf_loader import GGUFFile

FORMAT = 1
"""Version of the served layout; part of the prepared cache's key (bump when the mapping changes)."""

DENSE = frozenset({"F32", "F16", "BF16", "F64"})
"""GGUF types kept as stored (dense fp32)."""

Grid = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
"""(N, type_size) raw blocks -> (scale, minimum or None), each (N, block_size / 32): one per 32."""


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of each block, as float32: (N, 1)."""
    return blocks[:, at : at + 2].view(np.float16).astype(np.float32)


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K (144 bytes a 256): d, dmin, 12 bytes of 6-bit (scale, min) pairs for 8 groups of 32."""
    from gguf.quants import Q4_K  # gguf: imported already by whoever opened the file

    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])  # (N, 8) each
    # As gguf.quants.Q4_K.dequantize_blocks computes them: w = (d*sc)*q - (dmin*m).
    return _f16(blocks, 0) * sc.astype(np.float32), -(_f16(blocks, 2) * m.astype(np.float32))


GRIDS: dict[str, tuple[int, Grid]] = {
    "Q4_0": (4, lambda b: (_f16(b, 0), -8 * _f16(b, 0))),  # w = d*(q-8): minimum -8d (exact in fp16)
    "Q4_1": (4, lambda b: (_f16(b, 0), _f16(b, 2))),  # w = d*q + m
    "Q4_K": (4, _q4_k),
    "Q5_0": (8, lambda b: (_f16(b, 0), None)),  # w = d*(q-16): int8 codes q-16
    "Q8_0": (8, lambda b: (_f16(b, 0), None)),  # w = d*q
}
"""GGUF types whose own grid we serve: type -> (bits, reader of each group's scale and minimum)."""


@dataclass(frozen=True)
class TensorPrecision:
    """How one matmul or embedding tensor of a GGUF is served."""

    module: str
    """Our module's name: "layers.3.attention.wq", "tok_embeddings" or "output"."""
    source: str
    """The GGUF's tensor type, e.g. "Q5_0"."""
    bits: int | None
    """4 or 8 (QuantLinear / QuantEmbedding); None: kept dense."""
    fidelity: str
    """"exact", "fp16 scales" (Q4_K) or "rounded" (see the module docstring)."""
    max_error: float
    """Largest |served - source| over the tensor's weights."""


def served_bits(source: str) -> int | None:
    """Bits a tensor of GGUF type `source` is served at (None: dense), per the module docstring."""
    if source in DENSE:
        return None
    return GRIDS[source][0] if source in GRIDS else 8


def fidelity(source: str) -> str:
    if source in DENSE or (source in GRIDS and source != "Q4_K"):
        return "exact"
    return "fp16 scales" if source == "Q4_K" else "rounded"


def module_of(parameter: str) -> str | None:
    """The module a served tensor replaces, for one of our parameter names; None for the rest (norms)."""
    module = parameter.removesuffix(".weight")
    if module in ("tok_embeddings", "output"):
        return module
    parts = module.split(".")
    return module if parts[0] == "layers" and ".".join(parts[2:]) in QUANTIZED else None


def label(plan: list[TensorPrecision]) -> str:
    """What describe() reports, e.g. "source(q4_1->int4,q8_0->int8)": each source type once, the
    most frequent first."""
    counts = collections.Counter((p.source, p.bits) for p in plan)
    parts = [f"{s.lower()}->{'fp32' if b is None else f'int{b}'}" for (s, b), _ in counts.most_common()]
    return f"source({','.join(parts)})"


def _codes(weight: Tensor, scale: Tensor, minimum: Tensor | None) -> Tensor:
    """(O, I) codes of `weight` on the grid (O, G) scale (+ minimum), groups of I/G inputs."""
    out_f, in_f = weight.shape
    codes = torch.empty(out_f, in_f, dtype=torch.int16)
    lo, hi = (0, 15) if minimum is not None else (-128, 127)
    for r in range(0, out_f, 8192):  # in row pieces: a 262k-row table's temporaries stay small
        w = weight[r : r + 8192].reshape(-1, scale.shape[1], in_f // scale.shape[1])  # (R, G, g)
        s = scale[r : r + 8192, :, None]
        if minimum is not None:
            w = w - minimum[r : r + 8192, :, None]
        q = torch.round(w / torch.where(s == 0, 1, s)).masked_fill(s == 0, 0)  # a zero scale: every weight = minimum
        codes[r : r + 8192] = q.clamp(lo, hi).reshape(-1, in_f).to(torch.int16)
    return codes


def layer_on_grid(tensor: ReaderTensor, weight: Tensor, cfg: ModelConfig) -> QuantLinear:
    """A layer on the grid of `tensor` (a gguf ReaderTensor of a GRIDS type: its name, tensor_type
    and raw blocks), `weight` its (O, I) dequantized values in our row order. Raises GGUFError when
    the codes do not reproduce `weight` (exactly; Q4_K to the fp16 rounding of its scales)."""
    from gguf import GGML_QUANT_SIZES  # gguf: imported already by whoever opened the file

    from models.gguf_loader import rows_in_model_order

    _, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
    _, grid = GRIDS[tensor.tensor_type.name]
    scale, minimum = grid(np.asarray(tensor.data).reshape(-1, type_size))
    rows = weight.shape[0]
    scale = torch.from_numpy(rows_in_model_order(tensor.name, scale.reshape(rows, -1), cfg))
    if minimum is not None:
        minimum = torch.from_numpy(rows_in_model_order(tensor.name, minimum.reshape(rows, -1), cfg))
    layer = QuantLinear.from_codes(_codes(weight, scale, minimum), scale, minimum)
    if tensor.tensor_type.name == "Q4_K":  # the fp16 rounding of scale and minimum is all it may lose
        bound = 15 * (scale - layer.scale[..., 0].float()).abs() + (minimum - layer.minimum[..., 0].float()).abs()
        tolerance = float(bound.max()) + 1e-6 * float(weight.abs().max())
        if float((layer.dequantize() - weight).abs().max()) > tolerance:
            raise GGUFError(f"{tensor.name} (Q4_K): codes do not land on its own grid; its blocks were misread")
    elif not torch.equal(layer.dequantize(), weight):
        raise GGUFError(f"{tensor.name} ({tensor.tensor_type.name}): codes do not land on its own grid")
    return layer


def quantize_from_source(model: Transformer, file: GGUFFile) -> list[TensorPrecision]:
    """Replace `model`'s matmul layers and embedding with ones at the precision `file` stores them
    at (the module docstring's table), in place; `model` holds `file`'s dequantized weights
    (models.gguf_loader.load_model). Returns how each tensor is served.
    Raises GGUFError when an exact type's codes do not reproduce its weights (a misread block)."""
    from models.gguf_loader import parameter_name

    plan = []
    for tensor in file.reader.tensors:
        module = module_of(parameter_name(tensor.name))
        if module is None:
            continue
        source = tensor.tensor_type.name
        bits = served_bits(source)
        if bits is None:
            plan.append(TensorPrecision(module, source, None, "exact", 0.0))
            continue
        weight = model.get_submodule(module).weight.detach().float()  # (O, I)
        layer = layer_on_grid(tensor, weight, model.cfg) if source in GRIDS else QuantLinear(weight, 8, 32)
        error = float((layer.dequantize() - weight).abs().max())
        parent, _, attr = module.rpartition(".")
        new = QuantEmbedding.from_linear(layer) if module == "tok_embeddings" else layer
        setattr(model.get_submodule(parent), attr, new)
        plan.append(TensorPrecision(module, source, bits, fidelity(source), error))
    return plan


# -- the layout of a quantized model, to rebuild it empty before loading a saved state dict ------------


def quant_layout(model: nn.Module) -> dict[str, list[int] | str]:
    """{module name: [bits, group_size]} for each QuantLinear, "embedding" for a QuantEmbedding
    (its own inner layer not listed): enough to rebuild the modules empty (apply_layout)."""
    out: dict[str, list[int] | str] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantEmbedding):
            out[name] = "embedding"
        elif isinstance(m, QuantLinear) and not (name.endswith(".linear") and out.get(name[:-7]) == "embedding"):
            out[name] = [m.bits, m.group_size]
    return out


def apply_layout(model: nn.Module, layout: dict[str, list[int] | str]) -> nn.Module:
    """Replace the dense modules `layout` names with empty quantized ones of the same shapes, in
    place (on the meta device when the model is built there); returns the model."""
    for name, spec in layout.items():
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent)
        rows, cols = getattr(holder, attr).weight.shape
        new = QuantEmbedding((rows, cols)) if spec == "embedding" else QuantLinear.empty(rows, cols, *spec)
        setattr(holder, attr, new)
    return model


__all__ = [
    "DENSE",
    "FORMAT",
    "GRIDS",
    "TensorPrecision",
    "apply_layout",
    "fidelity",
    "label",
    "layer_on_grid",
    "module_of",
    "quant_layout",
    "quantize_from_source",
    "served_bits",
]
