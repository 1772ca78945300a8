"""flashing's transport against a real OpenSSH server (tests/sshkit.py): the SSH target, the
resumable checksummed copy, the device's facts and the pre-flight check."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import platform
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_profiles import load_profile
from flashing.facts import DeviceFacts, GpuFacts, Requirements, gather_facts, preflight
from flashing.target import DirTarget, Target, TargetError, open_target
from flashing.transfer import CHUNK, sync
from tests.sshkit import SSHKit, free_port, ssh_server, sshd_missing

MB = 1 << 20
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="module")
def kit() -> Iterator[SSHKit]:
    why = sshd_missing()
    if why:
        pytest.skip(why)
    with ssh_server() as k:
        yield k


def make_target(kind: str, kit: SSHKit | None, root: Path, user: str = "root") -> Target:
    if kind == "dir":
        return open_target(f"dir:{root}")
    assert kit is not None
    return open_target(kit.url(user, str(root)), kit.identity, kit.known_hosts)


@pytest.fixture(params=["ssh", "dir"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def maybe_kit(kind: str, request: pytest.FixtureRequest) -> SSHKit | None:
    return request.getfixturevalue("kit") if kind == "ssh" else None


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.part"))


# -- the copy ---------------------------------------------------------------------------------------------


async def test_sync_copies_verified_files_then_sends_nothing(
    kind: str, maybe_kit: SSHKit | None, tmp_path: Path
) -> None:
    src, root = tmp_path / "src", tmp_path / "device"
    src.mkdir()
    files = [random_file(src / "a.bin", 2 * MB + 123), random_file(src / "b.txt", 10), random_file(src / "e", 0)]
    specs = [(f, f"payload/{f.name}", None) for f in files]
    total = sum(f.stat().st_size for f in files)
    seen: list[tuple[int, int, str]] = []
    async with make_target(kind, maybe_kit, root) as target:
        first = await sync(target, specs, progress=lambda d, t, n: seen.append((d, t, n)))
        second = await sync(target, specs)
        (src / "b.txt").write_bytes(b"changed!")  # one file changes: only it is sent again
        third = await sync(target, specs)
    assert (first.bytes_sent, first.files_sent, first.files_skipped) == (total, 3, 0)
    assert [sha(root / "payload" / f.name) for f in files] == [sha(f) for f in files]
    assert seen[-1] == (total, total, "e")
    assert (second.bytes_sent, second.files_sent, second.files_skipped) == (0, 0, 3)
    assert (third.bytes_sent, third.files_sent, [f.action for f in third.files]) == (
        8,
        1,
        ["skipped", "sent", "skipped"],
    )
    assert (root / "payload" / "b.txt").read_bytes() == b"changed!"
    assert leftovers(root) == []


async def test_interrupted_copy_resumes_from_its_part(kit: SSHKit, tmp_path: Path) -> None:
    size = 8 * MB + 1000
    local, root = random_file(tmp_path / "model.gguf", size), tmp_path / "device"
    killed: list[int] = []

    def cut_at_half(done: int, total: int, name: str) -> None:
        if done >= total // 2 and not killed:
            killed.append(kit.kill_connections())

    async with make_target("ssh", kit, root) as target:
        with pytest.raises(TargetError, match="connection lost"):
            await sync(target, [(local, "model.gguf", None)], progress=cut_at_half)
        part = root / "model.gguf.part"
        assert killed and killed[0] > 0 and 0 < part.stat().st_size < size
        report = await sync(target, [(local, "model.gguf", None)])  # the same target connects again
    (done,) = report.files
    assert (report.files_resumed, done.action) == (1, "resumed")
    assert done.resumed_from >= 4 * MB and done.resumed_from % CHUNK == 0
    assert report.bytes_sent == size - done.resumed_from < size
    assert sha(root / "model.gguf") == sha(local) and not part.exists()


async def test_a_part_that_does_not_match_is_started_over(tmp_path: Path) -> None:
    local, root = random_file(tmp_path / "w.bin", 3 * MB), tmp_path / "device"
    random_file(tmp_path / "other", 2 * MB)
    root.mkdir()
    shutil.copy(tmp_path / "other", root / "w.bin.part")  # another file's bytes: not a prefix of ours
    report = await sync(DirTarget(root), [(local, "w.bin", None)])
    assert [(f.action, f.sent) for f in report.files] == [("sent", 3 * MB)]
    assert sha(root / "w.bin") == sha(local)


# -- errors an operator can act on ------------------------------------------------------------------------


async def test_unreachable_host_names_host_and_port(kit: SSHKit) -> None:
    port = free_port()  # nothing listens there
    target = open_target(f"ssh://root@127.0.0.1:{port}/x", kit.identity, kit.known_hosts)
    with pytest.raises(TargetError, match=rf"cannot reach 127\.0\.0\.1:{port}: connection refused"):
        await target.run(["true"])


async def test_wrong_key_is_refused(kit: SSHKit, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    target = open_target(kit.url("root", "/x"), str(other), kit.known_hosts)
    with pytest.raises(TargetError, match=f"127.0.0.1:{kit.port} refused key {other} for user root"):
        await target.run(["true"])


async def test_unknown_host_key_is_not_trusted(kit: SSHKit, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    target = open_target(kit.url("root", "/x"), kit.identity, str(empty))
    with pytest.raises(TargetError, match=f"host not trusted.*ssh-keyscan -p {kit.port} 127.0.0.1 >> {empty}"):
        await target.run(["true"])


@pytest.fixture
def unprivileged_user() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating a login needs root and useradd")
    name = "tandemflashtest"
    try:
        pwd.getpwnam(name)
    except KeyError:  # "*": no password, yet not locked (sshd without PAM refuses a locked "!" account)
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", "-p", "*", name], check=True)
    yield name
    subprocess.run(["userdel", name], check=False)


async def test_permission_denied_names_user_and_path(kit: SSHKit, unprivileged_user: str, tmp_path: Path) -> None:
    locked = Path(f"/tmp/tandem-locked-{os.getpid()}")  # root's tmp_path is 0700: the user must reach it
    locked.mkdir(mode=0o755, exist_ok=True)
    try:
        local = random_file(tmp_path / "f", 100)
        async with make_target("ssh", kit, locked / "tandem", user=unprivileged_user) as target:
            with pytest.raises(TargetError, match=f"permission denied: user {unprivileged_user} cannot write"):
                await sync(target, [(local, "f", None)])
    finally:
        shutil.rmtree(locked)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


async def test_disk_full_is_reported_and_leaves_no_part(
    kind: str, maybe_kit: SSHKit | None, tiny_disk: Path, tmp_path: Path
) -> None:
    local = random_file(tmp_path / "big.bin", 4 * MB)
    async with make_target(kind, maybe_kit, tiny_disk) as target:
        with pytest.raises(TargetError, match=rf"the device's disk is full at {tiny_disk}/big\.bin\.part: \d+ bytes"):
            await sync(target, [(local, "big.bin", None)])
    assert leftovers(tiny_disk) == [] and not (tiny_disk / "big.bin").exists()


# -- facts and pre-flight ---------------------------------------------------------------------------------


async def test_gather_facts_reads_this_machine(kind: str, maybe_kit: SSHKit | None, tmp_path: Path) -> None:
    async with make_target(kind, maybe_kit, tmp_path / "not" / "yet") as target:
        facts = await gather_facts(target)
    assert facts.arch == platform.machine()
    assert facts.python_minor == THIS_PYTHON  # Debian's /usr/bin/python3 over ssh, this one's on PATH
    assert 0 < facts.mem_available <= facts.mem_total
    assert facts.disk_path == str(tmp_path) and facts.disk_free > 0
    assert (facts.compiler is not None) == ((shutil.which("gcc") or shutil.which("cc")) is not None)
    assert facts.systemd == os.path.isdir("/run/systemd/system")
    assert facts.os


def fake_bin(tmp_path: Path, nvidia_smi: str | None) -> str:
    """A PATH with only sh (and a fake nvidia-smi when given): what a bare device would have."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to(shutil.which("sh") or "/bin/sh")
    if nvidia_smi is not None:
        (bin_dir / "nvidia-smi").write_text(nvidia_smi)
        (bin_dir / "nvidia-smi").chmod(0o755)
    return str(bin_dir)


