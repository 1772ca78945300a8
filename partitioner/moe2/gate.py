"""MoE²'s gating network: weights over ALL experts per request, trained once on the full expert set.

The gate maps a prompt's features x (D,) (features.py) to a softmax over the E experts. Features are
standardised with the calibration set's mean and deviation; then a linear layer (the default) or a
one-hidden-layer MLP gives the logits.

Training minimises the mixture's expected loss on the calibration requests plus an L2 penalty:

    mean_r sum_e w_e(x_r) * L[r, e]  +  weight_decay * sum ||W||^2

L[r, e] is expert e's loss on request r in bits per byte (dataset.py). The expected loss is linear in
w, so without the penalty the gate would sharpen towards the per-request best expert without bound
and overfit 200 requests; the L2 penalty bounds the logits and is what carries to held-out prompts.
No entropy or temperature term: the penalty already keeps the weights soft, and an entropy bonus
pulls every request towards uniform, which blurs the gate's order that top-k routing relies on.

Restricting the gate to a subset S renormalises its weights over S: softmax over S's logits. That
is MoE²'s claim, tested by `gate_measures.optimality_gaps`: the full-set gate restricted to S is about as good on
held-out requests as a gate retrained on S alone. With the plain objective it holds only roughly on
our data (gaps up to 0.02 bits/byte): where the gate's favourite leaves S, its weights over the rest
were never trained. `GateConfig.subset_dropout` (the default) trains them: each step drops random
experts from each request's mixture, so the one training on the full set covers its subsets too.
The weight decay is chosen by k-fold cross-validation on the calibration requests
(`gate_measures.choose_weight_decay`).

Determinism: full-batch Adam in float64 on one torch thread with deterministic algorithms and a
seeded generator, so two trainings with the same seed give bitwise the same parameters.

A gate is saved as one file (torch.save of its manifest and parameters; loaded with weights_only)
whose manifest names the experts, the feature kind, the dimensions, the seed and a checksum of the
parameters. `load` refuses a gate trained for other experts or another feature kind (GateMismatch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMAT = 1
"""Bump when the saved layout changes: older files are refused."""


class GateMismatch(ValueError):
    """A saved gate that cannot serve here: trained for other experts or another feature kind, of
    another format, or its parameters do not match its checksum. The message says which."""


@dataclass(frozen=True)
class GateConfig:
    """How a gate is built and trained."""

    hidden: int = 0
    """Width of the one hidden layer; 0: a linear softmax (the default: 200 requests fit little more)."""
    weight_decay: float = 1e-3
    """L2 penalty on the weights (not the biases), added to the mean expected loss in bits per byte."""
    steps: int = 400
    """Full-batch Adam steps."""
    lr: float = 0.05
    """Adam's learning rate."""
    seed: int = 0
    """Seeds the initial weights (and the dropped experts)."""
    subset_dropout: float = 0.5
    """0: MoE²'s objective, the full set's mixture. p > 0: each step, each request's mixture drops each
    expert with probability p (at least one kept) and renormalises over the rest: still one training on
    the full set, its objective averaged over random subsets, so that the restricted gate is trained
    too. The default: on our data it brings the subset gaps from up to 0.02 to under 0.007 bits/byte."""


@dataclass(frozen=True)
class GateManifest:
    """What a saved gate was trained for, checked at load."""

    expert_ids: tuple[str, ...]
    """(E,) the experts the gate weights, in output order: the full set it was trained on."""
    feature_kind: str
    """The features it reads ("hidden" or "minilm", features.py)."""
    dims: int
    """D, the length of a feature vector."""
    config: GateConfig
    """How it was built and trained (its seed included)."""
    checksum: str = ""
    """SHA-256 of the parameters (names, shapes and float64 values)."""
    format: int = FORMAT
    """The file layout's version."""


class GateNet(nn.Module):
    """(R, D) features -> (R, E) logits: standardise, then linear or one hidden layer."""

    def __init__(self, dims: int, n_experts: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dims, dtype=torch.float64))  # (D,)
        self.register_buffer("scale", torch.ones(dims, dtype=torch.float64))  # (D,) 1 / deviation
        layers: list[nn.Module] = [nn.Linear(dims, n_experts)]
        if hidden:
            layers = [nn.Linear(dims, hidden), nn.GELU(), nn.Linear(hidden, n_experts)]
        self.body = nn.Sequential(*layers).to(torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) * self.scale)  # (R, E)


