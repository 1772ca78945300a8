"""Batch-1 decode on CPU through our kernels: one C call a token instead of ~15 torch ops a layer.

At batch 1 a 135M-parameter model spends more time dispatching small torch ops than reading its
weights. `CpuDecoder` hands the quantized layers to `kernels.layers`, one C call that runs norms,
projections, RoPE, the cache write, attention and the MLP of each layer for one token. Python still chooses
which layers run (layer ranges for split inference, skipped layers), and prefill, batches and
unquantized models keep the torch path; both paths read and write the same KV caches, so a
request can move between them at any token.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from models import kernels
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


class CpuDecoder:
    """The kernels' view of one quantized model; rebuilt whenever the model's caches are set up
    (weights may have been replaced since)."""

    def __init__(self, model: Transformer) -> None:
        reason = unsupported(model)
        if reason:
            raise ValueError(reason)
        cfg = model.cfg
        self.model = model
        self.steps = (kernels.LayerStep * len(model.layers))()  # one C array; elements are views
        self.bases: list[float] = []
        # What each step points at: weak references to the layer's cache and RoPE table (a
        # released request's cache is not kept alive, and one freed is never mistaken for a new
        # one at the same address). Checking them costs ~0.5 us a layer; the pointers, 4.5.
        self.bound: list[tuple[weakref.ref, weakref.ref] | None] = [None] * len(model.layers)
        for i, block in enumerate(model.layers):
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
            self.steps[i] = kernels.LayerStep(
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
            self.bases.append(cfg.rope_local_base if block.sliding else cfg.rope_base)

    def run(self, h: Tensor, position: int, start: int, end: int) -> Tensor:
        """Layers [start, end) on h (1, 1, D) for the token in cache slot `position`."""
        caches, rope, bound = self.model.caches, self.model._rope, self.bound
        for i in range(start, end):
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
        x = h.reshape(-1).to(torch.float32).clone()  # (D,), updated in place by each layer
        kernels.layers(self.steps, start, end, x, position)
        return x.view(1, 1, -1)


__all__ = ["CpuDecoder", "unsupported"]
