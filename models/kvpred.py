"""KV prediction (after Apple's KV Prediction): a shallow pass over the prompt fills the whole
model's KV cache, so the first token costs a fraction of a full prefill.

The auxiliary model is the base itself with only `aux_layers` running (a layer-pruned copy that
shares its weights: no memory beyond the predictors), chosen by block influence (models.prune) at
a depth of 1/4, 1/2 or 3/4 of the layers. For a prompt of T tokens:

    aux pass:    tokens [0, T-1) through aux_layers (the others skipped)      capture k, v of each
    predict:     for every base layer l, [k_l | v_l] = [feat(sources[l]) | 1] @ W_l
    write:       k_l rotated (RoPE at its slot, the layer's own base) and v_l into the cache slots
    first token: the whole model runs token T-1 alone (one decode step) against the predicted cache

Keys are predicted before RoPE (position-free: a linear map commutes with nothing a rotation does)
and rotated at their slots, so Gemma's local and global layers each get their own tables. A base
layer's sources are its own layer when the auxiliary model keeps it, else the kept layers nearest
below and above it. The predicted cache is never corrected, unless the request asks for repair
(`Repair`): between decode steps the whole model recomputes the true cache `chunk` slots at a time
from slot 0 (each piece attends only to slots already true, so the result is exactly the whole
model's) until it reaches the decode position; from then on the answer is the whole model's.

Training is closed-form least squares to the true keys and values over calibration windows
(ridge-regularised normal equations in float64), deterministic for a seed. Quality is measured
then on calibration windows held out of the fit (`KVVariant`), so the hub can weigh a variant.

Shapes: B sequences, T tokens, K key/value heads, hd head width, KW = K * hd, F features of a
layer (2 * KW a source, plus 1), L base layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from models import kernels
from models.errors import InvalidRequest
from models.sampling import KV_DEPTHS
from models.transformer import Step, Transformer, apply_rope

FORMAT = 1
MIN_PROMPT = 8
"""Prompts shorter than this prefill on the whole model: there is nothing to save."""
REPAIR_CHUNK = 32
"""Slots the whole model recomputes between two decode steps while repairing."""


class KVMismatch(InvalidRequest):
    """Predictors trained for another model, precision or shape than the one they would fill."""


@dataclass(frozen=True)
class PredictorSpec:
    """What predictors were trained for; `KVPredictor.load` refuses any other model."""

    model: str
    """The zoo name (or label) of the base model."""
    quant: str
    """The precision it is served at (models.runtime: "source", "int4", "fp32", ...)."""
    n_layers: int
    n_kv_heads: int
    head_dim: int

    @staticmethod
    def of(model: Transformer, name: str, quant: str) -> PredictorSpec:
        return PredictorSpec(name, quant, model.cfg.n_layers, model.cfg.n_kv_heads, model.cfg.head_dim)


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


@dataclass(frozen=True)
class KVVariant:
    """One trained depth as the hub weighs it (ModelInfo.kv_variants)."""

    depth: float
    aux_layers: tuple[int, ...]
    agreement: float
    """Top-1 agreement with the whole model over held-out continuations (teacher-forced)."""
    bpb_ratio: float
    """Bits per byte of those continuations relative to the whole model's."""
    prefill_share: float
    """The aux pass, prediction and write as a share of the whole model's prefill, measured at
    training on the prompts of the held-out windows."""


@dataclass(frozen=True)
class KVReport:
    """What a request's KV prediction did: on its last TokenEvent, and in the answer's metadata."""

    depth: float
    predicted: int
    """Prompt slots whose keys and values were predicted (0: the prompt was too short, and the
    whole model prefilled it)."""
    repaired_at: int | None = None
    """With repair: tokens generated before the cache was wholly the whole model's (the ones after
    are the whole model's given the text so far); None: not repaired by the end."""


