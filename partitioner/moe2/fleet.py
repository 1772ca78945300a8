"""MoE² fleet files: the experts of a fleet for offline planning, with their costs from the cost model.

A fleet file (YAML, strict) lists entries; each is one model variant on one device, or on `count`
identical devices (named "<device>-1" .. "<device>-<count>"). The cloud is an entry like any other,
with a device profile of kind cloud:

    description: two Orin Nanos and the hub's own CPU     # optional
    experts:
      - device: nano                      # the device's name (the expert's id is "<device>/<variant>")
        profile: jetson-orin-nano         # a shipped device profile, or a profile file (relative to this file)
        variant: smollm2-135m-instruct/int4   # a column of the gate's table (dataset.Variant.id)
        count: 2                          # optional, default 1
      - device: cloud
        profile: cloud-cpu-2core
        variant: gemma3-270m/source

An unknown or misspelt key, a missing one, an unknown profile or variant, a bad count, or two
entries giving the same expert raise FleetError naming the file and the field ("experts[2].profile").

Each expert's latency and edge energy per request come from the roofline cost model
(partitioner.cost.predict) for a reference request (`RequestSize`), with the variant's cost as a
server holds it (cost.served_model_cost): fp32 at 32 bits a weight, int8 and int4 at
search.PRECISION_BITS (scales included), "source" at the GGUF's served bytes, pruned variants with
their layers dropped. Its quality and the objective come from the gate's table (table.ExpertTable):
the variant's column of the gate's weights and of the losses on the calibration requests, so two
devices serving one variant share a column (twins to select.py).

Units: milliseconds, joules, bits per byte, tokens.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from device_profiles import DeviceProfile, ProfileError, load_profile
from models.config import ModelConfig
from partitioner.cost import ModelCost, fits, predict, served_model_cost
from partitioner.moe2.experts import Expert, Problem
from partitioner.moe2.objective import column_objective
from partitioner.moe2.table import ExpertTable
from partitioner.search import PRECISION_BITS

FLEET_KEYS = ("description", "experts")
ENTRY_KEYS = ("count", "device", "profile", "variant")
REQUIRED_ENTRY_KEYS = ("device", "profile", "variant")
LatencyOf = Literal["total_ms", "ttft_ms"]

Card = Callable[[str], tuple[ModelConfig, int]]
"""A model's zoo name -> (its config, its weights' bytes at "source" precision): what
tandem_cli.partition.model_card reads from the GGUF header."""


class FleetError(ValueError):
    """A fleet file that cannot be planned with; the message names the file and the field."""


@dataclass(frozen=True)
class RequestSize:
    """The reference request each expert's latency and energy are predicted for."""

    prompt_tokens: int = 96
    """Prompt tokens (the dataset's prompts: 192-512 characters, about 48-128 tokens)."""
    max_tokens: int = 48
    """New tokens (the dataset's continuations: 192 characters, about 48 tokens)."""
    latency: LatencyOf = "total_ms"
    """What an expert's latency is: the whole request ("total_ms"), or its time to first token
    ("ttft_ms", what the hub's router budgets)."""

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.max_tokens < 1:
            raise ValueError(f"prompt_tokens and max_tokens must be >= 1, got {self.prompt_tokens}, {self.max_tokens}")
        if self.latency not in ("total_ms", "ttft_ms"):
            raise ValueError(f"latency must be 'total_ms' or 'ttft_ms', got {self.latency!r}")


@dataclass(frozen=True)
class FleetEntry:
    """One model variant on `count` identical devices."""

    where: str
    """Where the entry is in its file, for errors: "experts[3]"."""
    device: str
    """The device's name; with count > 1 the devices are "<device>-1" .. "<device>-<count>"."""
    profile: DeviceProfile
    """The devices' profile."""
    variant: str
    """The variant they serve ("<model>/<label>", dataset.Variant.id)."""
    count: int = 1
    """How many identical devices."""

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices' names."""
        return (self.device,) if self.count == 1 else tuple(f"{self.device}-{i}" for i in range(1, self.count + 1))


@dataclass(frozen=True)
class Fleet:
    """A parsed fleet file."""

    source: str
    """The file it was read from (for errors and output)."""
    entries: tuple[FleetEntry, ...]
    """The entries, in file order."""
    description: str = ""
    """What the file says it is."""

    @property
    def n_experts(self) -> int:
        """Experts over all entries (each device of an entry is one)."""
        return sum(e.count for e in self.entries)


