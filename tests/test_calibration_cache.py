"""A restarted agent reuses the calibration it measured for the same model on the same machine
(edge_agent.calibrate.cached_calibration): a reflash or rollback is online in seconds."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from device_profiles import load_profile
from edge_agent import calibrate
from models.runtime import load
from models.serving import ServedModel
from tests.hubkit import tiny_llama


@pytest.fixture(autouse=True)
def _no_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quick grids measure a disturbed repeat once (as tests/test_profiler.py's do): bounded time on a busy host."""
    grid = calibrate.quick_grid

    monkeypatch.setattr(calibrate, "quick_grid", lambda context: dataclasses.replace(grid(context), retries=0))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    return ServedModel("tiny", load(tiny_llama(tmp_path_factory.mktemp("cal")), use_cache=False))


def test_a_second_start_reuses_the_first_ones_calibration(served: ServedModel, tmp_path: Path, monkeypatch) -> None:
    profile = load_profile("cpu-2core")
    measured = []
    real = calibrate.agent_calibration

    def counting(*args: object):
        measured.append(args)
        return real(*args)

    monkeypatch.setattr(calibrate, "agent_calibration", counting)
    first, how = calibrate.cached_calibration(tmp_path, served, "tiny", "fp32", "cpu", profile)
    assert "calibrated itself" in how and len(measured) == 1
    (path,) = tmp_path.glob("*.json")
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o700"
    again, how = calibrate.cached_calibration(tmp_path, served, "tiny", "fp32", "cpu", profile)
    assert "reused" in how and len(measured) == 1 and again == first
    # another precision is another calibration
    calibrate.cached_calibration(tmp_path, served, "tiny", "int8", "cpu", profile)
    assert len(measured) == 2 and len(list(tmp_path.glob("*.json"))) == 2
    # a damaged file is measured over, and one past its age too
    path.write_text("{not json")
    _, how = calibrate.cached_calibration(tmp_path, served, "tiny", "fp32", "cpu", profile)
    assert "calibrated itself" in how and len(measured) == 3
    old = time.time() - calibrate.CACHE_MAX_AGE_S - 10
    os.utime(path, (old, old))
    calibrate.cached_calibration(tmp_path, served, "tiny", "fp32", "cpu", profile)
    assert len(measured) == 4


def test_no_cache_always_measures(served: ServedModel) -> None:
    cal, how = calibrate.cached_calibration(None, served, "tiny", "fp32", "cpu", load_profile("cpu-2core"))
    assert "calibrated itself" in how and cal.decode