# -- Predictors ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVPredictor:
    """One depth's predictors: weights[l] (F_l, 2 * KW) map sources[l]'s keys and values to base
    layer l's (keys before RoPE), a bias row last."""

    spec: PredictorSpec
    depth: float
    aux_layers: tuple[int, ...]
    sources: tuple[tuple[int, ...], ...]
    weights: tuple[Tensor, ...]
    record: dict = field(default_factory=dict)
    """How they were trained (KVTraining, the data's sha256, the layers' influence) and measured."""

    def __post_init__(self) -> None:
        L, kw = self.spec.n_layers, self.spec.n_kv_heads * self.spec.head_dim
        if len(self.sources) != L or len(self.weights) != L:
            raise KVMismatch(f"predictors for {len(self.weights)} layers, the spec says {L}")
        aux = set(self.aux_layers)
        for layer, (src, w) in enumerate(zip(self.sources, self.weights, strict=True)):
            if not src or not set(src) <= aux:
                raise KVMismatch(f"layer {layer}'s sources {src} are not auxiliary layers {sorted(aux)}")
            if tuple(w.shape) != (2 * kw * len(src) + 1, 2 * kw):
                raise KVMismatch(f"layer {layer}'s predictor is {tuple(w.shape)} for {len(src)} sources of width {kw}")

    @property
    def dropped(self) -> frozenset[int]:
        """The base layers the auxiliary model skips."""
        return frozenset(range(self.spec.n_layers)) - set(self.aux_layers)

    @property
    def variant(self) -> KVVariant:
        q = self.record.get("quality", {})
        return KVVariant(
            self.depth,
            self.aux_layers,
            float(q.get("agreement", 0.0)),
            float(q.get("bpb_ratio", math.inf)),
            float(q.get("prefill_share", self.depth)),
        )

    def predict(self, captured: dict[int, tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Each base layer's (keys before RoPE, values), each (B, T, K, hd), from the auxiliary
        layers' captured ones (`captured_pass`)."""
        K, hd = self.spec.n_kv_heads, self.spec.head_dim
        out = []
        for src, w in zip(self.sources, self.weights, strict=True):
            x = features(captured, src)  # (B, T, F)
            y = x @ w  # (B, T, 2 * KW)
            B, T = y.shape[:2]
            out.append((y[..., : K * hd].reshape(B, T, K, hd), y[..., K * hd :].reshape(B, T, K, hd)))
        return out

    def save(self, path: Path) -> None:
        """predictors.pt (weights) and predictors.json (what they are for) in directory `path`."""
        path.mkdir(parents=True, exist_ok=True)
        torch.save({f"w{i}": w.contiguous() for i, w in enumerate(self.weights)}, path / "predictors.pt")
        meta = {
            "format": FORMAT,
            "spec": asdict(self.spec),
            "depth": self.depth,
            "aux_layers": list(self.aux_layers),
            "sources": [list(s) for s in self.sources],
            "record": self.record,
        }
        (path / "predictors.json").write_text(json.dumps(meta, indent=1) + "\n")

    @staticmethod
    def load(path: Path, expect: PredictorSpec) -> KVPredictor:
        """Predictors saved in `path`; KVMismatch when trained for another model, precision, layer
        count or width than `expect`; InvalidRequest for a missing or corrupt file."""
        try:
            meta = json.loads((path / "predictors.json").read_text())
            spec = PredictorSpec(**meta["spec"])
            tensors = torch.load(path / "predictors.pt", weights_only=True)
            weights = tuple(tensors[f"w{i}"].float() for i in range(spec.n_layers))
            depth, aux = float(meta["depth"]), tuple(int(i) for i in meta["aux_layers"])
            sources = tuple(tuple(int(i) for i in s) for s in meta["sources"])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError) as exc:
            raise InvalidRequest(f"{path}: not readable KV predictors ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise InvalidRequest(f"{path}/predictors.json: format {meta.get('format')!r}, this build reads {FORMAT}")
        if spec != expect:
            diff = ", ".join(
                f"{k} {getattr(spec, k)!r} (not {getattr(expect, k)!r})"
                for k in ("model", "quant", "n_layers", "n_kv_heads", "head_dim")
                if getattr(spec, k) != getattr(expect, k)
            )
            raise KVMismatch(f"{path}: KV predictors trained for another model: {diff}")
        return KVPredictor(spec, depth, aux, sources, weights, meta.get("record", {}))


@dataclass(frozen=True)
class PredictorSet:
    """One model's predictors, one a trained depth."""

    by_depth: dict[float, KVPredictor]

    def __post_init__(self) -> None:
        if not self.by_depth:
            raise InvalidRequest("a predictor set needs predictors for at least one depth")
        specs = {p.spec for p in self.by_depth.values()}
        if len(specs) > 1:
            raise KVMismatch(f"predictors for several models in one set: {sorted(map(str, specs))}")

    @property
    def spec(self) -> PredictorSpec:
        return next(iter(self.by_depth.values())).spec

    def for_depth(self, depth: float) -> KVPredictor:
        """The predictors trained at `depth`; InvalidRequest naming the trained ones otherwise."""
        p = self.by_depth.get(float(depth))
        if p is None:
            raise InvalidRequest(
                f"no KV predictors at depth {depth:g} for this model; trained: {', '.join(map(str, self.depths))}"
            )
        return p

    @property
    def depths(self) -> list[float]:
        return sorted(self.by_depth)

    def variants(self) -> list[KVVariant]:
        return [self.by_depth[d].variant for d in self.depths]

    def save(self, directory: Path) -> None:
        for depth, p in self.by_depth.items():
            p.save(directory / f"d{depth:g}")

    @staticmethod
    def load(directory: Path, expect: PredictorSpec) -> PredictorSet:
        """Every d<depth>/ under `directory`; KVMismatch for another model's, InvalidRequest for
        none or a corrupt one (naming the file)."""
        subdirs = sorted(p for p in directory.glob("d*") if (p / "predictors.json").is_file())
        if not subdirs:
            raise InvalidRequest(f"{directory}: no KV predictors (train them: tandem models train-kv)")
        return PredictorSet({(p := KVPredictor.load(sub, expect)).depth: p for sub in subdirs})


def kv_dir(name: str, quant: str) -> Path:
    """Where a zoo model's predictors live: beside the pulled models, one directory a served precision."""
    from models import zoo

    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{name}-{quant}")
    return zoo.cache_dir() / "kvpred" / slug


def find_predictors(spec: PredictorSpec) -> PredictorSet | None:
    """The predictors trained for this model as served, or None when none were trained; raises
    KVMismatch (another model's, another precision's) or InvalidRequest (a corrupt file)."""
    directory = kv_dir(spec.model, spec.quant)
    if not directory.is_dir():
        return None
    return PredictorSet.load(directory, spec)


# -- The engine's side -----------------------------------------------------------------------------


def aux_layers_for(influence: Sequence[float], depth: float) -> tuple[int, ...]:
    """The round(depth * L) layers of highest block influence (at least one), in order."""
    L = len(influence)
    keep = max(1, min(L, round(depth * L)))
    return tuple(sorted(sorted(range(L), key=lambda i: (-influence[i], i))[:keep]))


def sources_for(n_layers: int, aux_layers: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Each base layer's sources: itself when kept, else the kept layers nearest below and above."""
    aux = sorted(aux_layers)
    out = []
    for layer in range(n_layers):
        if layer in aux:
            out.append((layer,))
            continue
        below = [a for a in aux if a < layer]
        above = [a for a in aux if a > layer]
        out.append(tuple(x for x in (below[-1] if below else None, above[0] if above else None) if x is not None))
    return tuple(out)


def features(captured: dict[int, tuple[Tensor, Tensor]], sources: Sequence[int]) -> Tensor:
    """[k_a | v_a for a in sources | 1]: (B, T, F) float32 from captured (B, T, K, hd) pairs."""
    parts = []
    for a in sources:
        k, v = captured[a]
        parts += [k.flatten(-2).float(), v.flatten(-2).float()]
    first = parts[0]
    parts.append(torch.ones(*first.shape[:-1], 1, dtype=first.dtype))
    return torch.cat(parts, -1)


@contextmanager
def capturing(model: Transformer, layers: Sequence[int]) -> Iterator[dict[int, list[tuple[Tensor, Tensor]]]]:
    """While open, `layers`' attention appends its keys before RoPE and values, each (B, T, K, hd),
    to the lists of the dict it yields (one append a forward piece, in order)."""
    lists: dict[int, list[tuple[Tensor, Tensor]]] = {i: [] for i in layers}
    for i, got in lists.items():
        model.layers[i].attention.capture = got
    try:
        yield lists
    finally:
        for i in lists:
            model.layers[i].attention.capture = None


def _joined(lists: dict[int, list[tuple[Tensor, Tensor]]]) -> dict[int, tuple[Tensor, Tensor]]:
    out = {}
    for i, pieces in lists.items():
        if not pieces:
            raise ValueError(f"layer {i} captured nothing: one-token passes take the decoder's route")
        out[i] = (torch.cat([k for k, _ in pieces], 1), torch.cat([v for _, v in pieces], 1))
    return out


def captured_pass(
    model: Transformer, tokens: Tensor, layers: Sequence[int], slot: int = 0, skip: frozenset[int] = frozenset()
) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]]]:
    """tokens (B, T) at slots [slot, slot+T) through every layer less `skip`, writing the caches:
    the output (B, T, D) and `layers`' keys before RoPE and values, each (B, T, K, hd). T >= 2
    (one token alone takes the decoder's route, which captures nothing)."""
    B, T = tokens.shape
    with capturing(model, layers) as lists:
        h = model.forward_layers(model.embed(tokens), Step.at(slot, T, B), skip=skip)
    return h, _joined(lists)


