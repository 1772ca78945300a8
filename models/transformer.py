"""One compact decoder-only transformer for the llama and gemma3 families.

Shapes in comments: B batch, T new tokens, S cached key positions, D model width, H query heads,
K key/value heads, hd head width.

The forward pass is split into three public pieces so that split inference and layer skipping can
run any half-open layer range `[start, end)` on hidden states:

    h = model.embed(tokens)                                  # (B, T, D)
    h = model.forward_layers(h, step, start=0, end=k)        # layers [0, k)
    h = model.forward_layers(h, step, start=k, end=None)     # layers [k, N)
    logits = model.head(h)                                   # (B, T, V)

Per-request state (the KV caches and the RoPE tables they were set up with) lives on the model
while a sequence runs; engines that interleave requests keep a `RequestState` for each and `bind`
it before running that request. Single tokens of one sequence may take another route than
torch's ops through the `decoder` slot (a `StepDecoder`: models.cpu.prepare_cpu attaches the CPU
kernels' one); this module imports none of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import kernels
from models.config import ModelConfig
from models.kv_cache import KVCache

PREFILL_CHUNK = 256  # prompt tokens a CPU forward pass takes at once (Transformer.forward_layers)


@dataclass(frozen=True)
class Step:
    """Where the new tokens of one forward call sit.

    cache_pos: (T,) cache slots written by this call; slots are shared by the batch.
    pad: (B,) count of left-padding slots per row; those slots are never attended and RoPE
         positions of a row count from its first real token.
    """

    cache_pos: Tensor
    pad: Tensor
    fixed: bool = False
    """Attention reads all of the cache's slots under a mask that hides those after the
    position, so that no shape depends on it (see Transformer.forward_fixed)."""
    causal_from: int | None = None
    """Set by forward_layers when the slots are consecutive from this one and no row is padded:
    the CPU kernels then run attention without a mask."""

    @staticmethod
    def at(start: int, length: int, batch: int = 1, pad: Tensor | None = None) -> Step:
        """Slots [start, start+length) for a batch with the given left padding (default none)."""
        cache_pos = torch.arange(start, start + length, dtype=torch.long)
        pad = torch.zeros(batch, dtype=torch.long) if pad is None else pad
        return Step(cache_pos, pad)

    @property
    def positions(self) -> Tensor:
        """(B, T) RoPE positions: cache slot minus the row's padding."""
        return self.cache_pos[None, :] - self.pad[:, None]


@dataclass(frozen=True)
class RequestState:
    """One sequence's state besides the weights, as `Transformer.setup_cache` makes it; an engine
    keeps one a request and binds it (`Transformer.bind`) before running that request."""

    caches: list[KVCache | None]
    """One KV cache a layer, None for the layers outside the range set up."""
    rope: dict[float, tuple[Tensor, Tensor]]
    """RoPE base -> (cos, sin), each (max_len, hd), in the model's device and dtype."""


class StepDecoder(Protocol):
    """Another route than torch's ops for one token of one sequence through a layer range, over the
    model's bound caches (models.fast_decode.CpuDecoder: one C call a token on CPU)."""

    def run(self, h: Tensor, position: int, start: int, end: int, skip: frozenset[int] = frozenset()) -> Tensor | None:
        """Layers [start, end) less `skip` on h (1, T, D) for T tokens in cache slots position ..
        position+T-1, each computed exactly as if it came alone: (1, T, D).
        None when this route cannot run the model as it now is (the caller runs torch's ops);
        raises ValueError for a slot or range outside the caches, before writing anything."""

    def reset(self) -> None:
        """The model's weights or caches were replaced (setup_cache): forget what was derived from them."""


