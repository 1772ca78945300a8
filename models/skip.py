"""Early layer skipping, FiRST-style: per-request routers choose at prefill which layers decode skips.

Prefill always runs every layer, so every layer's KV cache holds the prompt. A router per layer l
reads the hidden state entering layer l, mean-pooled over the prompt and scaled to unit RMS
(x_l, (D,)), and scores it: keep logit s_l = w_l . x_l + b_l. A request skips the layers it scores
lowest: `ratio * n_layers` of them (`Routers.choose`), never a `protected` one (the first and the
last by default). The set is fixed for the whole decode; a skipped layer neither runs nor writes
its cache during decode, and nothing reads it (Transformer.forward_layers(skip=...), one C call a
token on the kernels' route).

This module holds what serving needs: the routers, their sets and files, the layers a ratio
means, the pooled prefill that feeds the routers, and what a request reports. Training and
measuring them (autograd through a dense copy of the model, over calibration text) live in
models.skip_train, which imports this module; this one never imports it.

Shapes: L layers, D model width, B prompts a batch, T prompt tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
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
    """The SkipTraining (models.skip_train) used and the final loss terms, for the record."""

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


__all__ = [
    "MAX_RATIO",
    "RouterMismatch",
    "RouterSet",
    "RouterSpec",
    "Routers",
    "SkipReport",
    "SkipVariant",
    "default_protected",
    "find_routers",
    "prefill",
    "routers_dir",
    "skip_count",
]