def write_kv(model: Transformer, kv: Sequence[tuple[Tensor, Tensor]], slot: int) -> None:
    """Every layer's (keys before RoPE, values), each (B, T, K, hd), into its cache at slots
    [slot, slot+T): keys rotated as the layer's attention rotates them (its RoPE base; on CPU by
    the same kernel), so a cache written here equals one a forward pass writes."""
    for layer, (k, v) in enumerate(kv):
        cache = model.caches[layer]
        if cache is None:
            raise ValueError(f"layer {layer} has no KV cache; call setup_cache")
        B, T = k.shape[:2]
        block = model.layers[layer]
        cos, sin = model.rope[model.cfg.rope_local_base if block.sliding else model.cfg.rope_base]
        pos = torch.arange(slot, slot + T)
        k = k.to(cos.dtype).contiguous()
        if not (B == 1 and k.device.type == "cpu" and kernels.rope_((k[0],), cos[pos], sin[pos])):
            k = apply_rope(k.transpose(1, 2), cos[pos][None, None], sin[pos][None, None]).transpose(1, 2)
        cache.update(pos.to(cache.k.device), k.transpose(1, 2), v.transpose(1, 2))


def predict_prompt(model: Transformer, predictor: KVPredictor, tokens: Tensor) -> tuple[Tensor, int]:
    """Fill the caches (set up by the caller, from slot 0) for tokens (1, T) by KV prediction, and
    run the whole model on the last token alone: its hidden state (1, 1, D) and the count of slots
    predicted. A prompt shorter than MIN_PROMPT prefills on the whole model (0 predicted)."""
    T = tokens.shape[1]
    if T < MIN_PROMPT:
        return model.forward_layers(model.embed(tokens), Step.at(0, T))[:, -1:], 0
    _, captured = captured_pass(model, tokens[:, :-1], predictor.aux_layers, skip=predictor.dropped)
    write_kv(model, predictor.predict(captured), 0)
    return model.forward_layers(model.embed(tokens[:, -1:]), Step.at(T - 1, 1)), T - 1


