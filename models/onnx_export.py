"""Export the transformer to ONNX as a step graph with an explicit KV cache, quantized weights included.

The graph contract (what the onnxruntime engine runs and the TensorRT engine builds from); batch 1,
float32, `i` the index of a layer in the model (0..n_layers-1 for the whole model):

    inputs   input_ids        int64   (1, T)         new token ids                       [whole model]
             hidden           float32 (1, T, D)      hidden states entering layer start  [layer range]
             past_key_i       float32 (1, K, P, hd)  keys of the P positions already cached
             past_value_i     float32 (1, K, P, hd)
    outputs  logits           float32 (1, 1, V)      next-token logits of the LAST new token only
                                                     (a prefill of T tokens pays one vocab projection)
             hidden_out       float32 (1, T, D)      hidden states after layer end-1     [layer range]
             present_key_i    float32 (1, K, P+T, hd) past and new keys, to feed back as past_key_i
             present_value_i  float32 (1, K, P+T, hd)

T (>= 1) and P (>= 0) are dynamic; there is no position input: the new tokens sit at positions
[P, P+T), read from the past's shape, so position and cache cannot disagree. RoPE tables are
initializers of `max_positions` rows, so P + T <= max_positions. A prefill passes P = 0 (empty
pasts). Attention is written out (MatMul, Where, Softmax over concat(past, new)) with a causal mask
and, on Gemma's sliding layers, the window: plain opset-18 ops, nothing exporter- or vendor-specific.

Quantized layers (models.quant.QuantLinear) are exported first as fp32 MatMuls of their dequantized
weights, then rewritten (`nbits=True`, for onnxruntime) into com.microsoft `MatMulNBits` over the
layer's own codes, with explicit uint8 zero points (the fast path here; float zero points are exact
but 27x slower): int4 as code * scale with zero point 0 plus the group minimum added separately,
y += (x summed over each group) @ minimum^T. The weights the graph computes with are therefore
exactly the torch model's. int8 layers (int8 bundles, and the int8 embedding when it is also the
head) stay fp32 MatMuls of their dequantized weights unless accuracy_level is 4: onnxruntime 1.32
runs MatMulNBits bits=8 with fp32 activations through a slow fallback (measured 9-20x slower than
bits=4 here), and only its int8-activation path (accuracy_level 4, inexact) is fast; there they become
MatMulNBits bits=8 with codes + 128 and zero point 128. `nbits=False` keeps every quantized layer an
fp32 MatMul (plain ONNX, what TensorRT takes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import zoo
from models.errors import TandemModelError
from models.loaded import LoadedModel
from models.quant import QuantLinear
from models.transformer import Block, Transformer, rope_tables

if TYPE_CHECKING:
    import onnx

EXPORT_FORMAT = 2  # bump when the graph contract or the rewrite changes: old cache entries are then ignored
MS_DOMAIN = "com.microsoft"
DATA_SUFFIX = ".data"  # weights live next to the graph in <name>.onnx.data (external data; Gemma is > 1 GB)


class UnsupportedQuantization(TandemModelError):
    """A quantized layer the ONNX graph cannot express (e.g. an int4 group size MatMulNBits cannot tile)."""


@dataclass(frozen=True)
class ExportOptions:
    layers: tuple[int, int] | None = None
    """None: the whole model (input_ids in, logits out). (start, end): layers [start, end) only (hidden in, out)."""
    nbits: bool = True
    """Quantized layers as com.microsoft MatMulNBits (onnxruntime); False: dequantized fp32 MatMuls (TensorRT)."""
    accuracy_level: int = 0
    """MatMulNBits accuracy_level: 0 computes in fp32 (exact weights); 4 quantizes activations to int8 (faster)."""
    max_positions: int | None = None
    """Rows of the RoPE tables, the longest sequence the graph can run; None: the model's context length."""
    opset: int = 18
    """ONNX default-domain opset."""

    def __post_init__(self) -> None:
        if self.layers is not None and not 0 <= self.layers[0] < self.layers[1]:
            raise ValueError(f"layer range {self.layers} must be [start, end) with 0 <= start < end")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"MatMulNBits accuracy_level must be 0..4, got {self.accuracy_level}")


