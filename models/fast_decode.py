"""Batch-1 decode on CPU through our kernels: one C call a token instead of ~15 torch ops a layer.

At batch 1 a 135M-parameter model spends more time dispatching small torch ops than reading its
weights. `CpuDecoder` hands the quantized layers to `kernels.layers`, one C call that runs norms,
projections, RoPE, the cache write, attention and the MLP of each layer for one token. Python still chooses
which layers run (layer ranges for split inference, skipped layers), and prefill, batches and
unquantized models keep the torch path; both paths read and write the same KV caches, so a
request can move between them at any token.

`CpuDecoder` is a models.transformer.StepDecoder: models.cpu.prepare_cpu attaches it to a model's
`decoder` slot, and the model hands it single tokens of one sequence.
"""

from __future__ import annotations

import copy
import ctypes
import weakref

import torch
from torch import Tensor

from models import kernels
from models.config import ModelConfig
from models.kv_cache import KVCache
from models.quant import QuantLinear
from models.transformer import Block, Transformer


def _qweight(lin: QuantLinear) -> kernels.QWeight:
    packed = lin.kernel_view()
    if packed is None:
        raise ValueError("layer cannot run on the kernels")
    return kernels.QWeight(lin.bits, lin.shape[0], lin.shape[1], packed.data_ptr())


def unsupported(model: Transformer) -> str:
    """Why `model` cannot decode on the kernels ('' when it can)."""
    if not kernels.available():
        return f"kernels unavailable: {kernels.reason()}"
    if model.norm.weight.device.type != "cpu" or model.norm.weight.dtype != torch.float32:
        return "kernels run float32 models on CPU"
    for block in model.layers:
        for lin in (*_attn(block), *_ffn(block)):
            if not isinstance(lin, QuantLinear) or lin.kernel_view() is None:
                return "every block's linear layers must be quantized with groups of 32 inputs"
    return ""


def _attn(block: Block) -> tuple:
    a = block.attention
    return a.wq, a.wk, a.wv, a.wo


def _ffn(block: Block) -> tuple:
    f = block.feed_forward
    return f.w_gate, f.w_up, f.w_down


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _layer_step(cfg: ModelConfig, block: Block) -> kernels.LayerStep:
    """One layer's settings, packed weights and norms as the kernels read them (its cache and
    RoPE table are bound per request, in CpuDecoder.run)."""
    a, f = block.attention, block.feed_forward
    norms = {
        "attn_norm": block.attn_norm.weight,
        "ffn_norm": block.ffn_norm.weight,
        "q_norm": a.q_norm.weight if cfg.qk_norm else None,
        "k_norm": a.k_norm.weight if cfg.qk_norm else None,
        "post_attn_norm": block.post_attn_norm.weight if cfg.sandwich_norm else None,
        "post_ffn_norm": block.post_ffn_norm.weight if cfg.sandwich_norm else None,
    }
    for name, w in norms.items():
        if w is not None and not (w.is_contiguous() and w.dtype == torch.float32):
            raise ValueError(f"{name} must be contiguous float32")
    return kernels.LayerStep(
        dim=cfg.dim,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        ffn_dim=cfg.ffn_dim,
        qk_norm=int(cfg.qk_norm),
        sandwich=int(cfg.sandwich_norm),
        gelu=int(cfg.act == "gelu_tanh"),
        window=cfg.sliding_window if block.sliding else 0,
        eps=cfg.norm_eps,
        query_scale=cfg.query_scale,
        attn_softcap=cfg.attn_logit_softcap,
        wq=_qweight(a.wq),
        wk=_qweight(a.wk),
        wv=_qweight(a.wv),
        wo=_qweight(a.wo),
        w_gate=_qweight(f.w_gate),
        w_up=_qweight(f.w_up),
        w_down=_qweight(f.w_down),
        **{name: _ptr(w) for name, w in norms.items()},
    )


