"""KV prediction (after Apple's KV Prediction): a shallow pass over the prompt fills the whole
model's KV cache, so the first token costs a fraction of a full prefill.

The auxiliary model is the base itself with only `aux_layers` running (a layer-pruned copy that
shares its weights: no memory beyond the predictors) at a depth of 1/4, 1/2 or 3/4 of the layers:
those of highest block influence (models.prune), or the first ones and the last
(`prefix_layers`), whichever training finds better on held-out text. For a prompt of T tokens:

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

Training and measuring live in models.kvpred_train; what it measures travels as `KVVariant`, so
the hub can weigh a variant.

Shapes: B sequences, T tokens, K key/value heads, hd head width, KW = K * hd, F features of a
layer (2 * KW a source, plus 1), L base layers.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
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
    _exact: frozenset[int] = field(default=frozenset(), init=False, repr=False, compare=False)

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
        first = min(self.dropped, default=L)
        identity_map = identity_weights(self.spec)
        exact = frozenset(
            layer
            for layer in range(first)
            if self.sources[layer] == (layer,) and torch.equal(self.weights[layer], identity_map)
        )
        object.__setattr__(self, "_exact", exact)  # checked once: predict runs for every request

    @property
    def dropped(self) -> frozenset[int]:
        """The base layers the auxiliary model skips."""
        return frozenset(range(self.spec.n_layers)) - set(self.aux_layers)

    @property
    def exact(self) -> frozenset[int]:
        """Layers whose keys and values the aux pass computes exactly and the predictors keep as
        they are: kept layers below the first dropped one (the aux stream is the whole model's up
        to there) with an identity map from themselves. They are neither predicted nor rewritten."""
        return self._exact

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

    def predict(self, captured: dict[int, tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor] | None]:
        """Each base layer's (keys before RoPE, values), each (B, T, K, hd), from the auxiliary
        layers' captured ones (`captured_pass`); None for an `exact` layer (the aux pass wrote its
        cache as the whole model would)."""
        K, hd = self.spec.n_kv_heads, self.spec.head_dim
        exact = self.exact
        out: list[tuple[Tensor, Tensor] | None] = []
        for layer, (src, w) in enumerate(zip(self.sources, self.weights, strict=True)):
            if layer in exact:
                out.append(None)
                continue
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
        by_depth = {(p := KVPredictor.load(sub, expect)).depth: p for sub in subdirs}
        odd = sorted(d for d in by_depth if d not in KV_DEPTHS)
        if odd:
            raise InvalidRequest(f"{directory}: predictors at depths {odd}; requests take only {list(KV_DEPTHS)}")
        return PredictorSet(by_depth)


def kv_dir(name: str, quant: str) -> Path:
    """Where a zoo model's predictors live: beside the pulled models, one directory a served precision."""
    from models import zoo

    return zoo.trained_dir("kvpred", name, quant)


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


def prefix_layers(n_layers: int, depth: float) -> tuple[int, ...]:
    """round(depth * L) layers: the first ones and the last (the first k-1 keep the whole model's
    stream exactly, so their keys and values are exact; the last sees the rest of the way)."""
    keep = max(1, min(n_layers, round(depth * n_layers)))
    return (*range(keep - 1), n_layers - 1)


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


def _joined(lists: dict[int, list[tuple[Tensor, Tensor]]], T: int) -> dict[int, tuple[Tensor, Tensor]]:
    out = {}
    for i, pieces in lists.items():
        k, v = torch.cat([k for k, _ in pieces], 1), torch.cat([v for _, v in pieces], 1)
        if k.shape[1] != T:  # every token through torch's route, or the prediction would skip slots
            raise ValueError(f"layer {i} captured {k.shape[1]} of {T} tokens")
        out[i] = (k, v)
    return out


def captured_pass(
    model: Transformer, tokens: Tensor, layers: Sequence[int], slot: int = 0, skip: frozenset[int] = frozenset()
) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]]]:
    """tokens (B, T) at slots [slot, slot+T) through every layer less `skip`, writing the caches:
    the output (B, T, D) and `layers`' keys before RoPE and values, each (B, T, K, hd). Every piece
    runs on torch's route (a one-token piece of a long prompt would take the decoder's, which
    captures nothing)."""
    B, T = tokens.shape
    fast, model.fast_decode = model.fast_decode, False
    try:
        with capturing(model, layers) as lists:
            h = model.forward_layers(model.embed(tokens), Step.at(slot, T, B), skip=skip)
    finally:
        model.fast_decode = fast
    return h, _joined(lists, T)


def write_kv(model: Transformer, kv: Sequence[tuple[Tensor, Tensor] | None], slot: int) -> None:
    """Every layer's (keys before RoPE, values), each (B, T, K, hd), into its cache at slots
    [slot, slot+T): keys rotated as the layer's attention rotates them (its RoPE base; on CPU by
    the same kernel), so a cache written here equals one a forward pass writes. None: left as is."""
    for layer, pair in enumerate(kv):
        if pair is None:
            continue
        k, v = pair
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


def identity_weights(spec: PredictorSpec) -> Tensor:
    """A layer's map from its own keys and values to themselves: (2 KW + 1, 2 KW)."""
    kw = spec.n_kv_heads * spec.head_dim
    return torch.cat([torch.eye(2 * kw), torch.zeros(1, 2 * kw)])


def identity(spec: PredictorSpec) -> KVPredictor:
    """Predictors over an auxiliary model that is the whole base, each layer its own keys and
    values unchanged: prediction that must give exactly the base's cache (a test's reference)."""
    layers = tuple(range(spec.n_layers))
    w = identity_weights(spec)
    return KVPredictor(spec, 1.0, layers, tuple((i,) for i in layers), tuple(w.clone() for _ in layers))


__all__ = [
    "FORMAT",
    "MIN_PROMPT",
    "REPAIR_CHUNK",
    "KVMismatch",
    "KVPredictor",
    "KVReport",
    "KVVariant",
    "PredictorSet",
    "PredictorSpec",
    "Repair",
    "aux_layers_for",
    "captured_pass",
    "features",
    "find_predictors",
    "identity",
    "identity_weights",
    "kv_dir",
    "predict_prompt",
    "prefix_layers",
    "sources_for",
    "write_kv",
]