# -- variants and their costs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantSpec:
    """A variant id taken apart: the inverse of dataset.Variant.id."""

    model: str
    """The model's zoo name (the id's family)."""
    quant: str
    """"fp32", "int8", "int4" or "source"."""
    drop_layers: int = 0
    """Layers pruned away."""

    @classmethod
    def parse(cls, variant_id: str) -> VariantSpec:
        """ "<model>/<label>" with label "fp32", "int8", "int4", "source", "pruned-N" or "pruned-N-<quant>".
        Raises ValueError for anything else."""
        model, _, label = variant_id.rpartition("/")
        drop, quant = 0, label
        if label.startswith("pruned-"):
            n, _, q = label.removeprefix("pruned-").partition("-")
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"variant {variant_id!r}: pruned-N needs N >= 1")
            drop, quant = int(n), q or "fp32"
        if not model or quant not in ("fp32", "source", *PRECISION_BITS):
            raise ValueError(f"variant {variant_id!r} is not '<model>/<fp32|int8|int4|source|pruned-N[-quant]>'")
        return cls(model, quant, drop)


def variant_cost(config: ModelConfig, source_bytes: int, spec: VariantSpec) -> ModelCost:
    """The variant's cost as a server holds it (module docstring): `config` with spec.drop_layers
    fewer layers, weights at the variant's bits per weight; "source" keeps the GGUF's served bits per
    weight (`source_bytes` over the whole model's parameters). Raises ValueError when the pruning
    leaves no layer."""
    if spec.drop_layers >= config.n_layers:
        raise ValueError(f"pruning {spec.drop_layers} of {config.n_layers} layers leaves none")
    kept = replace(config, n_layers=config.n_layers - spec.drop_layers)
    if spec.quant == "fp32":
        return served_model_cost(kept)
    full = ModelCost.from_config(config).n_params
    bits = 8 * source_bytes / full if spec.quant == "source" else PRECISION_BITS[spec.quant]
    return served_model_cost(kept, round(ModelCost.from_config(kept).n_params * bits / 8))


# -- parsing -----------------------------------------------------------------------------------------------


def _unknown(where: str, keys: Collection[Any], known: Sequence[str]) -> FleetError | None:
    """The error for the first key not in `known`, with the closest known one as a hint."""
    for key in sorted(map(str, keys)):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return FleetError(f"{where}{key}: unknown key{hint}; known keys: {', '.join(known)}")
    return None


