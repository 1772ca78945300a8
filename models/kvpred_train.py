"""Training KV predictors (models.kvpred) and measuring them, on calibration text only.

Least squares first: per base layer, the ridge-regularised normal equations over every token of
the fit's windows (float64), from the auxiliary layers' keys and values to the whole model's
(keys before RoPE); closed form, deterministic. Then, optionally, an end-to-end fine-tune of the
predictors against the whole model's next-token distribution with an L1 term to the true cache
(`finetune`). Each depth's quality (agreement, bits-per-byte ratio) and cost (share of a whole
prefill) are measured on calibration windows held out of the fit and recorded with it.

Shapes as in models.kvpred.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.errors import InvalidRequest
from models.kvpred import (
    KVPredictor,
    PredictorSet,
    PredictorSpec,
    aux_layers_for,
    captured_pass,
    features,
    identity_weights,
    predict_prompt,
    prefix_layers,
    sources_for,
    write_kv,
)
from models.sampling import KV_DEPTHS
from models.transformer import Step, Transformer


@dataclass(frozen=True)
class KVTraining:
    """How predictors are trained (`train_set`)."""

    depths: tuple[float, ...] = KV_DEPTHS
    seed: int = 0
    """Orders the calibration documents the windows come from."""
    window_tokens: int = 512
    windows: int = 48
    """Calibration windows the least squares fit."""
    held_out: int = 8
    """Further calibration windows, held out of the fit, that measure each variant's quality."""
    continuation_tokens: int = 64
    """Of a held-out window, the tokens after its prompt that quality is measured on."""
    batch: int = 4
    ridge: float = 1e-4
    """Ridge weight, relative to the mean diagonal of a layer's Gram matrix."""
    influence_windows: int = 4
    """Windows block influence ranks the layers on (the first of the fit's)."""
    layouts: tuple[str, ...] = ("prefix", "influence")
    """Choices of auxiliary layers each depth tries (`layouts_for`); the best on held-out windows is kept."""
    finetune_epochs: int = 0
    """Passes of end-to-end fine-tuning over the fit's windows after least squares (0: none)."""
    lr: float = 3e-4
    l1: float = 0.05
    """Weight of the L1 distance to the true keys and values (relative to their mean magnitude)
    beside the KL to the whole model's next-token distribution."""


def calibration(tokenize: Callable[[str], list[int]], config: KVTraining = KVTraining()) -> list[list[int]]:
    """The windows `train_set` takes: config.windows + config.held_out windows of
    config.window_tokens ids from the calibration documents (never the evaluation ones), in an
    order the seed sets."""
    import random

    from models.corpus import documents
    from models.skip_train import calibration_windows

    docs = documents("calibration")
    random.Random(config.seed).shuffle(docs)
    need = config.windows + config.held_out
    return calibration_windows(tokenize, [d.text for d in docs], config.window_tokens, need)


def data_sha256(windows: Sequence[Sequence[int]]) -> str:
    """What the predictors were fitted on, for the manifest: the windows' token ids."""
    return hashlib.sha256(json.dumps([list(w) for w in windows]).encode()).hexdigest()


def _batches(windows: Sequence[Sequence[int]], size: int) -> Iterator[Tensor]:
    for i in range(0, len(windows), size):
        yield torch.tensor([list(w) for w in windows[i : i + size]])


@torch.no_grad()
def fit(
    model: Transformer,
    spec: PredictorSpec,
    windows: Sequence[Sequence[int]],
    aux_by_depth: dict[float, tuple[int, ...]],
    config: KVTraining = KVTraining(),
    progress: Callable[[str], None] | None = None,
) -> dict[float, KVPredictor]:
    """Least-squares predictors for each depth's auxiliary layers (`fit_sets`)."""
    fitted = fit_sets(model, spec, windows, list(aux_by_depth.items()), config, progress)
    return {p.depth: p for p in fitted}


