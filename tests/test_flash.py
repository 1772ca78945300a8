"""`tandem agent flash` end to end: a real hub process, a real OpenSSH server (tests/sshkit.py) or a
directory as the device, the real payload (SmolLM2's bundle, this checkout's wheel, the pinned
wheelhouse), the agent installed, started under the device-side supervisor, enrolled and answering.

One device is flashed over SSH once for the module; the tests after the first build on it in
order (a second flash copies nothing; --rollback by hand; a broken agent rolls back by itself).
Each flash builds the real payload and installs and starts a real agent (minutes on a fresh
machine), so these are `slow`; the default suite keeps the checks that need no payload (bad
targets, unknown profiles) and the parts' own tests (tests/test_flash_transport.py,
tests/test_flash_device.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest

from flashing.flash import FlashError, FlashRequest, flash, rollback
from flashing.payload import flash_cache
from flashing.target import DirTarget
from flashing.wheels import build_agent_wheel
from tandem import Client
from tandem_cli.main import main as cli
from tests.sshkit import SSHKit, ssh_server, sshd_missing

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
real = pytest.mark.skipif(
    not (Path.home() / ".cache/tandem/models" / MODEL).exists() and not os.environ.get("TANDEM_REQUIRE_MODELS"),
    reason=f"{MODEL} is not pulled (make models)",
)


class HubProcess:
    """`tandem hub up` in a subprocess, with a managed broker and an API key file."""

    def __init__(self, tmp: Path) -> None:
        self.key_file = tmp / "hub-key"
        argv = [sys.executable, "-m", "tandem_cli", "hub", "up", "--data-dir", str(tmp / "hub"), "--listen",
                "127.0.0.1:0", "--api-key-file", str(self.key_file), "--no-ui"]  # fmt: skip
        self.log = (tmp / "hub.log").open("w+")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        first = self.proc.stdout.readline()  # type: ignore[union-attr]
        ready = re.search(r"hub ready on (\S+)", first)
        assert ready, first + self._log()
        self.address = ready.group(1)

    def _log(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    @property
    def api_key(self) -> str:
        return self.key_file.read_text().strip()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def sshd() -> Iterator[SSHKit]:
    missing = sshd_missing()
    if missing:
        pytest.skip(missing)
    with ssh_server() as kit:
        yield kit


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    h = HubProcess(tmp_path_factory.mktemp("flash-hub"))
    yield h
    h.close()


def _request(hub: HubProcess, target: str, **kw: object) -> FlashRequest:
    options: dict = {"profile": "cpu-2core", "model": MODEL, "name": "flashed", "health_timeout_s": 240, **kw}
    return FlashRequest(target=target, hub=hub.address, api_key=hub.api_key, **options)


def _stop(root: Path) -> None:
    """Stop a flashed device's agent (the supervisor and its child)."""
    script = root / "bin/device_side.py"
    if script.exists():
        subprocess.run([sys.executable, str(script), "--root", str(root), "stop"], capture_output=True, timeout=60)


@pytest.mark.slow  # builds the whole payload first (a fresh machine downloads the 280 MB wheelhouse)
@real
def test_preflight_refuses_a_model_that_does_not_fit_and_copies_nothing(hub: HubProcess, tmp_path: Path) -> None:
    root = tmp_path / "device"
    # raspberry-pi-5 has 8 GB; a profile whose memory is too small is the case: a 0.1 GB profile file
    small = tmp_path / "tiny-device.yaml"
    text = (ROOT / "device_profiles/cpu-2core.yaml").read_text()
    small.write_text(
        re.sub(r"(?m)^name: .*$", "name: tiny-device", re.sub(r"(?m)^memory_gb: .*$", "memory_gb: 0.1", text))
    )
    request = _request(hub, f"dir:{root}", profile=str(small))
    with pytest.raises(FlashError) as err:
        asyncio.run(flash(request))
    assert err.value.step == "pre-flight" and "profile memory" in str(err.value), err.value
    copied = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    assert copied == [], f"pre-flight refused but copied {copied[:5]}"
    # the command says the same, with exit status 1
    argv = ["agent", "flash", "--target", f"dir:{root}", "--hub", hub.address, "--api-key", hub.api_key,
            "--profile", str(small), "--model", MODEL]  # fmt: skip
    assert cli(argv) == 1