class Repair:
    """Recomputes the true cache of one sequence between its decode steps, `chunk` slots at a time
    from slot 0: each piece runs the whole model over its tokens, attending only to slots already
    true, so once it reaches the decode position the cache is exactly the whole model's."""

    def __init__(self, model: Transformer, chunk: int = REPAIR_CHUNK) -> None:
        if chunk < 1:
            raise ValueError("a repair chunk is at least one slot")
        self.model, self.chunk = model, chunk
        self.upto = 0
        """Slots [0, upto) hold the whole model's keys and values."""

    def before_step(self, ids: Sequence[int], slot: int) -> bool:
        """Repair the next piece below `slot`, the slot the next decode step writes (ids: the
        sequence so far, at least `slot` tokens). True when [0, slot) is then wholly true."""
        if self.upto < slot:
            end = min(self.upto + self.chunk, slot)
            piece = torch.tensor([list(ids[self.upto : end])])
            self.model.forward_layers(self.model.embed(piece), Step.at(self.upto, end - self.upto))
            self.upto = end
        return self.upto >= slot


# -- Training --------------------------------------------------------------------------------------


def calibration(tokenize: Callable[[str], list[int]], config: KVTraining = KVTraining()) -> list[list[int]]:
    """The windows `train_set` takes: config.windows + config.held_out windows of
    config.window_tokens ids from the calibration documents (never the evaluation ones), in an
    order the seed sets."""
    import random

    from models.corpus import documents
    from models.skip import calibration_windows

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
    """Least-squares predictors for each depth's auxiliary layers over `windows` (equal lengths):
    per base layer, W = (X'X + lambda I)^-1 X'Y with X the sources' features and Y the true keys
    (before RoPE) and values, accumulated in float64 over every token of every window."""
    L = spec.n_layers
    sources = {d: sources_for(L, aux) for d, aux in aux_by_depth.items()}
    gram: dict[float, list[Tensor | None]] = {d: [None] * L for d in aux_by_depth}
    cross: dict[float, list[Tensor | None]] = {d: [None] * L for d in aux_by_depth}
    for n, tokens in enumerate(_batches(windows, config.batch)):
        B, T = tokens.shape
        model.setup_cache(B, T)
        _, true = captured_pass(model, tokens, range(L))
        for depth, aux in aux_by_depth.items():
            dropped = frozenset(range(L)) - set(aux)
            _, got = captured_pass(model, tokens, aux, skip=dropped)
            for layer in range(L):
                x = features(got, sources[depth][layer]).reshape(B * T, -1).double()
                k, v = true[layer]
                y = torch.cat([k.flatten(-2), v.flatten(-2)], -1).reshape(B * T, -1).double()
                g, c = x.T @ x, x.T @ y
                gram[depth][layer] = g if gram[depth][layer] is None else gram[depth][layer] + g
                cross[depth][layer] = c if cross[depth][layer] is None else cross[depth][layer] + c
        if progress is not None:
            progress(f"fit: {min((n + 1) * config.batch, len(windows))}/{len(windows)} windows")
    out = {}
    for depth, aux in aux_by_depth.items():
        weights = []
        for layer in range(L):
            g, c = gram[depth][layer], cross[depth][layer]
            assert g is not None and c is not None
            reg = torch.eye(g.shape[0], dtype=g.dtype) * (config.ridge * float(g.diagonal()[:-1].mean()))
            reg[-1, -1] = 0.0  # the bias is not shrunk
            weights.append(torch.linalg.solve(g + reg, c).float())
        out[depth] = KVPredictor(spec, depth, aux, sources[depth], tuple(weights))
    return out


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
    """(C, V) logits for window[prompt+1:] given window[:prompt] prefilled by the whole model
    (predictor None) or by KV prediction, the continuation teacher-forced in one piece."""
    ids = torch.tensor([list(window)])
    model.setup_cache(1, ids.shape[1])
    if predictor is None:
        model.forward_layers(model.embed(ids[:, : prompt - 1]), Step.at(0, prompt - 1))
    else:
        _, captured = captured_pass(model, ids[:, : prompt - 1], predictor.aux_layers, skip=predictor.dropped)
        write_kv(model, predictor.predict(captured), 0)
    rest = ids[:, prompt - 1 : -1]  # the prompt's last token, then the continuation but its last
    h = model.forward_layers(model.embed(rest), Step.at(prompt - 1, rest.shape[1]))
    return model.head(h)[0, 1:]  # predicting window[prompt+1:]


