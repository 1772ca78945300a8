"""Early layer skipping, FiRST-style: per-request routers choose at prefill which layers decode skips.

Prefill always runs every layer, so every layer's KV cache holds the prompt. A router per layer l
reads the hidden state entering layer l, mean-pooled over the prompt and scaled to unit RMS
(x_l, (D,)), and scores it: keep logit s_l = w_l . x_l + b_l. A request skips the layers it scores
lowest: `ratio * n_layers` of them (`Routers.choose`), never a `protected` one (the first and the
last by default). The set is fixed for the whole decode; a skipped layer neither runs nor writes
its cache during decode, and nothing reads it (Transformer.forward_layers(skip=...), one C call a
token on the kernels' route).

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

Shapes: L layers, D model width, P prompt tokens, C continuation tokens, B prompts a batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from models.errors import InvalidRequest
from models.sampling import MAX_SKIP_RATIO
from models.transformer import Step, Transformer

FORMAT = 1
MAX_RATIO = MAX_SKIP_RATIO
"""The largest share of layers a request may skip."""


class RouterMismatch(InvalidRequest):
    """Routers trained for another model, precision or layer count than the one they would steer."""


@dataclass(frozen=True)
class RouterSpec:
    """What routers were trained for; `Routers.load` refuses any other model."""

    model: str
    """The zoo name (or label) of the base model."""
    quant: str
    """The precision it is served at (models.runtime: "source", "int4", "fp32", ...)."""
    n_layers: int
    dim: int


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


@dataclass(frozen=True)
class Routers:
    """Trained routers for one model: weight (L, D), bias (L,)."""

    spec: RouterSpec
    weight: Tensor
    bias: Tensor
    protected: frozenset[int]
    static_order: tuple[int, ...] = ()
    """Layers from least to most important for every input alike (each one's KL when it alone is
    skipped, over calibration text): the static-skipping baseline (`static`)."""
    training: dict = field(default_factory=dict)
    """The SkipTraining used and the final loss terms, for the record."""

    def scores(self, pooled: Tensor) -> Tensor:
        """Keep logits (L,) for one prompt's pooled layer inputs (L, D) (`pool`)."""
        if pooled.shape != self.weight.shape:
            raise ValueError(f"pooled inputs {tuple(pooled.shape)} for routers of {tuple(self.weight.shape)}")
        return (self.weight * pooled.float()).sum(-1) + self.bias

    def choose(self, pooled: Tensor, ratio: float) -> frozenset[int]:
        """The `round(ratio * L)` unprotected layers this prompt scores lowest."""
        count = skip_count(self.spec.n_layers, ratio, len(self.protected))
        order = [i for i in torch.argsort(self.scores(pooled)).tolist() if i not in self.protected]
        return frozenset(order[:count])

    def static(self, ratio: float) -> frozenset[int]:
        """The same `round(ratio * L)` least important layers for every prompt."""
        count = skip_count(self.spec.n_layers, ratio, len(self.protected))
        return frozenset([i for i in self.static_order if i not in self.protected][:count])

    def save(self, path: Path) -> None:
        """routers.pt (tensors) and routers.json (what they are for) in directory `path`."""
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"weight": self.weight, "bias": self.bias}, path / "routers.pt")
        meta = {
            "format": FORMAT,
            "spec": asdict(self.spec),
            "protected": sorted(self.protected),
            "static_order": list(self.static_order),
            "training": self.training,
        }
        (path / "routers.json").write_text(json.dumps(meta, indent=1) + "\n")

    @staticmethod
    def load(path: Path, expect: RouterSpec) -> Routers:
        """Routers saved in `path`, refused (RouterMismatch) when trained for another model,
        precision or layer count than `expect`; InvalidRequest for a missing or corrupt file."""
        try:
            meta = json.loads((path / "routers.json").read_text())
            tensors = torch.load(path / "routers.pt", weights_only=True)
            spec = RouterSpec(**meta["spec"])
            weight, bias = tensors["weight"], tensors["bias"]
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise InvalidRequest(f"{path}: not readable routers ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise InvalidRequest(f"{path}/routers.json: format {meta.get('format')!r}, this build reads {FORMAT}")
        if spec != expect:
            diff = ", ".join(
                f"{k} {getattr(spec, k)!r} (not {getattr(expect, k)!r})"
                for k in ("model", "quant", "n_layers", "dim")
                if getattr(spec, k) != getattr(expect, k)
            )
            raise RouterMismatch(f"{path}: routers trained for another model: {diff}")
        if weight.shape != (spec.n_layers, spec.dim) or bias.shape != (spec.n_layers,):
            raise InvalidRequest(
                f"{path}/routers.pt: tensors {tuple(weight.shape)}, {tuple(bias.shape)} do not match its spec"
            )
        return Routers(
            spec, weight, bias, frozenset(meta["protected"]), tuple(meta["static_order"]), meta.get("training", {})
        )


@dataclass(frozen=True)
class SkipReport:
    """What a request's decode skipped: on its last TokenEvent, and in the answer's metadata."""

    layers: tuple[int, ...]
    """The layers decode skipped (sorted); in the lossless mode, those the drafts skipped."""
    lossless: bool
    drafted: int = 0
    """Lossless mode: tokens drafted, and of them accepted by the whole model."""
    accepted: int = 0


@dataclass(frozen=True)
class SkipVariant:
    """One trained skip ratio as the hub weighs it (ModelInfo.skip_variants): what it saves and how
    close it stays."""

    ratio: float
    """The trained skip ratio (SamplingParams.skip_ratio)."""
    layers: int
    """Layers decode skips at that ratio (`skip_count`)."""
    agreement: float
    """Top-1 agreement with the unskipped model on held-out calibration text, teacher-forced (`train_set`);
    0.0 where the routers' record lacks it (routers trained before it was measured)."""


@dataclass(frozen=True)
class RouterSet:
    """One model's routers, one set a trained skip ratio: a request uses the set trained nearest
    its ratio, and skips round(ratio * L) layers."""

    by_ratio: dict[float, Routers]

    def __post_init__(self) -> None:
        if not self.by_ratio:
            raise InvalidRequest("a router set needs routers for at least one ratio")
        specs = {r.spec for r in self.by_ratio.values()}
        if len(specs) > 1:
            raise RouterMismatch(f"routers for several models in one set: {sorted(map(str, specs))}")

    @property
    def spec(self) -> RouterSpec:
        return next(iter(self.by_ratio.values())).spec

    def for_ratio(self, ratio: float) -> Routers:
        return self.by_ratio[min(self.by_ratio, key=lambda r: (abs(r - ratio), r))]

    def snapped(self, ratio: float) -> float:
        """The trained ratio `ratio` stands for when it is one up to float32 rounding (the wire carries
        float32: 0.1 arrives as 0.10000000149, and round(0.1000000015 x 25) would skip a layer more
        than the variant the hub advertised); else `ratio` itself."""
        near = min(self.by_ratio, key=lambda r: abs(r - ratio))
        return near if abs(near - ratio) <= 1e-6 else ratio

    def choose(self, pooled: Tensor, ratio: float) -> frozenset[int]:
        ratio = self.snapped(ratio)
        return self.for_ratio(ratio).choose(pooled, ratio)

    def variants(self) -> list[SkipVariant]:
        """Each trained ratio, by ratio: the layers it skips and its measured agreement (0.0 unmeasured);
        a ratio no request could run (beyond the layers that may be skipped) is left out."""
        out = []
        for ratio, r in sorted(self.by_ratio.items()):
            try:
                layers = skip_count(r.spec.n_layers, ratio, len(r.protected))
            except InvalidRequest:
                continue
            measured = r.training.get("agreement")
            quality = float(measured) if isinstance(measured, (int, float)) and math.isfinite(measured) else 0.0
            out.append(SkipVariant(ratio, layers, quality))
        return out

    def save(self, directory: Path) -> None:
        for ratio, routers in self.by_ratio.items():
            routers.save(directory / f"r{ratio:g}")

    @staticmethod
    def load(directory: Path, expect: RouterSpec) -> RouterSet:
        """Every r<ratio>/ under `directory`; RouterMismatch for routers of another model, InvalidRequest
        for none or a corrupt one (naming the file)."""
        subdirs = sorted(p for p in directory.glob("r*") if (p / "routers.json").is_file())
        if not subdirs:
            raise InvalidRequest(f"{directory}: no routers (train them: tandem models train-routers)")
        by_ratio: dict[float, Routers] = {}
        for sub in subdirs:
            routers = Routers.load(sub, expect)
            ratio = routers.training.get("ratio")
            if not isinstance(ratio, (int, float)):
                raise InvalidRequest(f"{sub}/routers.json: no training ratio recorded")
            by_ratio[float(ratio)] = routers
        return RouterSet(by_ratio)


def routers_dir(name: str, quant: str) -> Path:
    """Where a zoo model's routers live: beside the pulled models, one directory a served precision."""
    from models import zoo

    return zoo.trained_dir("routers", name, quant)


def find_routers(name: str, quant: str, n_layers: int, dim: int) -> RouterSet | None:
    """The routers trained for this model as served, or None when none were trained; raises
    RouterMismatch (another model's, another precision's) or InvalidRequest (a corrupt file)."""
    directory = routers_dir(name, quant)
    if not directory.is_dir():
        return None
    return RouterSet.load(directory, RouterSpec(name, quant, n_layers, dim))


def skip_count(n_layers: int, ratio: float, protected: int = 0) -> int:
    """Layers a skip ratio means; InvalidRequest outside [0, MAX_RATIO] or beyond the unprotected ones."""
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 <= ratio <= MAX_RATIO):
        raise InvalidRequest(f"skip ratio must be in [0, {MAX_RATIO}], got {ratio!r}")
    count = round(ratio * n_layers)
    if count > n_layers - protected:
        raise InvalidRequest(
            f"skip ratio {ratio} asks for {count} of the {n_layers - protected} layers that may be skipped"
        )
    return count


