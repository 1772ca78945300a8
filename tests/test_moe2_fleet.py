"""MoE² fleet files (partitioner.moe2.fleet) and `tandem experts plan`.

The loader's errors name the file and the field; experts' costs equal the cost model's prediction for
an independently built ModelCost; `plan` prints the subset `select` and brute force choose on the
same problem, and an infeasible budget exits non-zero naming the binding constraint. The gate's
table is synthetic and the models' configs are given (no GGUF read), so nothing here needs a pull.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from device_profiles import load_profile
from models.config import ModelConfig
from partitioner.cost import ModelCost, predict
from partitioner.moe2.experts import Budget
from partitioner.moe2.fleet import (
    FleetError,
    RequestSize,
    VariantSpec,
    load_fleet,
    parse_fleet,
    plan_problem,
    variant_cost,
)
from partitioner.moe2.select import brute_force, select
from partitioner.moe2.table import ExpertTable
from tandem_cli import experts as cli
from tandem_cli.main import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "device_profiles" / "fleets" / "example.yaml"
SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
VARIANT_IDS = (
    *(f"{SMOL}/{q}" for q in ("fp32", "int8", "int4", "pruned-4", "pruned-8", "source")),
    *(f"{GEMMA}/{q}" for q in ("int8", "int4", "source")),
)
CONFIGS = {  # the two zoo models' shapes, as their GGUF headers give them
    SMOL: ModelConfig("llama", 30, 576, 1536, 9, 3, 64, 49152, 8192, 1e-5, 1e5, 1e5),
    GEMMA: ModelConfig(
        "gemma3", 18, 640, 2048, 4, 1, 256, 262144, 32768, 1e-6, 1e6, 1e4, 512, 6, "gelu_tanh", True, True, 640**0.5
    ),
}
SOURCE_BYTES = {SMOL: 96_576_768, GEMMA: 274_696_704}


def fake_card(model: str) -> tuple[ModelConfig, int]:
    return CONFIGS[model], SOURCE_BYTES[model]


def synthetic_table(n_requests: int = 48, seed: int = 0) -> ExpertTable:
    """A gate table over VARIANT_IDS: losses per variant around a base quality, a gate that sees part
    of each request's specialisation (so it is good, not perfect)."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0.9, 1.3, len(VARIANT_IDS))
    seen = rng.normal(0, 0.08, (n_requests, len(VARIANT_IDS)))
    losses = base + seen + rng.normal(0, 0.03, (n_requests, len(VARIANT_IDS)))
    z = -10 * (base + seen)
    w = np.exp(z - z.max(axis=1, keepdims=True))
    tokenizers = tuple(v.partition("/")[0] for v in VARIANT_IDS)
    return ExpertTable(
        VARIANT_IDS, tokenizers, w / w.sum(axis=1, keepdims=True), losses, rng.uniform(150, 200, n_requests)
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


ENTRY = "experts:\n  - device: nano\n    profile: jetson-orin-nano\n    variant: smollm2-135m-instruct/int4\n"


# -- the loader ------------------------------------------------------------------------------------------


def test_example_fleet_has_ten_experts_on_several_profiles_and_the_cloud() -> None:
    fleet = load_fleet(EXAMPLE, VARIANT_IDS)
    assert fleet.n_experts >= 10
    assert len({e.profile.name for e in fleet.entries}) >= 4
    assert [e.profile.kind for e in fleet.entries].count("cloud") == 1
    variants = {e.variant for e in fleet.entries}
    need = {f"{SMOL}/{q}" for q in ("fp32", "int8", "int4", "pruned-4", "pruned-8")} | {
        f"{GEMMA}/int4",
        f"{GEMMA}/int8",
    }
    assert need <= variants


@pytest.mark.parametrize(
    ("text", "field", "says"),
    [
        (ENTRY.replace("jetson-orin-nano", "jetson-orin-nan"), "experts[0].profile", "unknown device profile"),
        (ENTRY.replace("int4", "int3"), "experts[0].variant", "unknown model variant"),
        (ENTRY.replace("profile:", "profil:"), "experts[0].profil", "did you mean 'profile'"),
        (ENTRY + "    count: 0\n", "experts[0].count", "integer >= 1"),
        (ENTRY + "    count: two\n", "experts[0].count", "integer >= 1"),
        (ENTRY + "    count: true\n", "experts[0].count", "integer >= 1"),
        (ENTRY.replace("    variant: smollm2-135m-instruct/int4\n", ""), "experts[0].variant", "missing"),
        ("expert:\n  - device: x\n", "expert", "did you mean 'experts'"),
        ("experts: []\n", "experts", "non-empty list"),
        (ENTRY + ENTRY.removeprefix("experts:\n"), "experts[1]", "already given by experts[0]"),
        (ENTRY.replace("jetson-orin-nano", "boards/missing.yaml"), "experts[0].profile", "cannot read"),
    ],
)
def test_loader_errors_name_the_file_and_the_field(tmp_path: Path, text: str, field: str, says: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(FleetError) as info:
        load_fleet(path, VARIANT_IDS)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}"), message
    assert says in message, message


def test_profile_files_are_relative_to_the_fleet_file_and_counts_name_devices(tmp_path: Path) -> None:
    (tmp_path / "boards").mkdir()
    (tmp_path / "boards" / "mine.yaml").write_text((ROOT / "device_profiles" / "raspberry-pi-5.yaml").read_text())
    fleet = load_fleet(write(tmp_path, ENTRY.replace("jetson-orin-nano", "boards/mine.yaml") + "    count: 3\n"),
                       VARIANT_IDS)  # fmt: skip
    (entry,) = fleet.entries
    assert entry.profile == load_profile("raspberry-pi-5")
    assert entry.devices == ("nano-1", "nano-2", "nano-3")
    with pytest.raises(FleetError, match="description: expected a string"):
        parse_fleet({"description": 3, "experts": [{}]}, "f.yaml", VARIANT_IDS)


# -- costs and quality ---------------------------------------------------------------------------------------


def test_variant_ids_parse_back_into_the_dataset_variants() -> None:
    from partitioner.moe2.dataset import VARIANTS

    for v in VARIANTS:
        assert VariantSpec.parse(v.id) == VariantSpec(v.family, v.quant, v.drop_layers)
    for bad in ("smollm2", "m/int3", "m/pruned-x", "m/pruned-0"):
        with pytest.raises(ValueError):
            VariantSpec.parse(bad)


@pytest.mark.parametrize(
    ("variant", "layers", "bits"),
    [("fp32", 30, 32.0), ("int8", 30, 8.5), ("int4", 30, 5.0), ("pruned-4", 26, 32.0), ("pruned-8-int4", 22, 5.0)],
)
def test_variant_cost_is_the_config_at_its_precision(variant: str, layers: int, bits: float) -> None:
    got = variant_cost(CONFIGS[SMOL], SOURCE_BYTES[SMOL], VariantSpec.parse(f"{SMOL}/{variant}"))
    want = ModelCost.from_config(replace(CONFIGS[SMOL], n_layers=layers), bits_per_weight=bits)
    assert got.n_layers == want.n_layers and got.kv_bits == want.kv_bits
    torch.testing.assert_close(got.weight_bytes, want.weight_bytes, rtol=1e-6, atol=1.0)
    source = variant_cost(CONFIGS[SMOL], SOURCE_BYTES[SMOL], VariantSpec(SMOL, "source"))
    torch.testing.assert_close(source.weight_bytes, float(SOURCE_BYTES[SMOL]), rtol=1e-6, atol=1.0)


def test_experts_take_the_cost_models_prediction_and_the_tables_quality() -> None:
    table, fleet = synthetic_table(), load_fleet(EXAMPLE, VARIANT_IDS)
    planned = plan_problem(fleet, table, fake_card, RequestSize(64, 32))
    for e, col in zip(planned.problem.experts, planned.columns, strict=True):
        entry = next(x for x in fleet.entries if e.device in x.devices and e.id.endswith(x.variant))
        spec = VariantSpec.parse(entry.variant)
        bits = {"fp32": 32.0, "int8": 8.5, "int4": 5.0}.get(spec.quant)
        cfg = replace(CONFIGS[spec.model], n_layers=CONFIGS[spec.model].n_layers - spec.drop_layers)
        full = ModelCost.from_config(CONFIGS[spec.model]).n_params
        cost = ModelCost.from_config(cfg, bits_per_weight=bits or 8 * SOURCE_BYTES[spec.model] / full)
        est = predict(entry.profile, cost, 64, 32)
        torch.testing.assert_close(e.latency_ms, est.total_ms, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(e.energy_j, est.energy_j if entry.profile.kind == "edge" else 0.0)
        assert e.quality == pytest.approx(table.losses[:, col].mean())
        assert e.kind == entry.profile.kind
    ttft = plan_problem(fleet, table, fake_card, RequestSize(64, 32, "ttft_ms"))
    assert all(a.latency_ms < b.latency_ms for a, b in zip(ttft.problem.experts, planned.problem.experts, strict=True))


def test_a_variant_the_table_lacks_is_refused() -> None:
    table = synthetic_table()
    fleet = load_fleet(EXAMPLE, VARIANT_IDS)
    small = ExpertTable(table.variants[:3], table.tokenizers[:3], table.weights[:, :3] / table.weights[:, :3].sum(1,
                        keepdims=True), table.losses[:, :3], table.n_bytes)  # fmt: skip
    with pytest.raises(FleetError, match=r"example.yaml: experts\[\d+\].variant: the gate's table has no column"):
        plan_problem(fleet, small, fake_card)


# -- tandem experts plan -------------------------------------------------------------------------------------


@pytest.fixture
def table_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(cli, "card", fake_card)
    return synthetic_table().save(tmp_path / "gate.table.npz")


@pytest.mark.parametrize(
    ("energy", "latency", "k"), [(2.0, 400.0, 1), (4.0, 300.0, 1), (None, 1500.0, 2), (6.0, None, 2)]
)
def test_plan_prints_the_subset_select_and_brute_force_choose(
    table_file: Path, capsys: pytest.CaptureFixture, energy: float | None, latency: float | None, k: int
) -> None:
    argv = ["experts", "plan", "--fleet", str(EXAMPLE), "--gate", str(table_file), "--k", str(k), "--json"]
    argv += ["--energy-j", str(energy)] * (energy is not None) + ["--latency-ms", str(latency)] * (latency is not None)
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    planned = plan_problem(load_fleet(EXAMPLE, VARIANT_IDS), ExpertTable.load(table_file), fake_card)
    budget = Budget(energy, latency, k)
    want = select(planned.problem, budget)
    assert got["subset"] == list(want.subset) == list(brute_force(planned.problem, budget).subset)
    assert (got["quality_bpb"], got["latency_ms"], got["energy_j"]) == (want.objective, want.latency_ms, want.energy_j)
    assert (energy is None or got["energy_j"] <= energy) and (latency is None or got["latency_ms"] <= latency)
    assert got["request"] == {"prompt_tokens": 96, "max_tokens": 48, "latency": "total_ms"}


def test_plan_text_names_the_subset_and_its_figures(table_file: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["experts", "plan", "--fleet", str(EXAMPLE), "--gate", str(table_file), "--energy-j", "2"]
    assert main([*argv, "--latency-ms", "400"]) == 0
    out = capsys.readouterr().out
    want = select(plan_problem(load_fleet(EXAMPLE, VARIANT_IDS), ExpertTable.load(table_file), fake_card).problem,
                  Budget(2.0, 400.0))  # fmt: skip
    assert all(i in out for i in want.subset)
    assert f"predicted: quality {want.objective:.4f} BPB" in out
    assert "reference request: 96 prompt tokens, 48 new tokens" in out


@pytest.mark.parametrize(
    ("edge_only", "flags", "binding"),
    [
        (True, ["--energy-j", "0.01"], "energy_j"),  # the cloud spends no edge energy: an edge-only fleet
        (False, ["--latency-ms", "1"], "latency_ms"),
        (False, ["--latency-ms", "1000", "--energy-j", "0.01"], "latency_ms"),  # the cloud is closest: 1.3 s
    ],
)
def test_infeasible_budget_exits_nonzero_naming_the_binding_constraint(
    table_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture, edge_only: bool, flags: list[str], binding: str
) -> None:
    fleet = write(tmp_path, ENTRY) if edge_only else EXAMPLE
    assert main(["experts", "plan", "--fleet", str(fleet), "--gate", str(table_file), *flags]) == 3
    err = capsys.readouterr().err
    assert f"binding constraint: {binding}" in err and f"no expert subset fits: {binding}" in err


def test_plan_refuses_a_bad_fleet_or_a_missing_table(
    table_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = write(tmp_path, ENTRY.replace("int4", "int3"))
    assert main(["experts", "plan", "--fleet", str(bad), "--gate", str(table_file)]) == 2
    assert "experts[0].variant: unknown model variant" in capsys.readouterr().err
    assert main(["experts", "plan", "--fleet", str(EXAMPLE), "--gate", str(tmp_path / "none.pt")]) == 2
    assert "run `tandem experts train`" in capsys.readouterr().err