def fit_sets(
    model: Transformer,
    spec: PredictorSpec,
    windows: Sequence[Sequence[int]],
    sets: Sequence[tuple[float, tuple[int, ...]]],
    config: KVTraining = KVTraining(),
    progress: Callable[[str], None] | None = None,
) -> list[KVPredictor]:
    """Least-squares predictors for each (depth, auxiliary layers) over `windows` (equal lengths):
    per base layer, W = (X'X + lambda I)^-1 X'Y with X the sources' features and Y the true keys
    (before RoPE) and values, accumulated in float64 over every token of every window. The whole
    model's pass is shared by every set; each set adds its auxiliary pass."""
    L = spec.n_layers
    sources = [sources_for(L, aux) for _, aux in sets]
    gram: list[list[Tensor | None]] = [[None] * L for _ in sets]
    cross: list[list[Tensor | None]] = [[None] * L for _ in sets]
    for n, tokens in enumerate(_batches(windows, config.batch)):
        B, T = tokens.shape
        model.setup_cache(B, T)
        _, true = captured_pass(model, tokens, range(L))
        for s, (_, aux) in enumerate(sets):
            dropped = frozenset(range(L)) - set(aux)
            _, got = captured_pass(model, tokens, aux, skip=dropped)
            for layer in range(L):
                x = features(got, sources[s][layer]).reshape(B * T, -1).double()
                k, v = true[layer]
                y = torch.cat([k.flatten(-2), v.flatten(-2)], -1).reshape(B * T, -1).double()
                g, c = x.T @ x, x.T @ y
                gram[s][layer] = g if gram[s][layer] is None else gram[s][layer] + g
                cross[s][layer] = c if cross[s][layer] is None else cross[s][layer] + c
        if progress is not None:
            progress(f"fit: {min((n + 1) * config.batch, len(windows))}/{len(windows)} windows")
    out = []
    for s, (depth, aux) in enumerate(sets):
        weights = []
        first = min(set(range(L)) - set(aux), default=L)
        for layer in range(L):
            if layer < first:  # the aux stream is the whole model's up to here: its own keys and values
                weights.append(identity_weights(spec))
                continue
            g, c = gram[s][layer], cross[s][layer]
            assert g is not None and c is not None
            reg = torch.eye(g.shape[0], dtype=g.dtype) * (config.ridge * float(g.diagonal()[:-1].mean()))
            reg[-1, -1] = 0.0  # the bias is not shrunk
            weights.append(torch.linalg.solve(g + reg, c).float())
        out.append(KVPredictor(spec, float(depth), aux, sources[s], tuple(weights)))
    return out