def default_protected(n_layers: int) -> frozenset[int]:
    return frozenset({0, n_layers - 1})


# -- Pooled layer inputs ---------------------------------------------------------------------------


def _unit_rms(x: Tensor) -> Tensor:
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def prefill(model: Transformer, h: Tensor, step: Step) -> tuple[Tensor, Tensor]:
    """A full-depth prefill of h (B, T, D) at `step` (no padding), layer by layer: the output
    (B, T, D) and each layer's input mean-pooled over the T tokens at unit RMS, (B, L, D)."""
    pools = []
    for i in range(model.cfg.n_layers):
        pools.append(_unit_rms(h.float().mean(1)))
        h = model.forward_layers(h, step, i, i + 1)
    return h, torch.stack(pools, 1)


# -- Training --------------------------------------------------------------------------------------


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
    "MAX_RATIO",
    "RouterMismatch",
    "RouterSet",
    "RouterSpec",
    "Routers",
    "SkipQuality",
    "SkipReport",
    "SkipTraining",
    "SkipVariant",
    "agreement",
    "calibration_windows",
    "default_protected",
    "dense_copy",
    "find_routers",
    "importance",
    "mean_kl",
    "prefill",
    "quality",
    "routers_dir",
    "skip_count",
    "static_order",
    "train",
    "train_set",
]
