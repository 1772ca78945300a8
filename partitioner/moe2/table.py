"""The gate's expert table: what a hub needs of a trained gate to route by MoE² (cloud_hub.moe2_router).

A table holds, per expert *variant* (a model at a precision, dataset.Variant.id: "<model>/<quant>",
e.g. "smollm2-135m-instruct/int4"), the full-set gate's weights and the variant's measured loss on
every calibration request, and the requests' lengths: exactly what `GatedObjective` is made of.
It is device-free: the hub turns each live (device, model) candidate into an expert and takes the
expert's column from the variant it serves (`column`), so two devices serving one variant share a
column. `tandem experts train` writes one beside the gate (`<gate>.table.npz`).

Mapping a served model to a variant: the model's name and its served precision (ModelInfo.name,
ModelInfo.quant: "fp32", "source", "int8", "int4"), joined as "<name>/<quant>". Pruned variants
("<model>/pruned-4") have no field on the wire that says a served model was pruned, so no served
model maps to them yet.

Saved as one .npz (numpy only, no pickles) with FORMAT; `load` refuses another format or
inconsistent arrays (TableError).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1
"""Bump when the saved layout changes: older files are refused."""


class TableError(ValueError):
    """An expert table that cannot serve: another format, or arrays that do not fit together."""


def variant_id(model: str, quant: str) -> str:
    """The variant a served model is: "<model>/<quant>" (dataset.Variant.id of an unpruned variant),
    the precision without the detail an agent adds to it (ModelInfo.quant "source(q4_1->int4,...)"
    is the variant "source")."""
    return f"{model}/{quant.split('(', 1)[0]}"


@dataclass(frozen=True, eq=False)
class ExpertTable:
    """Per variant, the full-set gate's weights and the measured losses on the calibration requests."""

    variants: tuple[str, ...]
    """(E,) variant ids ("<model>/<quant>"), in column order: the experts the gate was trained on."""
    tokenizers: tuple[str, ...]
    """(E,) each variant's tokenizer family (only experts sharing one can ensemble)."""
    weights: np.ndarray
    """(R, E) the full-set gate's weights per calibration request; rows sum to 1."""
    losses: np.ndarray
    """(R, E) each variant's loss on each request's true continuation, bits per byte."""
    n_bytes: np.ndarray
    """(R,) each continuation's length in bytes."""

    def __post_init__(self) -> None:
        w = np.array(self.weights, dtype=np.float64)
        losses = np.array(self.losses, dtype=np.float64)
        n_bytes = np.array(self.n_bytes, dtype=np.float64)
        e = len(self.variants)
        if e < 1 or len(set(self.variants)) != e:
            raise TableError(f"a table needs distinct variant ids, got {list(self.variants)}")
        if len(self.tokenizers) != e:
            raise TableError(f"{len(self.tokenizers)} tokenizers for {e} variants")
        if w.ndim != 2 or w.shape[1] != e or w.shape[0] < 1 or losses.shape != w.shape:
            raise TableError(f"weights {w.shape} and losses {losses.shape} must both be (R, {e})")
        if n_bytes.shape != (w.shape[0],) or not np.all(np.isfinite(n_bytes) & (n_bytes > 0)):
            raise TableError(f"n_bytes must be ({w.shape[0]},) positive lengths, got shape {n_bytes.shape}")
        finite = np.all(np.isfinite(w)) and np.all(np.isfinite(losses))
        if not (finite and np.all(w >= 0) and np.all(losses >= 0)):
            raise TableError("weights and losses must be finite and >= 0")
        if not np.allclose(w.sum(axis=1), 1.0, atol=1e-6):
            raise TableError("every row of the gate's weights must sum to 1")
        for name, a in (("weights", w), ("losses", losses), ("n_bytes", n_bytes)):
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "tokenizers", tuple(self.tokenizers))

    @property
    def prior(self) -> np.ndarray:
        """(E,) the gate's mean weights over the calibration requests: its weights for a prompt whose
        features are not computed (what the hub's router uses)."""
        return self.weights.mean(axis=0)

    @property
    def quality(self) -> np.ndarray:
        """(E,) each variant's mean loss on the calibration requests, bits per byte (lower is better)."""
        return self.losses.mean(axis=0)

    def column(self, model: str, quant: str) -> int | None:
        """The column of the variant a model served at `quant` is (variant_id); None: not in the table."""
        try:
            return self.variants.index(variant_id(model, quant))
        except ValueError:
            return None

    def save(self, path: Path) -> Path:
        """Write the table to `path` (.npz); returns `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"format": FORMAT, "variants": self.variants, "tokenizers": self.tokenizers})
        with path.open("wb") as f:
            np.savez(f, header=np.array(header), weights=self.weights, losses=self.losses, n_bytes=self.n_bytes)
        return path

    @classmethod
    def load(cls, path: Path) -> ExpertTable:
        """The table at `path`. Raises TableError for another format or inconsistent arrays,
        FileNotFoundError when there is no file."""
        with np.load(path, allow_pickle=False) as z:
            try:
                header = json.loads(str(z["header"]))
                arrays = z["weights"], z["losses"], z["n_bytes"]
            except (KeyError, ValueError) as exc:
                raise TableError(f"{path}: not an expert table ({exc})") from None
        if header.get("format") != FORMAT:
            raise TableError(f"{path}: table format {header.get('format')}, this Tandem reads {FORMAT}")
        try:
            return cls(tuple(header["variants"]), tuple(header["tokenizers"]), *arrays)
        except TableError as exc:
            raise TableError(f"{path}: {exc}") from None