def _string(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise FleetError(f"{where}: expected a non-empty string, got {type(value).__name__} {value!r}")
    return value


def _profile(where: str, name: str, base: Path | None) -> DeviceProfile:
    """A shipped profile by name, or a profile file (a relative path is relative to `base`)."""
    is_path = name.endswith((".yaml", ".yml")) or "/" in name
    try:
        return load_profile(base / name if is_path and base is not None else name)
    except ProfileError as exc:
        raise FleetError(f"{where}: {exc}") from None


def _entry(where: str, raw: Any, variants: Collection[str], base: Path | None) -> FleetEntry:
    if not isinstance(raw, Mapping):
        raise FleetError(f"{where}: expected a mapping of {', '.join(ENTRY_KEYS)}, got {type(raw).__name__}")
    if (err := _unknown(f"{where}.", raw, ENTRY_KEYS)) is not None:
        raise err
    for key in REQUIRED_ENTRY_KEYS:
        if key not in raw:
            raise FleetError(f"{where}.{key}: missing required key")
    device = _string(f"{where}.device", raw["device"])
    variant = _string(f"{where}.variant", raw["variant"])
    if variant not in variants:
        close = difflib.get_close_matches(variant, list(variants), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise FleetError(f"{where}.variant: unknown model variant {variant!r}{hint}; known: {', '.join(variants)}")
    count = raw.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise FleetError(f"{where}.count: expected an integer >= 1, got {type(count).__name__} {count!r}")
    profile = _profile(f"{where}.profile", _string(f"{where}.profile", raw["profile"]), base)
    return FleetEntry(where, device, profile, variant, count)


def parse_fleet(data: Any, source: str, variants: Collection[str], base: Path | None = None) -> Fleet:
    """A fleet from parsed YAML `data` (module docstring). `variants` are the known variant ids (the
    gate table's, or dataset.VARIANTS'); `base` is the directory relative profile paths start from.
    Raises FleetError naming `source` and the field."""
    try:
        if not isinstance(data, Mapping):
            raise FleetError(f"expected a mapping with keys {', '.join(FLEET_KEYS)}, got {type(data).__name__}")
        if (err := _unknown("", data, FLEET_KEYS)) is not None:
            raise err
        raw = data.get("experts")
        if not isinstance(raw, list) or not raw:
            raise FleetError(f"experts: expected a non-empty list of entries, got {type(raw).__name__}")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise FleetError(f"description: expected a string, got {type(description).__name__}")
        entries = tuple(_entry(f"experts[{i}]", e, variants, base) for i, e in enumerate(raw))
        seen: dict[str, str] = {}
        for e in entries:
            for device in e.devices:
                eid = expert_id(device, e.variant)
                if eid in seen:
                    raise FleetError(f"{e.where}: expert {eid!r} is already given by {seen[eid]}")
                seen[eid] = e.where
    except FleetError as exc:
        raise FleetError(f"{source}: {exc}") from None
    return Fleet(source, entries, description)


def load_fleet(path: Path, variants: Collection[str]) -> Fleet:
    """The fleet file at `path` (parse_fleet; profile paths relative to its directory). Raises
    FleetError for a file that cannot be read, is not YAML, or breaks the schema."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FleetError(f"{path}: cannot read the fleet file: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FleetError(f"{path}: not valid YAML: {exc}") from None
    return parse_fleet(data, str(path), variants, Path(path).parent)


# -- the problem -------------------------------------------------------------------------------------------


def expert_id(device: str, variant: str) -> str:
    """ "<device>/<model>/<label>", as the hub names its experts (cloud_hub.moe2_router.expert_id)."""
    return f"{device}/{variant}"


@dataclass(frozen=True, eq=False)
class Planned:
    """A fleet as a selection problem, with what each expert's figures came from."""

    problem: Problem
    """The experts (file order, each entry's devices in turn) and the table's objective over them."""
    columns: tuple[int, ...]
    """(E,) each expert's column in the table."""
    request: RequestSize
    """The reference request the costs are for."""


def plan_problem(fleet: Fleet, table: ExpertTable, card: Card, request: RequestSize = RequestSize()) -> Planned:
    """The fleet's experts with their predicted costs and the table's quality, and the gated objective
    over them. `card` gives each model's config (called once a model). Raises FleetError naming the
    entry for a variant the table lacks, or one that does not fit its device's memory."""
    cards: dict[str, tuple[ModelConfig, int]] = {}
    experts, columns = [], []
    for e in fleet.entries:
        col = table.variants.index(e.variant) if e.variant in table.variants else None
        if col is None:
            raise FleetError(f"{fleet.source}: {e.where}.variant: the gate's table has no column {e.variant!r}")
        spec = VariantSpec.parse(e.variant)
        if spec.model not in cards:
            cards[spec.model] = card(spec.model)
        cost = variant_cost(*cards[spec.model], spec)
        if not fits(e.profile, cost, request.prompt_tokens + request.max_tokens):
            raise FleetError(
                f"{fleet.source}: {e.where}: {e.variant} ({cost.weight_bytes / 1e6:.0f} MB) does not fit the "
                f"memory of {e.profile.name} ({e.profile.memory_gb:g} GB)"
            )
        est = predict(e.profile, cost, request.prompt_tokens, request.max_tokens)
        latency = est.total_ms if request.latency == "total_ms" else est.ttft_ms
        label, tokenizer, quality = e.variant.rpartition("/")[2], table.tokenizers[col], float(table.quality[col])
        for device in e.devices:
            eid = expert_id(device, e.variant)
            kind, energy = e.profile.kind, est.edge_energy_j
            experts.append(Expert(eid, device, spec.model, label, tokenizer, kind, latency, energy, quality))
            columns.append(col)
    objective = column_objective(table.weights, table.losses, table.tokenizers, table.n_bytes, columns)
    return Planned(Problem(tuple(experts), objective), tuple(columns), request)