def _causal_start(step: Step) -> int | None:
    """The first slot when `step` writes consecutive slots of unpadded rows (attention is then
    plain causal, offset by it, within any sliding window); else None."""
    pos = step.cache_pos
    if not bool((step.pad == 0).all()) or not bool((pos[1:] - pos[:-1] == 1).all()):
        return None
    return int(pos[0])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the activation dtype, as both reference implementations do;
        # torch's fused kernel gives the same numbers as the four-op form in one pass. On CPU in
        # fp32, one C pass over the rows (a prompt's five torch ops cost ~3% of its prefill).
        if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and x.numel():
            out = kernels.rmsnorm(x, self.weight, self.eps)
            if out is not None:
                return out
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(head_dim: int, base: float, length: int) -> tuple[Tensor, Tensor]:
    """cos and sin, each (length, head_dim), in the rotate-half (NeoX) layout."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (L, hd/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, hd); cos, sin: (B, 1, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.window = 0  # keys a query sees on a sliding layer (Block sets it); 0: all earlier ones
        self.capture: list[tuple[Tensor, Tensor]] | None = None
        """When a list: each forward appends its keys before RoPE and its values, each (B, T, K, hd)
        (KV prediction, models.kvpred, reads a layer's this way; torch's route only)."""
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache, step: Step) -> Tensor:
        """mask (B, 1, T, S) boolean, or None for plain causal attention from slot 0."""
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, cfg.n_heads, cfg.head_dim)
        k = self.wk(x).view(B, T, cfg.n_kv_heads, cfg.head_dim)
        v = self.wv(x).view(B, T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.capture is not None:  # k copied: RoPE below rotates it in place
            self.capture.append((k.clone(), v))
        # One pass in C on the (T, H, hd) rows when it can take them, else five torch ops.
        roped = B == 1 and x.device.type == "cpu" and kernels.rope_((q[0], k[0]), cos[0, 0], sin[0, 0])
        rows = q[0]  # (T, H, hd), contiguous when roped in place
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|K, T, hd)
        if not roped:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = cache.update(step.cache_pos, k, v, whole=step.fixed)  # (B, K, S, hd)
        if roped and step.causal_from is not None and T > 1 and not cfg.attn_logit_softcap:
            # Prompt tokens on CPU: causal attention in C straight from the cache (either dtype).
            out = kernels.prefill_attention(rows, keys, values, cfg.query_scale, step.causal_from, self.window)
            if out is not None:
                return self.wo(out.reshape(B, T, cfg.n_heads * cfg.head_dim))
        if keys.dtype != q.dtype:  # a half-precision cache: attention itself runs in q's dtype
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        if cfg.attn_logit_softcap:
            out = _softcapped_attention(q, keys, values, mask, cfg)
        else:
            out = F.scaled_dot_product_attention(
                q,
                keys,
                values,
                attn_mask=mask,
                is_causal=mask is None,  # lets the kernel skip the blocks above the diagonal
                scale=cfg.query_scale,
                enable_gqa=cfg.n_kv_heads != cfg.n_heads,
            )  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim))


def _softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, cfg: ModelConfig) -> Tensor:
    """Explicit attention for models that soft-cap scores (SDPA cannot)."""
    if mask is None:  # causal from slot 0: query t sees keys [0, t]
        T, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    rep = cfg.n_heads // cfg.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * cfg.query_scale  # (B, H, T, S)
    scores = torch.tanh(scores / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.gelu = cfg.act == "gelu_tanh"

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate(x), self.w_up(x)
        if x.device.type == "cpu" and kernels.glu_(gate, up, self.gelu):  # act(gate) * up, in place
            return self.w_down(gate)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.w_down(gate * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.sliding = cfg.is_sliding(layer)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.attention.window = cfg.sliding_window if self.sliding else 0
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.sandwich = cfg.sandwich_norm
        if cfg.sandwich_norm:
            self.post_attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.post_ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache, step: Step) -> Tensor:
        a = self.attention(self.attn_norm(x), cos, sin, mask, cache, step)
        if self.sandwich:
            a = self.post_attn_norm(a)
        x = x + a
        f = self.feed_forward(self.ffn_norm(x))
        if self.sandwich:
            f = self.post_ffn_norm(f)
        return x + f


class Transformer(nn.Module):
    """The whole model. Build it (on `meta` when loading), then `setup_cache` before a forward
    (or `bind` a state that an earlier `setup_cache` made)."""

    def __init__(self, cfg: ModelConfig, layer_ids: Sequence[int] | None = None) -> None:
        """`layer_ids`: the original index of each block (a pruned model keeps its layers' own
        settings, e.g. Gemma's sliding or global attention); default 0..n_layers-1."""
        super().__init__()
        self.cfg = cfg
        table = torch.empty(cfg.vocab_size, cfg.dim)
        if table.device.type != "meta":
            nn.init.normal_(table)  # nn.Embedding's own init. On meta, normal_ would import torch's
            # Python meta kernels (sympy, mpmath: ~70 MB of a loaded bundle's RSS) for nothing.
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=table)
        ids = list(range(cfg.n_layers)) if layer_ids is None else list(layer_ids)
        if len(ids) != cfg.n_layers:
            raise ValueError(f"{len(ids)} layer ids for {cfg.n_layers} layers")
        self.layers = nn.ModuleList(Block(cfg, i) for i in ids)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if not cfg.tied_embeddings:
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.caches: list[KVCache | None] = [None] * cfg.n_layers
        """The bound sequence's KV caches, one a layer (setup_cache, bind)."""
        self.rope: dict[float, tuple[Tensor, Tensor]] = {}
        """The bound sequence's RoPE tables: base -> (cos, sin), each (max_len, hd)."""
        self.decoder: StepDecoder | None = None
        """The route single tokens of one sequence take instead of torch's ops when it can run
        them (models.cpu.prepare_cpu attaches the CPU kernels' one); None: torch's ops."""
        self.fast_decode = True
        """Use `decoder` when one is attached (False: always torch's ops, for comparisons)."""
        self.kv_dtype: torch.dtype | None = None
        """The KV caches' dtype (None: the weights'). float16 halves the bytes decode reads a token."""

    # -- set-up ---------------------------------------------------------------------------------

    def setup_cache(self, batch: int, max_len: int, start: int = 0, end: int | None = None) -> None:
        """Preallocate KV caches of `max_len` slots for layers [start, end); frees the others."""
        end = self.cfg.n_layers if end is None else end
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        shape = (batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim)
        self.caches = [
            KVCache(*shape, self.kv_dtype or dtype, device) if start <= i < end else None
            for i in range(self.cfg.n_layers)
        ]
        self.rope = {}
        for base in {self.cfg.rope_base, self.cfg.rope_local_base}:
            cos, sin = rope_tables(self.cfg.head_dim, base, max_len)
            self.rope[base] = (cos.to(device, dtype), sin.to(device, dtype))
        if self.decoder is not None:
            self.decoder.reset()  # weights may have changed since it last ran

    def request_state(self) -> RequestState:
        """The bound sequence's caches and RoPE tables, to `bind` again later."""
        return RequestState(self.caches, self.rope)

    def bind(self, state: RequestState) -> None:
        """Run the next forward passes on `state` (another request's caches and tables)."""
        self.caches, self.rope = state.caches, state.rope

    @property
    def max_len(self) -> int:
        """Slots in the current cache (0 before `setup_cache`)."""
        cache = next((c for c in self.caches if c is not None), None)
        return 0 if cache is None else cache.max_len

    # -- forward pieces -------------------------------------------------------------------------

    def embed(self, tokens: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, D) hidden states."""
        h = self.tok_embeddings(tokens)
        if self.cfg.embed_scale != 1.0:
            h = h * torch.tensor(self.cfg.embed_scale, dtype=h.dtype)
        return h

    def forward_layers(
        self, h: Tensor, step: Step, start: int = 0, end: int | None = None, skip: frozenset[int] = frozenset()
    ) -> Tensor:
        """Run layers [start, end) on (B, T, D) hidden states, writing their KV caches.

        skip: layers that neither run nor read or write their caches (early layer skipping: a
        request decodes with one skip set after a full-depth prefill, so a skipped layer's cache
        holds the prompt only and nothing ever reads it)."""
        end = self.cfg.n_layers if end is None else end
        if not 0 <= start <= end <= self.cfg.n_layers:
            raise ValueError(f"layer range [{start}, {end}) outside [0, {self.cfg.n_layers})")
        if skip and not all(isinstance(i, int) and 0 <= i < self.cfg.n_layers for i in skip):
            raise ValueError(f"skip names layers outside [0, {self.cfg.n_layers}): {sorted(skip)}")
        if start == end:
            return h
        device = self.norm.weight.device
        if step.cache_pos.device != device:  # positions live with the model (CUDA)
            step = Step(step.cache_pos.to(device), step.pad.to(device))
        last = int(step.cache_pos[-1]) + 1
        if last > self.max_len:
            raise ValueError(f"cache slot {last - 1} beyond the cache of {self.max_len} slots; call setup_cache")
        if h.shape[0] == 1 and h.shape[1] == 1 and self.fast_decode and self.decoder is not None:
            out = self.decoder.run(h, last - 1, start, end, skip) if int(step.pad[0]) == 0 else None
            if out is not None:  # one token of one sequence, by the decoder's route
                return out
        causal_from = _causal_start(step)
        T = h.shape[1]
        if T > PREFILL_CHUNK and causal_from is not None and h.device.type == "cpu" and not step.fixed:
            # A long prompt in pieces, each through every layer before the next: the activations'
            # memory stays that of PREFILL_CHUNK tokens, and GEMMs of that many rows run as fast.
            pieces = [
                self.forward_layers(
                    h[:, i : i + PREFILL_CHUNK], Step(step.cache_pos[i : i + PREFILL_CHUNK], step.pad), start, end, skip
                )
                for i in range(0, T, PREFILL_CHUNK)
            ]
            return torch.cat(pieces, dim=1)
        step = dataclasses.replace(step, causal_from=causal_from)
        # A fresh prompt's mask is plain causal (for sliding layers too while it fits their window):
        # None lets SDPA skip the blocks above the diagonal, and the mask is never built.
        causal = causal_from == 0  # consecutive from slot 0: slots [0, last)
        masks = {
            sliding: None
            if causal and (not sliding or last <= self.cfg.sliding_window)
            else self._mask(step, last, sliding)
            for sliding in {blk.sliding for blk in self.layers}
        }
        positions = step.positions.clamp(min=0)  # (B, T); padding slots get position 0, never attended
        ropes = {base: (cos[positions][:, None], sin[positions][:, None]) for base, (cos, sin) in self.rope.items()}
        return self._blocks(h, step, ropes, masks, start, end, skip)

    def forward_decode(
        self, h: Tensor, slot: int, start: int = 0, end: int | None = None, skip: frozenset[int] = frozenset()
    ) -> Tensor:
        """T tokens of one sequence, h (1, T, D), at consecutive cache slots from `slot`, through
        layers [start, end) less `skip`, each computed exactly as decoding it alone would (a
        self-speculative verify pass: its logits are the plain decode's, bit for bit). On the
        decoder's route one call for all T (a layer's weights read once for them); else one
        forward_layers a token."""
        end = self.cfg.n_layers if end is None else end
        if h.shape[0] != 1:
            raise ValueError("forward_decode takes one sequence")
        T = h.shape[1]
        if slot + T > self.max_len:
            raise ValueError(f"cache slot {slot + T - 1} beyond the cache of {self.max_len} slots; call setup_cache")
        if self.fast_decode and self.decoder is not None and start < end:
            out = self.decoder.run(h, slot, start, end, skip)
            if out is not None:
                return out
        return torch.cat(
            [self.forward_layers(h[:, t : t + 1], Step.at(slot + t, 1), start, end, skip) for t in range(T)], dim=1
        )

    def _blocks(
        self, h: Tensor, step: Step, ropes: dict, masks: dict, start: int, end: int, skip: frozenset[int] = frozenset()
    ) -> Tensor:
        """Layers [start, end) less `skip` on h. ropes: RoPE base -> (cos, sin) rows (B, 1, T, hd);
        masks: sliding -> (B, 1, T, S) or None (plain causal)."""
        for i in range(start, end):
            if i in skip:
                continue
            block, cache = self.layers[i], self.caches[i]
            if cache is None:
                raise ValueError(f"layer {i} has no KV cache; setup_cache covered other layers")
            cos, sin = ropes[self.cfg.rope_local_base if block.sliding else self.cfg.rope_base]
            h = block(h, cos, sin, masks[block.sliding], cache, step)
        return h

    def forward_fixed(self, h: Tensor, position: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """One token of one sequence, h (1, 1, D), at cache slot `position` ((1,) long, on the
        model's device), through layers [start, end).

        Every shape is fixed and nothing waits for the device, so a CUDA graph can capture this
        once and replay it at any position: attention reads all max_len slots under a mask built
        on the device from `position`. Slots after it are hidden whatever finite values they hold
        (a reused cache's stale keys; an inf or NaN there would still reach the sums as 0 * inf).
        The caller checks that position < max_len; forward_layers on one token computes the same.
        """
        end = self.cfg.n_layers if end is None else end
        if not 0 <= start <= end <= self.cfg.n_layers or h.shape[:2] != (1, 1):
            raise ValueError(f"forward_fixed takes one token (1, 1, D) through layers within [0, {self.cfg.n_layers})")
        if any(self.caches[i] is None for i in range(start, end)):
            raise ValueError(f"layers [{start}, {end}) need KV caches; call setup_cache")
        step = Step(position, torch.zeros(1, dtype=torch.long, device=position.device), fixed=True)
        slots = torch.arange(self.max_len, device=position.device)
        seen = slots <= position  # (S,)
        masks = {False: seen, True: seen & (position - slots < self.cfg.sliding_window)}
        masks = {sliding: m[None, None, None] for sliding, m in masks.items()}  # (1, 1, 1, S)
        ropes = {base: (c[position][None, None], s[position][None, None]) for base, (c, s) in self.rope.items()}
        return self._blocks(h, step, ropes, masks, start, end)

    def head(self, h: Tensor) -> Tensor:
        """(B, T, D) hidden states after the last layer -> (B, T, V) logits."""
        h = self.norm(h)
        if not self.cfg.tied_embeddings:
            logits = self.output(h)
        elif isinstance(self.tok_embeddings, nn.Embedding):
            logits = F.linear(h, self.tok_embeddings.weight)
        else:  # a quantized table (models.quant.QuantEmbedding)
            logits = self.tok_embeddings.project(h)
        if self.cfg.final_logit_softcap:
            cap = self.cfg.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, tokens: Tensor, step: Step) -> Tensor:
        """(B, T) token ids -> (B, T, V) logits through every layer."""
        return self.head(self.forward_layers(self.embed(tokens), step))

    def _mask(self, step: Step, kv_len: int, sliding: bool) -> Tensor:
        """(B, 1, T, S) boolean: True where query t may attend key slot s."""
        q = step.cache_pos[None, :, None]  # (1, T, 1)
        s = torch.arange(kv_len, device=q.device)[None, None, :]  # (1, 1, S)
        allowed = (s <= q) & (s >= step.pad[:, None, None])  # causal, and never a padding slot
        if sliding:
            allowed = allowed & (q - s < self.cfg.sliding_window)
        return allowed[:, None].to(self.norm.weight.device)
