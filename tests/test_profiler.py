"""edge_agent.profiler and `tandem profile`: measurements on SmolLM2, the fit they feed, the profile
file (atomic, strict, round-tripping) and the command's refusals of bad input.

Timings on a shared 2-core host are noisy, so bounds are loose (a median error under 25%), and
each is checked to be able to fail: the same bound refuses a fit to samples three times too slow.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import pytest

from device_profiles import Calibration, DeviceProfile, ProfileError, Sample, load_profile
from edge_agent import profiler
from models import runtime
from models.config import ModelConfig
from models.loaded import LoadedModel
from models.runtime import load
from partitioner import calibration as calib
from partitioner.calibration import QUICK_DECODE, QUICK_PREFILL
from partitioner.cost import served_model_cost
from tandem_cli.main import main
from tests.conftest import real_model

SMOL = "smollm2-135m-instruct"
SMOL_CONFIG = ModelConfig(arch="llama", n_layers=30, dim=576, ffn_dim=1536, n_heads=9, n_kv_heads=3, head_dim=64,
                          vocab_size=49152, context_length=8192, norm_eps=1e-5, rope_base=1e5,
                          rope_local_base=1e5)  # fmt: skip
"""SmolLM2 135M's shape, for profiles built without loading it."""


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    """SmolLM2 at int4 on the kernels, this module's own copy (quantizing the shared fp32 fixture in
    place would change it for other tests). Skipped when the model is not pulled."""
    real_model(SMOL)  # the zoo's skip conventions
    return load(SMOL, quant="int4")


NO_RETRY = {"retries": 0}
"""Grids in these tests measure a disturbed repeat once, not again: a test's time stays bounded when
the host is busy (the medians and the one-pass comparisons absorb the noise)."""


@pytest.fixture(scope="module")
def quick(smol: LoadedModel) -> list[Sample]:
    return profiler.quick_samples(smol, dataclasses.replace(profiler.QUICK, **NO_RETRY))


def _profile(model: str = SMOL) -> DeviceProfile:
    """A calibrated profile without measuring: cpu-2core with a fit to made-up samples."""
    base = load_profile("cpu-2core")
    samples = [Sample("prefill", t, 0.07 * t + 1) for t in QUICK_PREFILL]
    samples += [Sample("decode", c, 5 + 0.0025 * c) for c in QUICK_DECODE]
    samples += [Sample("head", 1, 0.9), Sample("request", 0, 1.7)]
    cost = served_model_cost(SMOL_CONFIG)
    cal = calib.fit(samples, base, cost, model, "int4", "cpu")
    return dataclasses.replace(base, name="test-measured", description="a test", calibrations=(cal,))


# -- measurements and the fit ---------------------------------------------------------------------------


def test_quick_samples_are_the_eight_of_the_quick_grid(quick: list[Sample]) -> None:
    assert [(s.kind, s.tokens) for s in quick] == [("prefill", t) for t in QUICK_PREFILL] + [
        ("decode", c) for c in QUICK_DECODE
    ]
    assert all(isinstance(s, Sample) and s.ms > 0 for s in quick)
    by = {(s.kind, s.tokens): s.ms for s in quick}
    # Far beyond the host's noise: 64x the tokens costs more than 3x a layer; 64x the context more.
    assert by[("prefill", 2048)] > 3 * by[("prefill", 32)]
    assert by[("decode", 4096)] > by[("decode", 64)]


def test_a_fit_from_the_quick_grid_predicts_other_points(smol: LoadedModel) -> None:
    """The quick grid's points and four others, measured in one pass (repeats round-robin over all
    of them, so a neighbour's burst of load hits both sets alike); the fit to the quick points
    predicts the others. quick_samples measures the quick points by the same code (measure_grid)."""
    cost = profiler.model_cost(smol)
    union = profiler.Grid(
        prefill=tuple(sorted({*QUICK_PREFILL, 64, 512})), decode=tuple(sorted({*QUICK_DECODE, 128, 1024})),
        repeats=3, prefill_budget_s=0.15, **NO_RETRY,
    )  # fmt: skip
    samples = profiler.measure_grid(smol, union, extras=False)
    quick = [s for s in samples if s.tokens in (QUICK_PREFILL if s.kind == "prefill" else QUICK_DECODE)]
    others = [s for s in samples if s not in quick]
    assert len(quick) == 8 and len(others) == 4
    base = load_profile("cpu-2core")

    def median_error(fitted_to: list[Sample]) -> float:
        cal = calib.fit(fitted_to, base, cost, SMOL, "int4", "cpu")
        predict = {"prefill": calib.layer_prefill_ms, "decode": calib.decode_ms}
        pairs = [(s.ms, predict[s.kind](cal, cost, s.tokens)) for s in others]
        return calib.quantile(calib.percentage_errors(pairs), 0.5)

    assert median_error(quick) < 25.0
    slow = [dataclasses.replace(s, ms=3 * s.ms) for s in quick]
    assert median_error(slow) > 25.0  # the bound can fail


