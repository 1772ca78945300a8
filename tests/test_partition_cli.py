"""`tandem partition` (issue 16): the printed plan is partitioner.split.single_cut's, the plot is a PNG,
and a budget no cut meets or a bad argument exits 2 with one line saying why.

Run in-process (tandem_cli.main.main) as tests/test_cli_hub.py does. The model is a tiny random GGUF
written here (its card cached under a temporary TANDEM_CACHE_DIR), checked against the model as an
agent serves it; one test uses the pulled SmolLM2 by its zoo name (skipped when it is not pulled).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_profiles import load_profile
from device_profiles.links import load_link
from models import zoo
from models.config import ModelConfig
from models.quant import weight_bytes
from models.runtime import load
from partitioner.cost import ModelCost, served_model_cost
from partitioner.split import Plan, evaluate, single_cut
from tandem_cli.main import main as cli
from tests.tiny import TinySpec, write_tiny_gguf

EDGE, CLOUD = "rtx-4090-desktop", "cloud-cpu-2core"
SMOLLM2 = ModelConfig(
    arch="llama", n_layers=30, dim=576, ffn_dim=1536, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152,
    context_length=8192, norm_eps=1e-5, rope_base=100000.0, rope_local_base=100000.0, tied_embeddings=True,
)  # fmt: skip
SMOLLM2_SERVED_BYTES = 96_576_768
"""The zoo's SmolLM2 file (pinned by SHA-256) stores Q4_1, Q8_0 and F32 tensors, each served at its stored
size (int4 g32 with fp16 scale and minimum: 5 bits; int8 g32 with an fp16 scale: 8.5; fp32): its tensor bytes."""


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("partition") / "tiny6.gguf", TinySpec(n_layers=6))


@pytest.fixture(scope="module")
def tiny_cost(tiny_file: Path) -> ModelCost:
    """The reference: the model as an agent loads it ("source": each tensor at its GGUF's precision) and
    the router costs it, not the command's header read."""
    served = load(tiny_file, quant="source", use_cache=False)
    return served_model_cost(served.config, weight_bytes(served.model))


@pytest.fixture
def tiny_model(tiny_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny GGUF, its card cached in a throwaway cache."""
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    return tiny_file


def _run(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str, str]:
    rc = cli(["partition", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _same(printed: dict, plan: Plan) -> None:
    assert printed["k"] == plan.cuts[0]
    assert [(s["device"], s["profile"], s["start"], s["end"]) for s in printed["stages"]] == [
        (s.device, s.profile.name, s.start, s.end) for s in plan.stages
    ]
    assert [s["memory_bytes"] for s in printed["stages"]] == pytest.approx(plan.memory_bytes, rel=1e-12)
    got = (printed["ttft_ms"], printed["tpot_ms"], printed["edge_energy_j"])
    assert got == pytest.approx((plan.ttft_ms, plan.tpot_ms, plan.edge_energy_j), rel=1e-12)


@pytest.mark.parametrize(
    ("link", "objective", "budgets", "wire"),
    [
        ("ethernet-lan", "ttft_ms", {}, "fp16"),
        ("wifi", "energy_j", {"ttft_ms": 3.0}, "int8"),
        ("4g", "tpot_ms", {"energy_j": 1e-3}, "fp16"),
    ],
)
def test_printed_plan_is_single_cuts(
    tiny_model: Path, tiny_cost: ModelCost, capsys: pytest.CaptureFixture, link: str, objective: str, budgets: dict,
    wire: str,
) -> None:  # fmt: skip
    cost = tiny_cost
    flags = [f"--{b.replace('_', '-')}={v}" for b, v in budgets.items()]
    argv = ["--model", str(tiny_model), "--edge", EDGE, "--cloud", CLOUD, "--link", link, "--objective", objective,
            "--wire", wire, "--prompt-tokens", "64", "--max-tokens", "16", *flags]  # fmt: skip
    rc, out, _ = _run(capsys, [*argv, "--json"])
    assert rc == 0
    doc = json.loads(out)
    edge, cloud, spec = load_profile(EDGE), load_profile(CLOUD), load_link(link).spec
    want = single_cut(edge, cloud, cost, 64, 16, objective=objective, link=spec, wire=wire, **budgets)  # type: ignore[arg-type]
    _same(doc["chosen"], want)
    chain = [("edge", edge), ("cloud", cloud)]
    _same(doc["edge_only"], evaluate(chain, [spec], cost, 64, 16, (cost.n_layers,), wire))  # type: ignore[arg-type]
    _same(doc["cloud_only"], evaluate(chain, [spec], cost, 64, 16, (0,), wire))  # type: ignore[arg-type]
    rc, text, _ = _run(capsys, argv)  # the table shows the same plan
    assert rc == 0
    chosen = text.split("\nchosen")[1].split("\nedge-only")[0]
    assert f"k={want.cuts[0]:>3} of {cost.n_layers}" in chosen and f"TTFT {want.ttft_ms:9.2f} ms" in chosen


def test_zoo_model_by_name_splits_under_a_budget(capsys: pytest.CaptureFixture) -> None:
    """SmolLM2 on a fast edge GPU beside a slow cloud CPU: the least edge energy within a TTFT budget
    between the two ends is a real split, as single_cut finds it from the model's known sizes."""
    if not zoo.model_path("smollm2-135m-instruct").is_file():
        pytest.skip("smollm2-135m-instruct is not pulled (tandem models pull smollm2-135m-instruct)")
    argv = ["--model", "smollm2-135m-instruct", "--edge", EDGE, "--cloud", CLOUD, "--link", "ethernet-lan",
            "--objective", "energy_j", "--ttft-ms", "300", "--json"]  # fmt: skip
    rc, out, _ = _run(capsys, argv)
    assert rc == 0
    cost = served_model_cost(SMOLLM2, SMOLLM2_SERVED_BYTES)
    want = single_cut(load_profile(EDGE), load_profile(CLOUD), cost, 256, 128, objective="energy_j", ttft_ms=300,
                      link=load_link("ethernet-lan").spec)  # fmt: skip
    doc = json.loads(out)
    assert doc["weight_bytes"] == SMOLLM2_SERVED_BYTES and 0 < want.cuts[0] < 30
    _same(doc["chosen"], want)


def test_plot_writes_a_png(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "front.png"
    rc, _, _ = _run(capsys, ["--model", str(tiny_model), "--edge", EDGE, "--cloud", CLOUD, "--link", "wifi",
                             "--energy-j", "0.001", "--plot", str(png)])  # fmt: skip
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_infeasible_budget_exits_2_naming_the_constraint(tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    """Half of Wi-Fi's 40 ms round trip is in every plan's TTFT but edge-only's, and the energy budget
    rules out every plan but cloud-only: the closest cut (cloud-only) breaks ttft_ms."""
    rc, out, err = _run(capsys, ["--model", str(tiny_model), "--edge", EDGE, "--cloud", CLOUD, "--link", "wifi",
                                 "--ttft-ms", "0.5", "--energy-j", "1e-9"])  # fmt: skip
    assert rc == 2
    assert "binding constraint ttft_ms" in err and "Traceback" not in err
    assert "edge-only" in out and "cloud-only" in out  # the ends are still shown, each with what it breaks


def _profile_file(path: Path, **changes: object) -> Path:
    """The shipped Jetson Orin Nano profile written to `path`, with `changes` to its top-level fields."""
    import yaml

    data = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "device_profiles" / "jetson-orin-nano.yaml").read_text()
    )
    path.write_text(yaml.safe_dump({**data, **changes}))
    return path


def test_memory_bound_budget_exits_2(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Neither device holds even one layer: the binding constraint is memory, whatever the budgets."""
    edge = _profile_file(tmp_path / "edge.yaml", memory_gb=1e-9)
    cloud = _profile_file(tmp_path / "cloud.yaml", memory_gb=1e-9, kind="cloud")
    rc, _, err = _run(capsys, ["--model", str(tiny_model), "--edge", str(edge), "--cloud", str(cloud)])
    assert rc == 2 and "fits in memory" in err


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (["--edge", "jetson-orin-nano-x"], "unknown device profile 'jetson-orin-nano-x'"),
        (["--link", "3g"], "unknown link profile '3g'"),
        (["--ttft-ms", "-5"], "--ttft-ms must be a finite number > 0"),
        (["--energy-j", "0"], "--energy-j must be a finite number > 0"),
        (["--tpot-ms", "nan"], "--tpot-ms must be a finite number > 0"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--cloud", "jetson-orin-nano"], "--cloud needs a profile of kind cloud"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--edge", "MISSPELT"], "memory_bandwith_gbs: unknown key"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture, change: list[str], says: str
) -> None:
    """`change` comes last: argparse keeps an option's last value."""
    if change[1] == "MISSPELT":
        change = ["--edge", str(_profile_file(tmp_path / "edge.yaml", memory_bandwith_gbs=68))]
    base = ["--model", str(tiny_model), "--edge", EDGE, "--cloud", CLOUD, "--link", "wifi"]
    rc, out, err = _run(capsys, [*base, *change])
    assert rc == 2
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and says in err, err


def test_a_unique_part_of_a_shipped_name_picks_the_profile_and_an_ambiguous_one_names_the_candidates() -> None:
    from device_profiles import ProfileError
    from tandem_cli.partition import resolve_profile

    assert resolve_profile("a100", "cloud").name == "cloud-a100-80gb"  # the issue's own example
    assert resolve_profile("orin-nano", "edge").name == "jetson-orin-nano"
    assert resolve_profile("cpu-2core", "edge").name == "cpu-2core"  # an exact name wins over a part
    with pytest.raises(ProfileError, match="names several edge profiles: jetson-agx-orin, jetson-orin-nano"):
        resolve_profile("jetson", "edge")
    with pytest.raises(ProfileError, match="unknown device profile 'a10'"):
        resolve_profile("a10", "cloud")  # a part is whole dash-separated words, not a prefix
    with pytest.raises(ProfileError, match=r"'a100' names no edge profile, only cloud-a100-80gb \(another kind\)"):
        resolve_profile("a100", "edge")  # of the kind asked for only