def checksum(net: nn.Module) -> str:
    """SHA-256 of a gate's parameters and buffers, by name, in float64."""
    digest = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        digest.update(f"{name}:{tuple(t.shape)}".encode())
        digest.update(t.detach().to(torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


class Gate:
    """A trained gate, serving the experts `expert_ids` (all it was trained on, or a subset of them:
    then its weights are renormalised over the subset, as MoE² restricts a gate)."""

    def __init__(self, manifest: GateManifest, net: GateNet, expert_ids: Sequence[str] | None = None) -> None:
        self.manifest = manifest
        self.net = net.eval().requires_grad_(False)
        ids = tuple(manifest.expert_ids if expert_ids is None else expert_ids)
        unknown = [e for e in ids if e not in manifest.expert_ids]
        if unknown or len(set(ids)) != len(ids) or not ids:
            raise GateMismatch(
                f"the gate was trained for experts {list(manifest.expert_ids)}; it cannot weight "
                f"{list(ids)} (unknown: {unknown or 'none'}; ids must be distinct and at least one)"
            )
        self.expert_ids = ids
        """(E',) the experts weighted, in output order."""
        self.columns = tuple(manifest.expert_ids.index(e) for e in ids)
        """(E',) each served expert's column among the trained ones."""

    def serving(self, expert_ids: Sequence[str]) -> Gate:
        """The same gate serving exactly the experts it was trained on, in the order of `expert_ids`
        (an expert table's columns). Raises GateMismatch naming the difference when `expert_ids` is
        another set: a gate trained for other experts than the table's (whose weights came from it)."""
        trained, wanted = set(self.manifest.expert_ids), set(expert_ids)
        if trained != wanted or len(wanted) != len(expert_ids):
            raise GateMismatch(
                f"the gate was trained for another expert set than the table's: only the gate has "
                f"{sorted(trained - wanted) or 'none'}, only the table {sorted(wanted - trained) or 'none'}"
                " (train the gate and its table together: tandem experts train)"
            )
        return Gate(self.manifest, self.net, expert_ids)

    def restricted(self, expert_ids: Sequence[str]) -> Gate:
        """The same gate serving only `expert_ids` (a subset of the trained ones, in that order), its
        weights renormalised over them. Raises GateMismatch for an unknown expert."""
        return Gate(self.manifest, self.net, expert_ids)

    @torch.inference_mode()
    def logits(self, features: np.ndarray) -> np.ndarray:
        """(R, E') float64 logits of (R, D) features, in `expert_ids` order. Raises ValueError on a
        feature length other than the manifest's."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.manifest.dims:
            raise ValueError(
                f"the gate reads ({self.manifest.dims},) {self.manifest.feature_kind} features, got shape {x.shape}"
            )
        return self.net(torch.from_numpy(x))[:, list(self.columns)].numpy()

    def weights(self, features: np.ndarray) -> np.ndarray:
        """(R, E') float64 weights of (R, D) features over `expert_ids`; rows sum to 1 (GatedObjective's
        weights; restricting to a subset renormalises, as softmax over the subset's logits)."""
        z = self.logits(features)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def save(self, path: Path) -> Path:
        """Write the full gate (every trained expert) with its manifest to `path`; returns `path`."""
        m = self.manifest
        header = json.dumps({**asdict(m), "config": asdict(m.config)})
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"manifest": header, "state": self.net.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: Path, expert_ids: Sequence[str] | None = None, feature_kind: str | None = None) -> Gate:
        """The gate at `path`, serving `expert_ids` (default: all it was trained on). Raises GateMismatch
        when it was trained for another feature kind, lacks one of `expert_ids` (a gate weights only
        experts it was trained with; a subset is served renormalised), is of another format, or its
        parameters fail the checksum; FileNotFoundError when there is no file."""
        blob = torch.load(path, weights_only=True)
        raw = json.loads(blob["manifest"])
        if raw.get("format") != FORMAT:
            raise GateMismatch(f"{path}: gate format {raw.get('format')}, this Tandem reads {FORMAT}: train it again")
        m = GateManifest(**{**raw, "expert_ids": tuple(raw["expert_ids"]), "config": GateConfig(**raw["config"])})
        if feature_kind is not None and m.feature_kind != feature_kind:
            raise GateMismatch(f"{path}: the gate reads {m.feature_kind!r} features, not {feature_kind!r}")
        net = GateNet(m.dims, len(m.expert_ids), m.config.hidden)
        net.load_state_dict(blob["state"], strict=True)
        if checksum(net) != m.checksum:
            raise GateMismatch(f"{path}: the parameters do not match the manifest's checksum (damaged file?)")
        try:
            return cls(m, net, expert_ids)
        except GateMismatch as exc:
            raise GateMismatch(f"{path}: {exc}") from None


# -- training ---------------------------------------------------------------------------------------------


@contextmanager
def _deterministic() -> Iterator[None]:
    """One thread, deterministic algorithms; the caller's settings restored after."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(strict)
        torch.set_num_threads(threads)


def _dropped(shape: torch.Size, p: float, gen: torch.Generator) -> torch.Tensor:
    """(R, E) logit offsets: -inf for each expert a request's mixture drops (each with probability p;
    a row that would drop all keeps one at random), 0 elsewhere; all 0 when p is 0."""
    if p <= 0:
        return torch.zeros(shape, dtype=torch.float64)
    keep = torch.rand(shape, generator=gen, dtype=torch.float64) >= p  # (R, E)
    rescue = torch.randint(shape[1], (shape[0],), generator=gen)  # (R,) kept where a row kept none
    keep[torch.arange(shape[0]), rescue] |= ~keep.any(dim=1)
    return torch.where(keep, 0.0, -torch.inf).to(torch.float64)


def _check(features: np.ndarray, losses: np.ndarray, expert_ids: Sequence[str]) -> None:
    if features.ndim != 2 or losses.ndim != 2 or features.shape[0] != losses.shape[0] or features.shape[0] < 2:
        raise ValueError(f"need (R, D) features and (R, E) losses with R >= 2, got {features.shape}, {losses.shape}")
    if losses.shape[1] != len(expert_ids) or not np.all(np.isfinite(losses)) or not np.all(np.isfinite(features)):
        raise ValueError(f"losses ({losses.shape}) must be finite, one column per expert ({len(expert_ids)})")


def train_gate(
    features: np.ndarray,
    losses: np.ndarray,
    expert_ids: Sequence[str],
    feature_kind: str,
    config: GateConfig = GateConfig(),
) -> Gate:
    """A gate over `expert_ids` trained on calibration requests' (R, D) features and (R, E) losses (bits
    per byte) to minimise the penalised expected loss (module docstring). Bitwise deterministic for a
    config (its seed). Raises ValueError on mismatched or non-finite inputs."""
    x, L = np.asarray(features, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    _check(x, L, expert_ids)
    with _deterministic():
        with torch.random.fork_rng(devices=[]):  # seeds torch's default init without touching the caller's
            torch.manual_seed(config.seed)
            net = GateNet(x.shape[1], L.shape[1], config.hidden)
            out = net.body[-1]  # the output layer starts small: the gate begins near uniform
            out.weight.data = torch.randn(out.weight.shape, dtype=torch.float64) * 0.01
            out.bias.data.zero_()
        net.mean.copy_(torch.from_numpy(x.mean(axis=0)))
        net.scale.copy_(torch.from_numpy(1.0 / np.maximum(x.std(axis=0), 1e-6)))
        xt = torch.from_numpy(x)
        lt = torch.from_numpy(L - L.min(axis=1, keepdims=True))  # (R, E) regret: same gradient, smaller numbers
        decayed = [p for name, p in net.body.named_parameters() if name.endswith("weight")]
        opt = torch.optim.Adam(net.body.parameters(), lr=config.lr)
        gen = torch.Generator().manual_seed(config.seed)
        for _ in range(config.steps):
            opt.zero_grad()
            w = torch.softmax(net(xt) + _dropped(lt.shape, config.subset_dropout, gen), dim=1)  # (R, E)
            objective = (w * lt).sum(dim=1).mean() + config.weight_decay * sum((p * p).sum() for p in decayed)
            objective.backward()
            opt.step()
    manifest = GateManifest(tuple(expert_ids), feature_kind, x.shape[1], config)
    return Gate(replace(manifest, checksum=checksum(net)), net)