async def test_no_python3_on_the_device_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", fake_bin(tmp_path, None))
    with pytest.raises(TargetError, match="the device has no python3"):
        await gather_facts(DirTarget(tmp_path))


FAKE_SMI = """#!/bin/sh
case "$1" in
  --query-gpu*) echo "NVIDIA GeForce RTX 3060, 535.104.05, 12288" ;;
  *) echo "| NVIDIA-SMI 535.104.05    Driver Version: 535.104.05    CUDA Version: 12.2 |" ;;
esac
"""


async def test_probe_reads_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{fake_bin(tmp_path, FAKE_SMI)}:{os.environ['PATH']}")
    facts = await gather_facts(DirTarget(tmp_path))
    assert facts.gpus == (GpuFacts("NVIDIA GeForce RTX 3060", "535.104.05", 12288 * MB),) and facts.cuda == "12.2"
    req = Requirements("m", resident_bytes=10**9, runtime_bytes=0, payload_bytes=0, installed_bytes=0, backend="cuda")
    report = preflight(facts, load_profile("rtx-3060"), dataclasses.replace(req, python=facts.python_minor))
    by_name = {c.name: c for c in report.checks}
    assert by_name["backend"].ok and "CUDA 12.2" in by_name["backend"].detail
    too_big = preflight(facts, load_profile("rtx-3060"), dataclasses.replace(req, resident_bytes=12 * 10**9))
    assert not {c.name: c for c in too_big.checks}["gpu memory"].ok