def _broken_wheel(good: Path, out_dir: Path) -> Path:
    """A copy of the agent's wheel whose `tandem_cli/__main__.py` exits 3 at start: a bad release."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / good.name
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "tandem_cli/__main__.py":
                data = b"import sys\nsys.exit('broken release: exits at start')\n"
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(line for line in data.split(b"\n") if not line.startswith(b"tandem_cli/__main__.py"))
            dst.writestr(item, data)
    return out


@pytest.mark.slow
@real
class TestFlashOverSSH:
    """In order, on one device: flash, reflash (nothing copied), rollback by hand, a broken release
    (rolled back by itself)."""

    state: ClassVar[dict] = {}

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _device(cls, sshd: SSHKit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
        root = tmp_path_factory.mktemp("ssh-device") / "tandem"
        # One release for the class, built from this checkout once: the source may change while the
        # tests run (a new wheel is a new release, which a reflash rightly copies).
        release = tmp_path_factory.mktemp("release")
        built = build_agent_wheel(flash_cache()).file.path
        wheel = Path(shutil.copy(built, release / built.name))
        cls.state = {"root": root, "url": sshd.url("root", str(root)), "sshd": sshd, "wheel": wheel}
        yield
        _stop(root)

    def _req(self, hub: HubProcess, **kw: object) -> FlashRequest:
        s = self.state
        options = {"wheel": s["wheel"], **kw}
        return _request(hub, s["url"], identity=s["sshd"].identity, known_hosts=s["sshd"].known_hosts, **options)

    def test_1_flash_enrolls_and_answers(self, hub: HubProcess) -> None:
        result = asyncio.run(flash(self._req(hub)))
        print(f"first flash over ssh: {result.bytes_sent / 1e6:.0f} MB, seconds by step {result.seconds}")
        assert result.device_id and result.bytes_sent > 100e6, result  # the wheelhouse, wheel and bundle
        with Client(hub.address, api_key=hub.api_key, timeout=60) as client:
            (device,) = [d for d in client.devices() if d.device_id == result.device_id]
            assert device.status == "online" and device.agent_version == result.agent_version
            answer = client.generate("The capital of France is", model=MODEL, device=result.device_id, max_tokens=8)
        assert answer.completion_tokens == 8 and answer.placement.device_id == result.device_id
        self.state["first"] = result

    def test_2_reflash_copies_nothing(self, hub: HubProcess) -> None:
        first = self.state["first"]
        result = asyncio.run(flash(self._req(hub)))
        print(f"second flash: {result.bytes_sent} bytes, {result.files_skipped} files skipped, {result.seconds}")
        assert result.bytes_sent <= 4096, f"a second flash of the same bundle copied {result.bytes_sent} bytes"
        assert result.device_id == first.device_id and result.slot != first.slot  # A/B: the other slot

    def test_3_rollback_by_hand(self, hub: HubProcess) -> None:
        result = asyncio.run(rollback(self._req(hub)))  # to the first flash's slot (the same release)
        first = self.state["first"]
        assert result.device_id == first.device_id and result.rolled_back and result.slot == first.slot

    def test_4_broken_release_rolls_back(self, hub: HubProcess, tmp_path: Path) -> None:
        bad = _broken_wheel(self.state["wheel"], tmp_path / "bad")
        with pytest.raises(FlashError) as err:
            asyncio.run(flash(self._req(hub, wheel=bad, health_timeout_s=120)))
        assert err.value.step == "health" and "rolled back" in str(err.value) and "online again" in str(err.value)
        with Client(hub.address, api_key=hub.api_key, timeout=60) as client:
            device_id = self.state["first"].device_id
            (device,) = [d for d in client.devices() if d.device_id == device_id]
            assert device.status == "online" and device.agent_version == self.state["first"].agent_version
            assert client.generate("Hello", model=MODEL, device=device_id, max_tokens=2).completion_tokens == 2


@pytest.mark.slow
@real
def test_flash_into_a_directory(hub: HubProcess, tmp_path: Path) -> None:
    root = tmp_path / "device"
    try:
        result = asyncio.run(flash(_request(hub, f"dir:{root}", name="dir-device")))
        with Client(hub.address, api_key=hub.api_key, timeout=60) as client:
            answer = client.generate("Hello", model=MODEL, device=result.device_id, max_tokens=4)
        assert answer.completion_tokens == 4
        assert oct((root / "state").stat().st_mode & 0o777) == "0o700"
    finally:
        _stop(root)


def test_dry_run_needs_no_hub_and_unknown_profile_is_clear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["agent", "flash", "--target", f"dir:{tmp_path / 'd'}", "--hub", "127.0.0.1:1", "--profile",
            "no-such-profile", "--dry-run"]  # fmt: skip
    assert cli(argv) == 1
    assert "no-such-profile" in capsys.readouterr().err
    assert cli(["agent", "flash", "--target", "ftp://x", "--hub", "h:1", "--profile", "cpu-2core", "--dry-run"]) == 1
    assert "ssh://" in capsys.readouterr().err


def test_an_unreachable_host_is_a_clear_error_and_nothing_runs(tmp_path: Path, sshd: SSHKit) -> None:
    url = sshd.url("root", str(tmp_path / "d")).replace(f":{sshd.port}", ":1")
    request = FlashRequest(target=url, hub="127.0.0.1:1", api_key="k", identity=str(sshd.identity))
    with pytest.raises(FlashError) as err:
        asyncio.run(flash(request))
    assert err.value.step == "connect" and "127.0.0.1:1" in str(err.value)
    wrong = replace(request, target=sshd.url("root", str(tmp_path / "d")), identity=str(tmp_path / "nokey"))
    shutil.copy(sshd.identity, tmp_path / "nokey")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    wrong = replace(wrong, identity=str(tmp_path / "other"), known_hosts=str(sshd.known_hosts))
    with pytest.raises(FlashError) as err:
        asyncio.run(flash(wrong))
    assert err.value.step == "connect" and "refused key" in str(err.value)
    assert not (tmp_path / "d").exists()
    _ = DirTarget  # the dir: target is exercised by the slow test