def test_profile_device_writes_a_file_that_loads_back_equal(smol: LoadedModel, tmp_path: Path) -> None:
    small = profiler.Grid(prefill=(32, 256), decode=(64, 512), repeats=1, prefill_budget_s=0.1, **NO_RETRY)
    seen: list[profiler.Measured] = []
    profile = profiler.profile_device(smol, SMOL, "int4", "cpu", load_profile("cpu-2core"), small, seen.append)
    assert [m.done for m in seen] == list(range(1, len(seen) + 1)) and seen[-1].done == seen[-1].total
    assert 0 < profile.efficiency.prefill <= 1 and 0 < profile.efficiency.decode <= 1
    assert profile.memory_bandwidth_gbs > 0 and profile.compute_tflops > 0
    assert profiler.cpu_name() in profile.description and "measured" in profile.description
    assert profile.name == "cpu-2core" and profile.quant == "int4"  # the class the hub knows; the precision measured
    cal = profile.calibration_for(SMOL, "int4", "cpu")
    assert cal is not None and cal.power_w == 0.0 and cal.power_sensor == ""  # no sensor here: an estimate
    assert {s.kind for s in cal.samples} == {"prefill", "decode", "head", "request"}
    path = profiler.write_profile(profile, tmp_path / "dev.yaml")
    assert load_profile(path) == profile
    assert path.read_text().startswith("# Device profile written by `tandem profile`")
    assert [p.name for p in tmp_path.iterdir()] == ["dev.yaml"]  # no temporary file left


def test_write_profile_round_trips_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    profile = _profile()
    path = profiler.write_profile(profile, tmp_path / "p.yaml")
    assert load_profile(path) == profile
    with pytest.raises(ProfileError, match="missing"):
        profiler.write_profile(profile, tmp_path / "missing" / "p.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


# -- the command ----------------------------------------------------------------------------------------


def test_cli_quick_writes_a_profile_that_loads(smol: LoadedModel, tmp_path: Path, capsys) -> None:
    out = tmp_path / "dev.yaml"
    assert main(["profile", "--model", SMOL, "--quant", "int4", "--quick", "--out", str(out)]) == 0
    profile = load_profile(out)
    assert profile.calibration_for(SMOL, "int4", "cpu") is not None
    text = capsys.readouterr()
    assert "calibrated error: median" in text.out and "prefill 2048 tokens" in text.err


def _refused(args: list[str], capsys, monkeypatch, *needles: str) -> None:
    """The command exits 2 naming `needles`, before loading any model."""

    def no_load(*_a, **_k):
        raise AssertionError("loaded a model despite bad input")

    monkeypatch.setattr(runtime, "load", no_load)
    assert main(["profile", "--quick", *args]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err


def test_cli_refuses_an_out_in_a_missing_directory(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "nope" / "dev.yaml"
    _refused(["--out", str(out)], capsys, monkeypatch, "--out", "does not exist")
    assert not out.parent.exists()


def test_cli_refuses_an_unwritable_out(tmp_path: Path, capsys, monkeypatch) -> None:
    if os.geteuid() == 0:  # root writes through any mode bits: use a directory no one may create in
        ro = Path("/sys")
        try:
            with tempfile.TemporaryFile(dir=ro):
                pytest.skip("/sys is writable here")
        except OSError:
            pass
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
    _refused(["--out", str(ro / "dev.yaml")], capsys, monkeypatch, "--out", "cannot write")
    assert not (ro / "dev.yaml").exists()


def test_cli_refuses_a_bad_base_profile(tmp_path: Path, capsys, monkeypatch) -> None:
    bad = tmp_path / "base.yaml"
    bad.write_text("name: x\nkind: edge\nmemory_gb: [\n")
    out = tmp_path / "dev.yaml"
    _refused(["--base-profile", str(bad), "--out", str(out)], capsys, monkeypatch, "--base-profile", str(bad))
    assert not out.exists()


def test_cli_refuses_an_unknown_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "dev.yaml"
    assert main(["profile", "--model", "no-such-model", "--quick", "--out", str(out)]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- bad profile files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_profile_is_refused_naming_the_file(tmp_path: Path, damage: str) -> None:
    path = profiler.write_profile(_profile(), tmp_path / "p.yaml")
    text = path.read_text()
    cut = {"truncated": text[: len(text) // 2], "garbage": "\x00\x01 ][ {{: :\n- :", "empty": ""}
    path.write_text(cut[damage])
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert str(path) in str(err.value)


def test_a_profile_measured_for_another_model_is_refused() -> None:
    profile = _profile(model="gemma3-270m")
    with pytest.raises(ProfileError, match="calibrations") as err:
        profile.calibration_for(SMOL, "int4", "cpu")
    assert "gemma3-270m" in str(err.value)
    assert profile.calibration_for("gemma3-270m", "int4", "cpu") is not None
    assert dataclasses.replace(profile, calibrations=()).calibration_for(SMOL, "int4", "cpu") is None


@pytest.mark.parametrize("ms", ["0", "-1.5", ".nan"])
def test_a_sample_with_a_non_positive_time_is_refused_naming_the_field(tmp_path: Path, ms: str) -> None:
    path = profiler.write_profile(_profile(), tmp_path / "p.yaml")
    lines = path.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if "{kind: prefill" in line)
    lines[i] = f"  - {{kind: prefill, tokens: 32.0, ms: {ms}}}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert str(path) in str(err.value) and "calibrations[0].samples[0].ms" in str(err.value)


def test_a_calibration_is_frozen_and_validates() -> None:
    cal = _profile().calibrations[0]
    assert isinstance(cal, Calibration)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cal.head_ms = 0.0  # type: ignore[misc]