def measure(model: Transformer, windows: Sequence[Sequence[int]], prompt: int, predictor: KVPredictor) -> KVQuality:
    """Quality over each window's continuation after its first `prompt` tokens."""
    nats = base_nats = same = total = 0.0
    for w in windows:
        target = torch.tensor(list(w[prompt + 1 :]))
        base = continuation_logits(model, w, prompt, None)
        pred = continuation_logits(model, w, prompt, predictor)
        rows = torch.arange(len(target))
        base_nats += float(-F.log_softmax(base.float(), -1)[rows, target].sum())
        nats += float(-F.log_softmax(pred.float(), -1)[rows, target].sum())
        same += int((base.argmax(-1) == pred.argmax(-1)).sum())
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


def train_set(
    model: Transformer,
    spec: PredictorSpec,
    windows: Sequence[Sequence[int]],
    config: KVTraining = KVTraining(),
    progress: Callable[[str], None] | None = None,
) -> PredictorSet:
    """Predictors at each of config.depths (what `tandem models train-kv` saves): the auxiliary
    layers by block influence over the first windows, least squares over `config.windows` of them,
    quality and cost measured on the `config.held_out` after those."""
    from models.prune import block_influence

    fit_windows = list(windows[: config.windows])
    held = list(windows[config.windows : config.windows + config.held_out])
    if len(fit_windows) < config.windows or not held:
        raise InvalidRequest(f"{len(windows)} windows; training takes {config.windows} and at least 1 held out")
    influence = block_influence(model, fit_windows[: config.influence_windows])
    aux = {float(d): aux_layers_for(influence, d) for d in config.depths}
    fitted = fit(model, spec, fit_windows, aux, config, progress)
    prompt = config.window_tokens - config.continuation_tokens
    record = {
        "training": asdict(config),
        "data_sha256": data_sha256(fit_windows),
        "influence": [round(x, 6) for x in influence],
    }
    out = {}
    for depth, p in fitted.items():
        q = measure(model, held, prompt, p)
        share = prefill_share(model, held, prompt, p)
        quality = {"agreement": q.agreement, "bpb_ratio": q.ratio, "prefill_share": share, "held_out": len(held)}
        out[depth] = dataclasses.replace(p, record={**record, "quality": quality})
        if progress is not None:
            progress(
                f"depth {depth:g}: {len(p.aux_layers)} layers, agreement {q.agreement:.3f}, "
                f"bits/byte x{q.ratio:.3f}, prefill x{share:.2f}"
            )
    return PredictorSet(out)


def identity(spec: PredictorSpec) -> KVPredictor:
    """Predictors over an auxiliary model that is the whole base, each layer its own keys and
    values unchanged: prediction that must give exactly the base's cache (a test's reference)."""
    kw = spec.n_kv_heads * spec.head_dim
    w = torch.cat([torch.eye(2 * kw), torch.zeros(1, 2 * kw)])
    layers = tuple(range(spec.n_layers))
    return KVPredictor(spec, 1.0, layers, tuple((i,) for i in layers), tuple(w.clone() for _ in layers))


__all__ = [
    "FORMAT",
    "MIN_PROMPT",
    "REPAIR_CHUNK",
    "KVMismatch",
    "KVPredictor",
    "KVQuality",
    "KVReport",
    "KVTraining",
    "KVVariant",
    "PredictorSet",
    "PredictorSpec",
    "Repair",
    "aux_layers_for",
    "calibration",
    "captured_pass",
    "continuation_logits",
    "data_sha256",
    "features",
    "find_predictors",
    "fit",
    "identity",
    "kv_dir",
    "measure",
    "predict_prompt",
    "prefill_share",
    "sources_for",
    "train_set",
    "write_kv",
]