@pytest.fixture(scope="module")
def here() -> DeviceFacts:
    return asyncio.run(gather_facts(DirTarget("/tmp")))


def needs(here: DeviceFacts, **kw: object) -> Requirements:
    base = dict(model="tiny", resident_bytes=100 * MB, runtime_bytes=200 * MB, payload_bytes=10 * MB)
    return Requirements(**{**base, "installed_bytes": 50 * MB, "python": here.python_minor, **kw})  # type: ignore[arg-type]


def failed(report: object) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks if not c.ok}  # type: ignore[attr-defined]


async def test_preflight_passes_a_model_that_fits(here: DeviceFacts) -> None:
    if here.compiler is None:
        pytest.skip("no C compiler here: the cpu backend check fails by design")
    report = preflight(here, load_profile("cpu-2core"), needs(here))
    assert report.ok, report.render()
    assert [c.name for c in report.checks] == ["arch", "python", "memory", "profile memory", "disk", "backend"]
    assert report.render().count("ok  ") == 6


async def test_preflight_refuses_what_does_not_fit(here: DeviceFacts) -> None:
    cpu = load_profile("cpu-2core")
    big = needs(here, resident_bytes=here.mem_available, runtime_bytes=0)
    need = int(here.mem_available * 1.2)
    assert (
        failed(preflight(here, cpu, big))["memory"].startswith(f"tiny does not fit: needs {need} bytes")
        and f"{here.mem_available} bytes" in failed(preflight(here, cpu, big))["memory"]
    )
    small_profile = dataclasses.replace(cpu, memory_gb=0.1)
    assert set(failed(preflight(here, small_profile, needs(here)))) == {"profile memory"}
    assert "free" in failed(preflight(here, cpu, needs(here, payload_bytes=here.disk_free)))["disk"]
    assert "wheelhouse is built for 3.1" in failed(preflight(here, cpu, needs(here, python="3.1")))["python"]
    odd = dataclasses.replace(here, arch="riscv64")
    assert "riscv64: we ship wheels for x86_64, aarch64" in failed(preflight(odd, cpu, needs(here)))["arch"]


async def test_preflight_refuses_a_missing_backend(here: DeviceFacts) -> None:
    if here.gpus or shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA GPU")
    cuda = needs(here, backend="cuda")
    assert "no NVIDIA GPU found" in failed(preflight(here, load_profile("jetson-orin-nano"), cuda))["backend"]
    assert "lists only torch, onnxruntime" in failed(preflight(here, load_profile("cpu-2core"), cuda))["backend"]
    no_cc = dataclasses.replace(here, compiler=None)
    assert "install gcc" in failed(preflight(no_cc, load_profile("cpu-2core"), needs(here)))["backend"]
    jetson = dataclasses.replace(here, gpus=(GpuFacts("Orin (nvgpu)", "540.3.0", 0),), cuda="12.2", l4t="R36.3.0")
    report = preflight(jetson, load_profile("jetson-orin-nano"), needs(here, backend="tensorrt"))
    assert "backend" not in failed(report) and "gpu memory" not in {c.name for c in report.checks}