@dataclass(frozen=True)
class GraphNames:
    """The input and output names of an exported graph, in order."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    layers: tuple[int, ...]
    """Indices of the layers whose caches the graph carries, in the order of past_/present_ names."""


def graph_names(n_layers: int, options: ExportOptions) -> GraphNames:
    start, end = options.layers or (0, n_layers)
    if end > n_layers:
        raise ValueError(f"layer range [{start}, {end}) outside the model's {n_layers} layers")
    layers = tuple(range(start, end))
    first, last = ("input_ids", "logits") if options.layers is None else ("hidden", "hidden_out")
    past = tuple(n for i in layers for n in (f"past_key_{i}", f"past_value_{i}"))
    present = tuple(n for i in layers for n in (f"present_key_{i}", f"present_value_{i}"))
    return GraphNames((first, *past), (last, *present), layers)


class StepGraph(nn.Module):
    """What gets exported: the model's own blocks over explicit past caches (see the module docstring).

    Reuses the Transformer's parameters and its linear layers (no copy), but writes the math out from
    them rather than calling the blocks' forward methods: those write a preallocated cache in place
    and may call C kernels (models.kernels), neither of which a traced graph can hold.
    """

    def __init__(self, model: Transformer, options: ExportOptions) -> None:
        super().__init__()
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        self.names = graph_names(cfg.n_layers, options)
        self.whole = options.layers is None
        length = options.max_positions or cfg.context_length
        for base in sorted({cfg.rope_base, cfg.rope_local_base}):
            cos, sin = rope_tables(cfg.head_dim, base, length)  # (L, hd), the same tables as the torch model
            self.register_buffer(_rope_name("cos", base), cos, persistent=False)
            self.register_buffer(_rope_name("sin", base), sin, persistent=False)
        if self.whole:
            self._setup_embedding(model, options.nbits)

    def _setup_embedding(self, model: Transformer, nbits: bool) -> None:
        """A dense table stays the model's own Parameter; a quantized one (models.quant.QuantEmbedding,
        a QuantLinear of int8 codes) is gathered as int8 codes times per-group scales, so the graph
        holds it at 1 byte a weight (with `nbits`; without, plain fp32 rows for TensorRT, which takes
        no int8 tensor without quantization scales). Raises UnsupportedQuantization for any other
        embedding module."""
        emb = model.tok_embeddings
        if isinstance(emb, nn.Embedding):
            self.table: QuantLinear | None = None
            return
        table = getattr(emb, "linear", None)
        if not isinstance(table, QuantLinear) or table.bits != 8:
            raise UnsupportedQuantization(f"token embedding {type(emb).__name__} is not one the ONNX export knows")
        vocab, dim = table.shape
        self.table = table
        if nbits:
            self.register_buffer("embed_codes", table.codes().reshape(vocab, dim), persistent=False)  # int8 (V, D)
            self.register_buffer("embed_scales", table.scale.float(), persistent=False)  # (V, G, 1)
        else:
            self.register_buffer("embed_rows", table.dequantize(), persistent=False)  # (V, D)

    def rope_rows(self) -> int:
        return getattr(self, _rope_name("cos", self.cfg.rope_base)).shape[0]

    def forward(self, x: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        """x: (1, T) ids or (1, T, D) hidden; past: (1, K, P, hd) key and value per layer, interleaved."""
        m, cfg = self.model, self.cfg
        h = self._embed(x) if self.whole else x  # (1, T, D)
        T, P = h.shape[1], past[0].shape[2]
        pos = torch.arange(T, device=h.device) + P  # (T,) positions of the new tokens
        keys = torch.arange(P + T, device=h.device)  # (S,) positions of every key, S = P + T
        causal = keys[None, :] <= pos[:, None]  # (T, S)
        masks = {False: causal, True: causal & (pos[:, None] - keys[None, :] < cfg.sliding_window)}
        presents: list[Tensor] = []
        for n, i in enumerate(self.names.layers):
            block = m.layers[i]
            base = cfg.rope_local_base if block.sliding else cfg.rope_base
            cos, sin = getattr(self, _rope_name("cos", base))[pos], getattr(self, _rope_name("sin", base))[pos]
            h, k, v = self._block(block, h, cos, sin, masks[block.sliding], past[2 * n], past[2 * n + 1])
            presents += [k, v]
        out = self._head(h[:, -1]) if self.whole else h  # (1, 1, V) or (1, T, D)
        return (out, *presents)

    def _embed(self, ids: Tensor) -> Tensor:
        """(1, T) ids -> (1, T, D): Transformer.embed for a dense or an int8 table."""
        m = self.model
        if self.table is None:
            h = F.embedding(ids, m.tok_embeddings.weight)
        elif hasattr(self, "embed_rows"):
            h = F.embedding(ids, self.embed_rows)
        else:
            T, (groups, size) = ids.shape[1], (self.embed_scales.shape[1], self.table.group_size)
            rows = self.embed_codes[ids].float().reshape(1, T, groups, size) * self.embed_scales[ids]
            h = rows.reshape(1, T, groups * size)
        return h * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else h

    def _head(self, h: Tensor) -> Tensor:
        """(1, D) last hidden state -> (1, 1, V): Transformer.head, with the projection 2-D so that a
        tied dense table is one Gemm(transB) over the embedding itself, not a transposed copy."""
        m, cap = self.model, self.cfg.final_logit_softcap
        h = _rms(m.norm, h)
        if not self.cfg.tied_embeddings:
            logits = m.output(h)
        elif self.table is None:
            logits = F.linear(h, m.tok_embeddings.weight)
        else:
            logits = m.tok_embeddings.linear(h)  # the QuantLinear (its stand-in while exporting)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits[:, None]

    def _block(
        self, block: Block, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Block.forward with attention over concat(past, new); returns (h, present_k, present_v)."""
        a, k, v = self._attention(block.attention, _rms(block.attn_norm, x), cos, sin, mask, past_k, past_v)
        if block.sandwich:
            a = _rms(block.post_attn_norm, a)
        x = x + a
        f = _ffn(block.feed_forward, _rms(block.ffn_norm, x))
        if block.sandwich:
            f = _rms(block.post_ffn_norm, f)
        return x + f, k, v

    def _attention(
        self, attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        T, H, K, hd = x.shape[1], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = attn.wq(x).view(1, T, H, hd)
        k = attn.wk(x).view(1, T, K, hd)
        v = attn.wv(x).view(1, T, K, hd)
        if cfg.qk_norm:
            q, k = _rms(attn.q_norm, q), _rms(attn.k_norm, k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (1, H|K, T, hd)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (1, K, S, hd)
        q = q.reshape(1, K, H // K, T, hd)  # query heads grouped by the KV head they share
        scores = (q @ keys[:, :, None].transpose(-1, -2)) * cfg.query_scale  # (1, K, H/K, T, S)
        if cfg.attn_logit_softcap:
            scores = torch.tanh(scores / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ values[:, :, None]  # (1, K, H/K, T, hd)
        out = out.reshape(1, H, T, hd).transpose(1, 2).reshape(1, T, H * hd)
        return attn.wo(out), keys, values


def _rms(norm: nn.Module, x: Tensor) -> Tensor:
    """models.transformer.RMSNorm from its weight and eps (fp32 activations)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _ffn(ff: nn.Module, x: Tensor) -> Tensor:
    """models.transformer.FeedForward from its three projections: w_down(act(w_gate(x)) * w_up(x))."""
    gate = ff.w_gate(x)
    gate = F.gelu(gate, approximate="tanh") if ff.gelu else F.silu(gate)
    return ff.w_down(gate * ff.w_up(x))


def _rope_name(kind: str, base: float) -> str:
    return f"rope_{kind}_{int(base)}"


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (1, H, T, hd); cos, sin: (T, hd). models.transformer.apply_rope with tables gathered per position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class _DenseStandIn(nn.Module):
    """x @ W^T with W stored transposed, (I, O), under a name the rewrite finds as the MatMul's B input."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(weight.t().contiguous(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight_t


@contextlib.contextmanager
def _dense_quant_layers(model: Transformer) -> Iterator[dict[str, QuantLinear]]:
    """Temporarily swap every QuantLinear for a dense stand-in of its dequantized weight; yields
    {stand-in initializer name in the exported graph: QuantLinear}. Restores the model on exit."""
    swapped: list[tuple[nn.Module, str, QuantLinear]] = []
    found: dict[str, QuantLinear] = {}
    try:
        for name, module in list(model.named_modules()):
            for attr, child in list(module.named_children()):
                if isinstance(child, QuantLinear):
                    setattr(module, attr, _DenseStandIn(child.dequantize()))
                    swapped.append((module, attr, child))
                    found[f"model.{name}.{attr}.weight_t"] = child
        yield found
    finally:
        for module, attr, child in swapped:
            setattr(module, attr, child)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (missing torchvision ops, axis renames): it is not about our model."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: Transformer, path: Path, options: ExportOptions = ExportOptions()) -> Path:
    """Write the step graph of `model` to `path` (weights to `path` + ".data"); returns `path`.

    Raises UnsupportedQuantization for a quantized layer MatMulNBits cannot express (before exporting).
    """
    import onnx  # an optional extra, ~1.5 s and 12 MB to import: only exports pay

    for q in model.modules():
        if isinstance(q, QuantLinear) and _as_nbits(q, options.nbits, options.accuracy_level):
            _block_size(q)
    graph = StepGraph(model, options).eval()  # before the swap: it reads a quantized embedding's codes
    names = graph.names
    with _dense_quant_layers(model) as quant:
        sample = _sample_inputs(model, names, options)
        # No bounds on the dims: bounds cost torch.export's symbolic reasoning twice the time, and the
        # graph has no guards anyway (P = 0 runs although the sample's P is 4).
        T, P = torch.export.Dim("T"), torch.export.Dim("P")
        shapes = ({1: T}, tuple({2: P} for _ in names.inputs[1:]))  # forward(x, *past): past is one tuple
        with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                graph,
                sample,
                dynamic_shapes=shapes,
                input_names=list(names.inputs),
                output_names=list(names.outputs),
                opset_version=options.opset,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
        proto = program.model_proto
        if options.nbits:
            rewrite_quant_matmuls(proto, quant, options.accuracy_level)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + DATA_SUFFIX,
        size_threshold=1024,
    )
    return path


def _sample_inputs(model: Transformer, names: GraphNames, options: ExportOptions) -> tuple[Tensor, ...]:
    """Example inputs with T = 3 and P = 4: sizes 0 and 1 would be specialised by torch.export."""
    cfg, gen = model.cfg, torch.Generator().manual_seed(0)
    if options.layers is None:
        x = torch.randint(0, cfg.vocab_size, (1, 3), generator=gen)
    else:
        x = torch.randn(1, 3, cfg.dim, generator=gen)
    past = [torch.randn(1, cfg.n_kv_heads, 4, cfg.head_dim, generator=gen) for _ in names.inputs[1:]]
    return (x, *past)


# -- quantized layers as MatMulNBits ------------------------------------------------------------------


def _as_nbits(q: QuantLinear, nbits: bool, accuracy_level: int) -> bool:
    """Whether q becomes MatMulNBits (else it stays the fp32 MatMul of its dequantized weight): int4
    always with `nbits`, int8 only on the fast int8-activation path (see the module docstring)."""
    return nbits and (q.bits == 4 or accuracy_level == 4)


def _block_size(q: QuantLinear) -> int:
    """The MatMulNBits block: the largest power of two dividing the group (scales repeat over a group's
    blocks), at most 256. Raises UnsupportedQuantization when that is below 16 (MatMulNBits' minimum)."""
    block = min(q.group_size & -q.group_size, 256)
    if block < 16:
        raise UnsupportedQuantization(
            f"int{q.bits} with group size {q.group_size}: onnxruntime's MatMulNBits needs blocks of a power of "
            f"two >= 16 that divide the group; re-quantize with group size 32 or 64 (tandem optimize's default)"
        )
    return block


def _nbits_nodes(node: onnx.NodeProto, q: QuantLinear, accuracy_level: int) -> tuple[list, list]:
    """Nodes and initializers computing node's MatMul(x, W^T) from q's codes; W is exactly q.dequantize()."""
    from onnx import helper, numpy_helper  # an optional extra, ~1.5 s and 12 MB to import: only exports pay

    (out_f, in_f), group, block = q.shape, q.group_size, _block_size(q)
    blocks, prefix, x, y = in_f // block, node.input[1].removesuffix(".weight_t"), node.input[0], node.output[0]
    codes = q.codes().numpy()  # (O, I)
    scales = np.repeat(q.scale.float().numpy().reshape(out_f, in_f // group), group // block, axis=1)  # (O, nb)
    if q.bits == 4:  # two codes a byte, the even element in the low nibble; zero points 0, two a byte
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(out_f, blocks, block // 2)
        zeros = np.zeros((out_f, (blocks + 1) // 2), np.uint8)
    else:  # int8 codes shifted to uint8 with zero point 128
        packed = (codes.astype(np.int16) + 128).astype(np.uint8).reshape(out_f, blocks, block)
        zeros = np.full((out_f, blocks), 128, np.uint8)
    tensors = [
        numpy_helper.from_array(packed, prefix + ".qweight"),
        numpy_helper.from_array(scales.reshape(-1).astype(np.float32), prefix + ".scales"),
        numpy_helper.from_array(zeros.reshape(-1), prefix + ".zero_points"),
    ]
    inputs = [x, prefix + ".qweight", prefix + ".scales", prefix + ".zero_points"]
    attrs = {"K": in_f, "N": out_f, "bits": q.bits, "block_size": block, "accuracy_level": accuracy_level}
    if q.bits == 8:
        node = helper.make_node("MatMulNBits", inputs, [y], name=prefix + ".nbits", domain=MS_DOMAIN, **attrs)
        return [node], tensors
    nodes = [
        helper.make_node("MatMulNBits", inputs, [prefix + ".coded"], name=prefix + ".nbits", domain=MS_DOMAIN, **attrs)
    ]
    # y += (x summed over each group) @ minimum^T: x (.., I) -> (.., G, g) -> (.., G) -> (.., O)
    minimum_t = q.minimum.float().numpy().reshape(out_f, in_f // group).T  # (G, O)
    tensors += [
        numpy_helper.from_array(np.ascontiguousarray(minimum_t), prefix + ".minimum_t"),
        numpy_helper.from_array(np.array([in_f // group, group], np.int64), prefix + ".group_dims"),
        numpy_helper.from_array(np.array([-1], np.int64), prefix + ".last_axis"),
    ]
    nodes += [
        helper.make_node("Shape", [x], [prefix + ".lead"], end=-1),
        helper.make_node("Concat", [prefix + ".lead", prefix + ".group_dims"], [prefix + ".grouped_shape"], axis=0),
        helper.make_node("Reshape", [x, prefix + ".grouped_shape"], [prefix + ".grouped"]),
        helper.make_node("ReduceSum", [prefix + ".grouped", prefix + ".last_axis"], [prefix + ".sums"], keepdims=0),
        helper.make_node("MatMul", [prefix + ".sums", prefix + ".minimum_t"], [prefix + ".offset"]),
        helper.make_node("Add", [prefix + ".coded", prefix + ".offset"], [y]),
    ]
    return nodes, tensors


def rewrite_quant_matmuls(proto: onnx.ModelProto, quant: dict[str, QuantLinear], accuracy_level: int) -> None:
    """Replace, in place, each MatMul whose weight is a quantized layer's stand-in with MatMulNBits (those
    `_as_nbits` picks; the others keep their fp32 MatMul), and drop the replaced stand-ins' fp32
    initializers. Raises RuntimeError if the exporter renamed or reused a stand-in."""
    import onnx  # an optional extra, ~1.5 s and 12 MB to import: only exports pay

    graph = proto.graph
    missing = set(quant) - {t.name for t in graph.initializer}
    if missing:
        raise RuntimeError(f"exported graph lacks quantized weights {sorted(missing)[:3]}: exporter naming changed")
    nodes, tensors, done, kept = [], [], set(), set()
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in quant:
            q = quant[node.input[1]]
            if _as_nbits(q, True, accuracy_level):
                new_nodes, new_tensors = _nbits_nodes(node, q, accuracy_level)
                nodes += new_nodes
                tensors += new_tensors
                done.add(node.input[1])
            else:
                nodes.append(node)
                kept.add(node.input[1])
        elif any(name in quant and name not in kept for name in node.input):
            raise RuntimeError(f"quantized weight used by a {node.op_type} node, not a MatMul: cannot rewrite it")
        else:
            nodes.append(node)
    if done | kept != set(quant):
        raise RuntimeError(f"no MatMul found for quantized weights {sorted(set(quant) - done - kept)[:3]}")
    initializers = [t for t in graph.initializer if t.name not in done]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(initializers + tensors)
    if not any(op.domain == MS_DOMAIN for op in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


# -- the cache -------------------------------------------------------------------------------------------


def cache_key(loaded: LoadedModel, options: ExportOptions) -> str:
    """Identity of the source (a bundle's manifest, which holds its files' checksums, or a GGUF's path,
    size and mtime), the model as loaded (layers, quantization), the options and the exporter."""
    path = loaded.path
    if path.is_dir():
        source = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    else:
        st = path.stat()
        source = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    quant = [(name, m.bits, m.group_size) for name, m in loaded.model.named_modules() if isinstance(m, QuantLinear)]
    raw = {
        "source": source,
        "layers": [block.layer for block in loaded.model.layers],
        "quant": quant,
        "options": dataclasses.asdict(options),
        "format": EXPORT_FORMAT,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:24]


def cached_export(loaded: LoadedModel, options: ExportOptions = ExportOptions(), root: Path | None = None) -> Path:
    """The graph of `loaded` under <cache>/onnx/<key>/model.onnx, exported on first use and written
    atomically (a crash leaves no half-written entry; a concurrent export of the same key is harmless)."""
    entry = (root or zoo.cache_dir()) / "onnx" / cache_key(loaded, options)
    graph = entry / "model.onnx"
    if graph.is_file() and graph.with_name(graph.name + DATA_SUFFIX).is_file():
        return graph
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    try:
        export_onnx(loaded.model, tmp / graph.name, options)
        os.replace(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not graph.is_file():  # not someone else's finished export of the same key
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return graph
