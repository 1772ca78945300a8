"""Training early-layer-skipping routers (models.skip) on calibration text, and measuring skip sets.

Split from models.skip so that serving never loads the training code: this module imports
models.skip (Routers, RouterSet, prefill, skip_count), and models.skip never imports this one.

Training uses calibration documents only: a prompt of P tokens and its true continuation of C.
The teacher is the unskipped model's next-token distribution over the continuation. The student
reads the continuation teacher-forced through gates, h <- h + g_l (block_l(h) - h): in the forward
pass g is 0 for the round(ratio * L) layers the prompt scores lowest and 1 elsewhere, exactly
decode with that skip set (teacher-forcing the continuation as one chunk computes what decoding it
token by token does); the gradient reaches the scores through the soft gates sigmoid(s_l) (a
straight-through estimator). Loss: KL(teacher || student) per predicted token, plus `penalty` x
how far the mean soft keep gate sits above 1 - ratio, the push towards skipping. The routers start
from static skipping (`importance`) and a set keeps them only where they beat it (`train_set`). The
gradient flows through a dense copy of the served model (the kernels' quantized matmuls have no
backward), whose weights are the served ones dequantized. Deterministic for a seed.

Measures of a skip set against the unskipped model on held-out windows, teacher-forced:
`mean_kl`, `agreement`, `importance` (each layer skipped alone) and `quality` (bits per byte).

Shapes: L layers, D model width, P prompt tokens, C continuation tokens, B prompts a batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.errors import InvalidRequest
from models.skip import RouterMismatch, Routers, RouterSet, RouterSpec, default_protected, prefill, skip_count
from models.transformer import Step, Transformer

# -- Training --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkipTraining:
    """How routers are trained (`train`)."""

    seed: int = 0
    ratio: float = 0.2
    """The share of layers the routers learn to skip: the loss charges `penalty` for each unit of
    mean keep gate above 1 - ratio (of the unprotected layers), so the gates settle at that share
    and the KL decides which layers, for each prompt."""
    penalty: float = 5.0
    """Nats a token for each unit of mean keep gate above the target (against the KL)."""
    straight_through: bool = True
    """The student's forward skips exactly the round(ratio * L) layers each prompt scores lowest (what
    decode will do), and the gradient reaches the scores through the soft gates (a straight-through
    estimator); False: the soft gates alone, which lets every layer run a little and learns to keep
    them all."""
    prompt_tokens: int = 96
    continuation_tokens: int = 32
    epochs: int = 3
    batch: int = 8
    lr: float = 0.05
    weight_decay: float = 0.01
    protected: tuple[int, ...] | None = None
    """Layers never skipped; None: the first and the last."""


def dense_copy(model: Transformer) -> Transformer:
    """`models.quant.dequantized(model)` with no decoder and frozen weights: the served weights'
    values in plain fp32 modules, through which gradients flow (the kernels' matmuls have none)."""
    from models.quant import dequantized

    dense = dequantized(model)
    dense.decoder = None
    for p in dense.parameters():
        p.requires_grad_(False)
    return dense


def calibration_windows(
    tokenize: Callable[[str], list[int]], texts: Sequence[str], length: int, limit: int
) -> list[list[int]]:
    """Up to `limit` windows of exactly `length` token ids, at most two from each text, in order."""
    out: list[list[int]] = []
    for text in texts:
        ids = tokenize(text)
        for start in (0, length) if len(ids) >= 2 * length else (0,):
            if len(ids) >= start + length:
                out.append(ids[start : start + length])
        if len(out) >= limit:
            break
    return out[:limit]


def _gated_continuation(model: Transformer, h: Tensor, step: Step, gates: Tensor | None) -> Tensor:
    """The continuation h (B, C, D) through every layer, each layer's change scaled by its gate
    (B, L) (None: the unskipped model), after a prefill has filled the caches: logits (B, C, V)."""
    for i in range(model.cfg.n_layers):
        out = model.forward_layers(h, step, i, i + 1)
        h = out if gates is None else h + gates[:, i, None, None] * (out - h)
    return model.head(h)


def _batch_pass(model: Transformer, windows: Tensor, prompt: int) -> tuple[Tensor, Tensor, Tensor]:
    """Prefill the prompts (B, P) and embed the continuations: (pooled (B, L, D), continuation
    embeddings (B, C-1, D), their step); the caches hold the prompts."""
    B, T = windows.shape
    model.setup_cache(B, T)
    _, pooled = prefill(model, model.embed(windows[:, :prompt]), Step.at(0, prompt, B))
    cont = model.embed(windows[:, prompt : T - 1])  # inputs c_0 .. c_{C-2}; they predict c_1 .. c_{C-1}
    return pooled, cont, Step.at(prompt, T - 1 - prompt, B)


def train(
    model: Transformer,
    spec: RouterSpec,
    windows: Sequence[Sequence[int]],
    config: SkipTraining = SkipTraining(),
    progress: Callable[[int, int, float], None] | None = None,
    prior: Sequence[float] | None = None,
) -> Routers:
    """Routers for `model` from calibration `windows` (each prompt_tokens + continuation_tokens ids).

    prior: each layer's importance for every input (`importance`): the routers then start from
    static skipping (their biases ordered by it, weights zero) and learn each prompt's departures.
    progress(step, steps, loss) after each optimiser step. Deterministic for config.seed: the
    batches' order and the initial weights come from it, and each step's arithmetic is fixed."""
    P, C = config.prompt_tokens, config.continuation_tokens
    if C < 2 or P < 1:
        raise InvalidRequest("training needs a prompt and a continuation of at least 2 tokens")
    data = torch.tensor([list(w) for w in windows if len(w) == P + C], dtype=torch.long)
    if len(data) < config.batch:
        raise InvalidRequest(f"{len(data)} calibration windows of {P + C} tokens; need at least {config.batch}")
    L, D = model.cfg.n_layers, model.cfg.dim
    if (spec.n_layers, spec.dim) != (L, D):
        raise RouterMismatch(f"routers for {spec.n_layers} layers of width {spec.dim}, model has {L} of {D}")
    protected = frozenset(config.protected) if config.protected is not None else default_protected(L)
    dense = dense_copy(model)
    generator = torch.Generator().manual_seed(config.seed)
    weight = torch.zeros(L, D, requires_grad=True)
    # Keep gates start at the target share: the KL lifts the layers each prompt needs, the
    # penalty holds their mean there, and the rest sink.
    start = torch.full((L,), math.log((1.0 - config.ratio) / max(config.ratio, 1e-3)))
    if prior is not None:  # standardised log importance: the least important layers start lowest
        if len(prior) != L:
            raise InvalidRequest(f"a prior of {len(prior)} layers for a model of {L}")
        free = [i for i in range(L) if i not in protected and math.isfinite(prior[i])]
        logs = torch.tensor([math.log(max(prior[i], 1e-9)) for i in free], dtype=torch.float64)
        z = ((logs - logs.mean()) / logs.std().clamp(min=1e-9)).clamp(-3, 3).float()
        start[free] += z
    bias = start.clone().requires_grad_(True)
    fixed = torch.tensor([i in protected for i in range(L)])
    count = round(config.ratio * L)
    opt = torch.optim.AdamW([weight, bias], lr=config.lr, weight_decay=config.weight_decay)
    batches = [
        perm[i : i + config.batch]
        for _ in range(config.epochs)
        for perm in [torch.randperm(len(data), generator=generator)]
        for i in range(0, len(data) - config.batch + 1, config.batch)
    ]
    kl = keep = torch.tensor(0.0)
    for n, idx in enumerate(batches):
        batch = data[idx]
        with torch.no_grad():
            pooled, cont, step = _batch_pass(dense, batch, P)
            state = dense.request_state()
            teacher = F.log_softmax(_gated_continuation(dense, cont, step, None).float(), -1)
        dense.bind(state)  # the student rewrites the continuation's slots; the prompt's stay
        scores = (weight[None] * pooled).sum(-1) + bias  # (B, L)
        soft = torch.where(fixed, torch.ones(()), torch.sigmoid(scores))
        gates = soft
        if config.straight_through and count:  # the forward skips exactly what choose() would
            low = scores.masked_fill(fixed, math.inf).argsort(-1)[:, :count]  # (B, count)
            hard = torch.ones_like(soft).scatter(1, low, 0.0)
            gates = hard + soft - soft.detach()  # forward: hard; backward: the soft gates' gradient
        student = F.log_softmax(_gated_continuation(dense, cont, step, gates).float(), -1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()
        keep = soft[:, ~fixed].mean()
        loss = kl + config.penalty * torch.relu(keep - (1.0 - config.ratio))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress(n + 1, len(batches), float(loss.detach()))
    routers = Routers(
        spec,
        weight.detach().clone(),
        bias.detach().clone(),
        protected,
        training={
            **asdict(config),
            "windows": len(data),
            "final_kl": float(kl.detach()),
            "final_keep": float(keep.detach()),
        },
    )
    return routers


def train_set(
    model: Transformer,
    spec: RouterSpec,
    windows: Sequence[Sequence[int]],
    ratios: Sequence[float],
    config: SkipTraining = SkipTraining(),
    order_windows: int = 8,
    select_windows: int = 16,
    progress: Callable[[str, int, int], None] | None = None,
) -> RouterSet:
    """Routers for each ratio: what `tandem models train-routers` saves. progress(what, step, steps).

    The last `select_windows` calibration windows are held out of training; the layers' importance
    (`importance`, on the first `order_windows`) gives the static order and the routers' starting
    point. A ratio's trained routers are kept only when they beat static skipping on the held-out
    calibration windows (mean KL to the unskipped model); otherwise its routers are static skipping
    itself (zero weights, biases in the static order), and `training["selected"]` says which."""
    L = spec.n_layers
    protected = frozenset(config.protected) if config.protected is not None else default_protected(L)
    held, fit = list(windows[-select_windows:]), list(windows[:-select_windows])
    prior = importance(model, fit[:order_windows], config.prompt_tokens, protected)
    order = tuple(sorted((i for i in range(L) if i not in protected), key=lambda i: (prior[i], i)))
    by_ratio = {}
    for ratio in ratios:
        skip_count(L, ratio, len(protected))  # a clear error before any training

        def step(n: int, steps: int, loss: float, ratio: float = ratio) -> None:
            if progress is not None:
                progress(f"ratio {ratio:g}", n, steps)

        r = train(model, spec, fit, dataclasses.replace(config, ratio=ratio), step, prior=prior)
        routed = Routers(spec, r.weight, r.bias, r.protected, order, r.training)
        routed_kl = mean_kl(model, held, config.prompt_tokens, lambda p, r=routed, q=ratio: r.choose(p, q))
        static_kl = mean_kl(model, held, config.prompt_tokens, lambda p, r=routed, q=ratio: r.static(q))
        record = {**r.training, "held_out_kl": routed_kl, "static_kl": static_kl}
        if routed_kl < static_kl:
            chosen = dataclasses.replace(routed, training={**record, "selected": "routers"})
        else:  # static skipping as routers: zero weights, biases in the static order
            bias = torch.full((L,), float(L))
            bias[list(order)] = torch.arange(len(order), dtype=torch.float32)
            chosen = Routers(spec, torch.zeros(L, spec.dim), bias, protected, order, {**record, "selected": "static"})
        # what the hub weighs this ratio's quality by (SkipVariant.agreement; Budget.quality_floor)
        held_agreement = agreement(model, held, config.prompt_tokens, lambda p, r=chosen, q=ratio: r.choose(p, q))
        by_ratio[float(ratio)] = dataclasses.replace(chosen, training={**chosen.training, "agreement": held_agreement})
    return RouterSet(by_ratio)


# -- Measuring skip sets ---------------------------------------------------------------------------


@torch.no_grad()
def mean_kl(
    model: Transformer, windows: Sequence[Sequence[int]], prompt: int, choose: Callable[[Tensor], frozenset[int]]
) -> float:
    """Mean KL (nats a token) of decode with choose(pooled)'s skip set to the unskipped model over
    each window's continuation (the prompt at full depth)."""
    total = 0.0
    for ids in windows:
        pooled, cont, step = _batch_pass(model, torch.tensor([list(ids)]), prompt)
        state = model.request_state()
        base = F.log_softmax(_gated_continuation(model, cont, step, None).float(), -1)
        model.bind(state)
        logp = F.log_softmax(model.head(model.forward_layers(cont, step, skip=choose(pooled[0]))).float(), -1)
        total += float(F.kl_div(logp, base, log_target=True, reduction="none").sum(-1).mean())
    return total / max(len(windows), 1)


@torch.no_grad()
def agreement(
    model: Transformer, windows: Sequence[Sequence[int]], prompt: int, choose: Callable[[Tensor], frozenset[int]]
) -> float:
    """Share of the continuation positions (teacher-forced, as `mean_kl`) whose top-1 token with
    choose(pooled)'s skip set equals the unskipped model's, over all `windows` (0 for none)."""
    same = total = 0
    for ids in windows:
        pooled, cont, step = _batch_pass(model, torch.tensor([list(ids)]), prompt)
        state = model.request_state()
        base = _gated_continuation(model, cont, step, None)[0].argmax(-1)
        model.bind(state)
        top = model.head(model.forward_layers(cont, step, skip=choose(pooled[0])))[0].argmax(-1)
        same += int((top == base).sum())
        total += len(base)
    return same / total if total else 0.0


@torch.no_grad()
def static_order(
    model: Transformer, windows: Sequence[Sequence[int]], prompt: int, protected: frozenset[int]
) -> tuple[int, ...]:
    """Layers from least to most important for every input alike (`importance`), protected ones out."""
    kl = importance(model, windows, prompt, protected)
    return tuple(sorted((i for i in range(len(kl)) if i not in protected), key=lambda i: (kl[i], i)))


@torch.no_grad()
def importance(
    model: Transformer, windows: Sequence[Sequence[int]], prompt: int, protected: frozenset[int]
) -> tuple[float, ...]:
    """Each layer's importance for every input alike: the mean KL (nats a token) to the unskipped
    model over each window's continuation when that layer alone is skipped in decode; inf for a
    protected layer."""
    L = model.cfg.n_layers
    totals = torch.zeros(L, dtype=torch.float64)
    for ids in windows:
        batch = torch.tensor([list(ids)])
        _, cont, step = _batch_pass(model, batch, prompt)
        state = model.request_state()
        base = F.log_softmax(_gated_continuation(model, cont, step, None).float(), -1)
        for i in range(L):
            if i in protected:
                continue
            model.bind(state)
            logits = model.head(model.forward_layers(cont, step, skip=frozenset({i})))
            logp = F.log_softmax(logits.float(), -1)
            totals[i] += float(F.kl_div(logp, base, log_target=True, reduction="none").sum(-1).mean())
    n = max(len(windows), 1)
    return tuple(math.inf if i in protected else float(totals[i]) / n for i in range(L))


@dataclass(frozen=True)
class SkipQuality:
    """Quality of decoding with skip sets over held-out windows (`quality`)."""

    bpb: float
    """Bits per UTF-8 byte of the true continuation's tokens that decode predicts (c_1 onward)."""
    agreement: float
    """Share of those positions whose top-1 token equals the unskipped model's (teacher-forced)."""
    skipped: float
    """Mean number of layers skipped a window."""


@torch.no_grad()
def quality(
    model: Transformer,
    decode_bytes: Callable[[list[int]], bytes],
    windows: Sequence[Sequence[int]],
    prompt: int,
    choose: Callable[[Tensor], frozenset[int]],
    base: Transformer | None = None,
) -> SkipQuality:
    """Each window's first `prompt` ids prefilled at full depth, the rest teacher-forced with the
    skip set choose(pooled (L, D)) returns for that prompt; agreement with `base` (default: the
    same model unskipped; another model, e.g. the unpruned one, for a pruned model)."""
    bits = same = total = n_bytes = 0.0
    skipped = 0
    for ids in windows:
        batch = torch.tensor([list(ids)])
        pooled, cont, step = _batch_pass(model, batch, prompt)
        state = model.request_state()
        if base is None:
            reference = _gated_continuation(model, cont, step, None)[0]
        else:
            _, ref_cont, ref_step = _batch_pass(base, batch, prompt)
            reference = _gated_continuation(base, ref_cont, ref_step, None)[0]
        skip = choose(pooled[0])
        skipped += len(skip)
        model.bind(state)
        logits = model.head(model.forward_layers(cont, step, skip=skip))[0]  # (C-1, V)
        target = batch[0, prompt + 1 :]
        logp = F.log_softmax(logits.float(), -1)
        bits += float(-logp[torch.arange(len(target)), target].sum()) / math.log(2)
        same += int((logits.argmax(-1) == reference.argmax(-1)).sum())
        total += len(target)
        cont_ids = list(ids[prompt:])
        n_bytes += len(decode_bytes(cont_ids)) - len(decode_bytes(cont_ids[:1]))
    return SkipQuality(bits / max(n_bytes, 1), same / max(total, 1), skipped / max(len(windows), 1))


__all__ = [
    "SkipQuality",
    "SkipTraining",
    "agreement",
    "calibration_windows",
    "dense_copy",
    "importance",
    "mean_kl",
    "quality",
    "static_order",
    "train",
    "train_set",
]