class CpuDecoder:
    """The kernels' route through one quantized CPU model (a StepDecoder). Its view of the model
    (`steps`) is built at the first token after each `reset`, which setup_cache calls: weights may
    have been replaced since. A model the kernels cannot run as it then is (`unsupported`) is
    declined until the next reset: `run` returns None and the model runs torch's ops."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.steps: ctypes.Array | None = None
        """One kernels.LayerStep a layer, in one C array (elements are views); None until built."""
        self.declined: str | None = None
        """Why the model as it was at the last build cannot run on the kernels ('' when it can);
        None: not checked since the last reset."""
        self.bases: list[float] = []
        # What each step points at: weak references to the layer's cache and RoPE table (a
        # released request's cache is not kept alive, and one freed is never mistaken for a new
        # one at the same address). Checking them costs ~0.5 us a layer; the pointers, 4.5.
        self.bound: list[tuple[weakref.ref, weakref.ref] | None] = []
        self.masks: dict[frozenset[int], ctypes.Array] = {}
        """Skip set -> its C mask (`_mask`)."""

    def __deepcopy__(self, memo: dict) -> CpuDecoder:
        # A copied model's decoder points at the copy's weights, built afresh (a built C array
        # holds pointers, which cannot be copied, and the original's would be wrong).
        return CpuDecoder(copy.deepcopy(self.model, memo))

    @property
    def built(self) -> bool:
        """Whether `steps` is built: the kernels have decoded a token since the last reset."""
        return self.steps is not None

    def reset(self) -> None:
        self.steps, self.declined = None, None

    def _build(self) -> None:
        """Build `steps` against the model's current weights, or set `declined` to why not.
        Raises ValueError for norms the kernels cannot read."""
        model = self.model
        reason = unsupported(model)
        if reason:
            self.declined = reason
            return
        steps = (kernels.LayerStep * len(model.layers))()
        for i, block in enumerate(model.layers):
            steps[i] = _layer_step(model.cfg, block)
        self.bases = [model.cfg.rope_local_base if b.sliding else model.cfg.rope_base for b in model.layers]
        self.bound = [None] * len(model.layers)
        self.steps, self.declined = steps, ""

    def run(self, h: Tensor, position: int, start: int, end: int, skip: frozenset[int] = frozenset()) -> Tensor | None:
        """Layers [start, end) on h (1, T, D) for T tokens in cache slots position .. position+T-1
        (each exactly as if it came alone, in order), less those in `skip` (they neither run nor
        touch their caches); None when the model is declined. Raises ValueError for a slot or range
        outside the caches."""
        if self.steps is None:
            if self.declined is None:
                self._build()
            if self.steps is None:
                return None
        caches, rope, bound = self.model.caches, self.model.rope, self.bound
        for i in range(start, end):
            if i in skip:
                continue
            cache: KVCache | None = caches[i]
            if cache is None:  # before the check below: a dead reference also reads as None
                raise ValueError(f"layer {i} has no KV cache; setup_cache covered other layers")
            cos, sin = rope[self.bases[i]]
            seen = bound[i]
            if seen is None or seen[0]() is not cache or seen[1]() is not cos:  # another request's, or new
                if cache.k.shape[0] != 1 or not (cache.k.is_contiguous() and cache.v.is_contiguous()):
                    raise ValueError("the kernels decode one sequence with contiguous caches")
                if cache.k.dtype not in (torch.float32, torch.float16):
                    raise ValueError(f"the kernels read float32 or float16 caches, not {cache.k.dtype}")
                step = self.steps[i]
                step.k_cache, step.v_cache, step.max_len = cache.k.data_ptr(), cache.v.data_ptr(), cache.max_len
                step.cos, step.sin = cos.data_ptr(), sin.data_ptr()
                step.kv_half = int(cache.k.dtype == torch.float16)
                bound[i] = (weakref.ref(cache), weakref.ref(cos))
        x = h.reshape(-1).to(torch.float32).clone()  # (T * D,), updated in place by each layer
        kernels.layers(self.steps, start, end, x, position, self._mask(skip) if skip else None, h.shape[1])
        return x.view(1, h.shape[1], -1)

    def _mask(self, skip: frozenset[int]) -> ctypes.Array:
        """One c_uint8 flag a layer, set for the layers in `skip`; kept per skip set (a request
        decodes every token with the same one)."""
        mask = self.masks.get(skip)
        if mask is None:
            n = len(self.model.layers)
            mask = (ctypes.c_uint8 * n)(*(int(i in skip) for i in range(n)))
            if len(self.masks) >= 64:  # many requests' sets: keep the newest
                self.masks.pop(next(iter(self.masks)))
            self.masks[skip] = mask
        return mask


__all__ = ["CpuDecoder", "unsupported"]