def finetune(
    model: Transformer,
    predictor: KVPredictor,
    windows: Sequence[Sequence[int]],
    prompt: int,
    config: KVTraining = KVTraining(),
    progress: Callable[[str], None] | None = None,
) -> KVPredictor:
    """Predictors trained on from `predictor` end to end (the base frozen): each window's first
    `prompt` tokens are predicted, the rest teacher-forced through the whole model against the
    predicted cache; loss = KL(whole model with the true cache || with the predicted one) a
    continuation token + config.l1 x the mean L1 distance to the true keys and values over their
    mean magnitude. Gradients flow through a dense copy of the served weights (the kernels'
    matmuls have none). Adam, one window a step, in an order the seed sets."""
    from models.skip_train import dense_copy

    dense = dense_copy(model)
    # Per window, computed once on the served model: the aux layers' captures, the true keys and
    # values (before RoPE), and the teacher's log-probabilities over the continuation.
    data = []
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([list(w)])
            model.setup_cache(1, ids.shape[1])
            _, got = captured_pass(model, ids[:, : prompt - 1], predictor.aux_layers, skip=predictor.dropped)
            model.setup_cache(1, ids.shape[1])
            _, true = captured_pass(model, ids[:, : prompt - 1], range(predictor.spec.n_layers))
            rest = ids[:, prompt - 1 : -1]
            h = model.forward_layers(model.embed(rest), Step.at(prompt - 1, rest.shape[1]))
            teacher = F.log_softmax(model.head(h)[0].float(), -1)
            scale = [(float(k.abs().mean()), float(v.abs().mean())) for k, v in (true[i] for i in range(len(true)))]
            data.append((ids, got, [true[i] for i in range(len(true))], scale, teacher))
    weights = [w.clone().requires_grad_(True) for w in predictor.weights]
    live = dataclasses.replace(predictor, weights=tuple(weights))
    opt = torch.optim.Adam(weights, lr=config.lr)
    order = torch.Generator().manual_seed(config.seed)
    steps = config.finetune_epochs * len(data)
    for n in range(steps):
        if n % len(data) == 0:
            perm = torch.randperm(len(data), generator=order).tolist()
        ids, got, true, scale, teacher = data[perm[n % len(data)]]
        dense.setup_cache(1, ids.shape[1])
        predicted = live.predict(got)
        kv = [pair if pair is not None else true[i] for i, pair in enumerate(predicted)]  # exact: the aux pass's
        write_kv(dense, kv, 0)
        rest = ids[:, prompt - 1 : -1]
        h = dense.forward_layers(dense.embed(rest), Step.at(prompt - 1, rest.shape[1]))
        logp = F.log_softmax(dense.head(h)[0].float(), -1)
        kl = F.kl_div(logp, teacher, log_target=True, reduction="none").sum(-1).mean()
        terms = [
            (pk - tk).abs().mean() / sk + (pv - tv).abs().mean() / sv
            for pair, (tk, tv), (sk, sv) in zip(predicted, true, scale, strict=True)
            if pair is not None
            for pk, pv in (pair,)
        ]
        l1 = sum(terms) / max(2 * len(terms), 1)
        loss = kl + config.l1 * l1
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None and (n + 1) % max(1, len(data) // 4) == 0:
            progress(f"depth {predictor.depth:g} fine-tune {n + 1}/{steps}: KL {float(kl):.4f}, L1 {float(l1):.4f}")
    return dataclasses.replace(predictor, weights=tuple(w.detach().clone() for w in weights))


@dataclass(frozen=True)
class KVQuality:
    """Teacher-forced quality of continuations after predicted prompts (`measure`)."""

    nats: float
    """Mean negative log-likelihood a continuation token (nats)."""
    base_nats: float
    """The same with the whole model's prefill."""
    agreement: float
    """Share of positions whose top-1 token equals the whole model's."""

    @property
    def ratio(self) -> float:
        """Bits per byte relative to the whole model's (the bytes are the same)."""
        return self.nats / self.base_nats if self.base_nats > 0 else math.inf


@torch.no_grad()
def continuation_logits(
    model: Transformer, window: Sequence[int], prompt: int, predictor: KVPredictor | None
) -> Tensor:
    """(C, V) logits for the continuation window[prompt:] (its first token is the one the predicted
    cache answers first) given window[:prompt], all but its last token prefilled by the whole model
    (predictor None) or predicted, then the rest teacher-forced in one piece."""
    ids = torch.tensor([list(window)])
    model.setup_cache(1, ids.shape[1])
    if predictor is None:
        model.forward_layers(model.embed(ids[:, : prompt - 1]), Step.at(0, prompt - 1))
    else:
        _, captured = captured_pass(model, ids[:, : prompt - 1], predictor.aux_layers, skip=predictor.dropped)
        write_kv(model, predictor.predict(captured), 0)
    rest = ids[:, prompt - 1 : -1]  # the prompt's last token, then the continuation but its last
    h = model.forward_layers(model.embed(rest), Step.at(prompt - 1, rest.shape[1]))
    return model.head(h)[0]  # predicting window[prompt:]


def reference(model: Transformer, windows: Sequence[Sequence[int]], prompt: int) -> list[tuple[float, Tensor]]:
    """The whole model's side of `measure`, once for every predictor weighed on the same windows:
    per window, the nats of its continuation after its first `prompt` tokens and the top-1 ids."""
    out = []
    for w in windows:
        target = torch.tensor(list(w[prompt:]))
        base = continuation_logits(model, w, prompt, None)
        nats = float(-F.log_softmax(base.float(), -1)[torch.arange(len(target)), target].sum())
        out.append((nats, base.argmax(-1)))
    return out


def measure(
    model: Transformer,
    windows: Sequence[Sequence[int]],
    prompt: int,
    predictor: KVPredictor,
    base: Sequence[tuple[float, Tensor]] | None = None,
) -> KVQuality:
    """Quality over each window's continuation after its first `prompt` tokens; `base`: the whole
    model's (`reference`) when already computed for these windows."""
    base = reference(model, windows, prompt) if base is None else base
    nats = base_nats = same = total = 0.0
    for w, (whole_nats, whole_top) in zip(windows, base, strict=True):
        target = torch.tensor(list(w[prompt:]))
        pred = continuation_logits(model, w, prompt, predictor)
        base_nats += whole_nats
        nats += float(-F.log_softmax(pred.float(), -1)[torch.arange(len(target)), target].sum())
        same += int((whole_top == pred.argmax(-1)).sum())
        total += len(target)
    n = max(total, 1)
    return KVQuality(nats / n, base_nats / n, same / n)


def prefill_share(model: Transformer, windows: Sequence[Sequence[int]], prompt: int, predictor: KVPredictor) -> float:
    """Median time of predict_prompt over that of the whole model's prefill, on prompts of `prompt`
    tokens (B = 1, after a warm-up of each)."""
    ratios = []
    for w in list(windows)[:3]:
        ids = torch.tensor([list(w[:prompt])])
        times = []
        for pred in (None, predictor, None, predictor):
            model.setup_cache(1, prompt)
            t0 = time.perf_counter()
            if pred is None:
                model.head(model.forward_layers(model.embed(ids), Step.at(0, prompt))[:, -1:])
            else:
                model.head(predict_prompt(model, pred, ids)[0])
            times.append(time.perf_counter() - t0)
        ratios.append(times[3] / times[2])
    return sorted(ratios)[len(ratios) // 2]


def layouts_for(influence: Sequence[float], depth: float, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Each named choice of auxiliary layers at `depth`, without repeats: "influence" (the layers
    of highest block influence) and "prefix" (the first ones and the last)."""
    L = len(influence)
    made = {"influence": aux_layers_for(influence, depth), "prefix": prefix_layers(L, depth)}
    out: dict[str, tuple[int, ...]] = {}
    for name in names:
        if name not in made:
            raise InvalidRequest(f"auxiliary layout {name!r}: choose among {sorted(made)}")
        if made[name] not in out.values():
            out[name] = made[name]
    return out


def train_set(
    model: Transformer,
    spec: PredictorSpec,
    windows: Sequence[Sequence[int]],
    config: KVTraining = KVTraining(),
    progress: Callable[[str], None] | None = None,
) -> PredictorSet:
    """Predictors at each of config.depths (what `tandem models train-kv` saves). For each depth,
    every layout of auxiliary layers in config.layouts (`layouts_for`; block influence ranked on
    the first windows) is fitted by least squares over `config.windows` windows, and the one whose
    continuations have the fewest bits on the `config.held_out` windows after those is kept (then
    fine-tuned when config.finetune_epochs); its quality and cost are measured there and recorded,
    with every layout's."""
    from models.prune import block_influence

    fit_windows = list(windows[: config.windows])
    held = list(windows[config.windows : config.windows + config.held_out])
    if len(fit_windows) < config.windows or not held:
        raise InvalidRequest(f"{len(windows)} windows; training takes {config.windows} and at least 1 held out")
    influence = block_influence(model, fit_windows[: config.influence_windows])
    names = {float(d): layouts_for(influence, d, config.layouts) for d in config.depths}
    sets = [(d, aux) for d, by_name in names.items() for aux in by_name.values()]
    fitted = dict(zip(sets, fit_sets(model, spec, fit_windows, sets, config, progress), strict=True))
    prompt = config.window_tokens - config.continuation_tokens
    record = {
        "training": asdict(config),
        "data_sha256": data_sha256(fit_windows),
        "influence": [round(x, 6) for x in influence],
    }
    whole = reference(model, held, prompt)  # the whole model's side, shared by every predictor weighed
    out = {}
    for depth, by_name in names.items():
        tried = {
            name: (fitted[(depth, aux)], measure(model, held, prompt, fitted[(depth, aux)], whole))
            for name, aux in by_name.items()
        }
        layout = min(tried, key=lambda name: tried[name][1].nats)
        p, q = tried[layout]
        if config.finetune_epochs:
            p = finetune(model, p, fit_windows, prompt, config, progress)
            q = measure(model, held, prompt, p, whole)
        share = prefill_share(model, held, prompt, p)
        quality = {"agreement": q.agreement, "bpb_ratio": q.ratio, "prefill_share": share, "held_out": len(held)}
        layouts = {name: {"agreement": t.agreement, "bpb_ratio": t.ratio} for name, (_, t) in tried.items()}
        out[depth] = dataclasses.replace(p, record={**record, "layout": layout, "layouts": layouts, "quality": quality})
        if progress is not None:
            progress(
                f"depth {depth:g}: {layout} layout, {len(p.aux_layers)} layers, agreement {q.agreement:.3f}, "
                f"bits/byte x{q.ratio:.3f}, prefill x{share:.2f}"
                + "".join(f"; {n}: x{t.ratio:.3f}" for n, (_, t) in tried.items() if n != layout)
            )
    return PredictorSet(out)


__all__ = [
    "KVQuality",
    "KVTraining",
    "calibration",
    "continuation_logits",
    "data_sha256",
    "finetune",
    "fit",
    "fit_sets",
    "layouts_for",
    "measure",
    "prefill_share",
    "reference",
    "train_set",
]
