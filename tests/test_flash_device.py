"""The flash's device side and payload: A/B slots, the supervisor, the lock, the caches, the unit.

The device is a DirTarget (a local folder) and the device-side scripts run as real processes with
this machine's python3. Fast tests use a fake deps venv whose `python` is a shell script standing
for the agent and whose `uv` unzips the wheel; the slow test builds the real wheelhouse and venv.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import types
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from flashing import payload as payload_mod
from flashing import unit, wheels
from flashing.lock import DevicePlatform, LockError, resolve
from flashing.payload import CONFIG_KEYS, DEVICE_SCRIPTS, Payload, agent_config, build_payload
from flashing.target import DirTarget

LOCK = "0123456789abcdef"
PLATFORM = DevicePlatform("3.11", "x86_64", "2.36")

FAKE_UV = """#!{python}
# Stands for uv in `uv pip install ... --target DIR WHEEL`: unzips the wheel into DIR.
import sys, zipfile
args = sys.argv[1:]
zipfile.ZipFile(args[-1]).extractall(args[args.index("--target") + 1])
"""

# Stands for the agent (R/current/deps/bin/python -m tandem_cli agent run ...); its cwd is R/state.
FAKE_AGENT = """#!/bin/sh
echo $$ >> runs.log
case "$(cat mode 2>/dev/null)" in
  crash) exit 3 ;;
  *) exec sleep 600 ;;
esac
"""


def device_module(name: str) -> types.ModuleType:
    """A device-side script imported as the device imports it (by bare name, beside its siblings)."""
    for dep in ("device_util", name):
        if dep not in sys.modules:
            spec = importlib.util.spec_from_file_location(dep, Path(unit.__file__).with_name(f"{dep}.py"))
            assert spec is not None and spec.loader is not None
            sys.modules[dep] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[dep])
    return sys.modules[name]


def install_scripts(root: Path) -> None:
    (root / "bin").mkdir(parents=True, exist_ok=True)
    for script in DEVICE_SCRIPTS:
        shutil.copy(script, root / "bin" / script.name)


def fake_deps(root: Path) -> None:
    bindir = root / "deps" / LOCK / "bin"
    bindir.mkdir(parents=True)
    (bindir / "uv").write_text(FAKE_UV.format(python=sys.executable))
    (bindir / "python").write_text(FAKE_AGENT)
    for name in ("uv", "python"):
        (bindir / name).chmod(0o755)
    (root / "deps" / LOCK / ".ready").write_text("{}")


def fake_wheel(root: Path, rel: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("tandem_fake/__init__.py", "")


def fake_bundle(root: Path, rel: str) -> None:
    (root / rel).mkdir(parents=True)
    for name in ("manifest.json", "weights.pt"):
        (root / rel / name).write_text(name)


@pytest.fixture
def device(tmp_path: Path) -> DirTarget:
    root = tmp_path / "R"
    install_scripts(root)
    fake_deps(root)
    fake_wheel(root, "agents/x/tandem-0.1.0-py3-none-any.whl")
    fake_bundle(root, "bundles/k1")
    return DirTarget(root)


async def ds(target: DirTarget, *args: str, ok: bool = True) -> dict:
    """Run device_side.py on the target as the flash does; its JSON answer."""
    argv = [sys.executable, str(target.path("bin/device_side.py")), "--root", str(target.root), *args]
    out = await target.run(argv, check=False, timeout=60)
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert (out.rc == 0) == ok, (args, out.rc, answer, out.stderr)
    assert ("error" in answer) != ok
    return answer


async def stage(target: DirTarget, slot: str, version: str) -> dict:
    config = Path(target.root) / f"incoming/{version}.json"
    config.parent.mkdir(exist_ok=True)
    config.write_text(json.dumps({"agent_version": version, "token": "secret"}))
    args = ["--wheel", "agents/x/tandem-0.1.0-py3-none-any.whl", "--lock-digest", LOCK, "--bundle", "bundles/k1"]
    return await ds(target, "stage", "--slot", slot, *args, "--config", str(config))


def dead(pid: int) -> bool:
    """No such process (a zombie waiting for init to reap it counts as dead: it runs nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    return stat_line.rsplit(")", 1)[1].split()[0] == "Z"


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---- slots -------------------------------------------------------------------------------


async def test_stage_activate_rollback_switch_slots(device: DirTarget) -> None:
    root = Path(device.root)
    assert (await ds(device, "free-slot"))["slot"] == "a"
    await stage(device, "a", "1.0+aaa")
    assert (await ds(device, "activate", "--slot", "a"))["previous"] is None
    assert "no previous slot" in (await ds(device, "rollback", ok=False))["error"]
    assert (await ds(device, "free-slot"))["slot"] == "b"
    assert (
        "current one"
        in (await ds(device, "stage", "--slot", "a", "--wheel", "w", "--lock-digest", LOCK, ok=False))["error"]
    )
    await stage(device, "b", "2.0+bbb")
    await ds(device, "activate", "--slot", "b")
    assert os.readlink(root / "current") == "slots/b" and os.readlink(root / "previous") == "slots/a"
    status = await ds(device, "status")
    assert (status["slot"], status["version"], status["previous_version"]) == ("b", "2.0+bbb", "1.0+aaa")
    await ds(device, "rollback")
    status = await ds(device, "status")
    assert (status["slot"], status["version"], status["previous"]) == ("a", "1.0+aaa", "b")
    assert not list(root.glob(".*.tmp")), "a temporary link was left behind"
    # The slot owns its bundle as hard links (no copy), its token readable by its owner only.
    slot = root / "slots/a"
    assert (slot / "bundle/weights.pt").stat().st_ino == (root / "bundles/k1/weights.pt").stat().st_ino
    assert stat.S_IMODE((slot / "agent.json").stat().st_mode) == 0o600
    assert (slot / "site/tandem_fake/__init__.py").is_file()
    assert os.readlink(slot / "deps") == f"../../deps/{LOCK}"


async def test_readers_never_see_current_missing(device: DirTarget) -> None:
    """`current` is replaced by rename: a reader polling it during switches always finds a slot."""
    root = Path(device.root)
    await stage(device, "a", "1")
    await ds(device, "activate", "--slot", "a")
    await stage(device, "b", "2")
    await ds(device, "activate", "--slot", "b")
    seen, missing, done = set(), [0], threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                seen.add(os.readlink(root / "current"))
            except FileNotFoundError:
                missing[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(8):  # each switch is a window for a reader to find no link, were it not atomic
            await ds(device, "rollback")
    finally:
        done.set()
        thread.join()
    assert missing[0] == 0 and seen == {"slots/a", "slots/b"}


async def test_clear_errors(device: DirTarget, tmp_path: Path) -> None:
    assert "slot b is empty" in (await ds(device, "activate", "--slot", "b", ok=False))["error"]
    assert "missing lock" in (await ds(device, "prepare-deps", "--lock-digest", "feedface", ok=False))["error"]
    missing = ["--wheel", "agents/none.whl", "--lock-digest", LOCK]
    assert "no agent wheel" in (await ds(device, "stage", "--slot", "a", *missing, ok=False))["error"]
    no_deps = ["--wheel", "agents/x/tandem-0.1.0-py3-none-any.whl", "--lock-digest", "feedface"]
    assert "prepare-deps" in (await ds(device, "stage", "--slot", "a", *no_deps, ok=False))["error"]
    assert "no current slot" in (await ds(device, "start", ok=False))["error"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not Path("/usr/bin/python3").exists(),
                    reason="needs root, setpriv and /usr/bin/python3 to run the script as another user")  # fmt: skip
def test_permission_denied_on_root_is_a_clear_error() -> None:
    top = Path(tempfile.mkdtemp(prefix="tandem-perm-"))  # pytest's tmp_path is 0700: nobody cannot reach it
    try:
        top.chmod(0o755)
        root = top / "R"
        install_scripts(root)
        (root / "wheelhouse").mkdir()
        (root / "wheelhouse" / f"requirements-{LOCK}.lock").write_text("")
        (root / "wheelhouse/uv-0-py3-none-any.whl").write_text("")
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3"]
        argv += [str(root / "bin/device_side.py"), "--root", str(root), "prepare-deps", "--lock-digest", LOCK]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert out.returncode == 1, out.stderr
        assert json.loads(out.stdout)["error"].startswith("permission denied")
    finally:
        shutil.rmtree(top)


# ---- the supervisor ----------------------------------------------------------------------


async def test_supervisor_restarts_failures_and_stop_leaves_no_orphan(device: DirTarget) -> None:
    root = Path(device.root)
    await stage(device, "a", "1")
    await ds(device, "activate", "--slot", "a")
    (root / "state").mkdir()
    (root / "state/mode").write_text("crash")
    started = await ds(device, "start", "--max-restarts", "100", "--window", "60", "--backoff", "0.05")
    sup = started["supervisor_pid"]
    wait_for(lambda: json.loads((root / "run/supervisor.json").read_text())["restarts"] >= 3)
    (root / "state/mode").write_text("sleep")
    wait_for(lambda: json.loads((root / "run/supervisor.json").read_text())["state"] == "running")
    status = await ds(device, "status")
    assert status["running"] and status["supervisor_pid"] == sup and status["restarts"] >= 3
    assert status["last_exit"] == 3 and not status["crash_loop"]
    agent = status["pid"]
    assert not dead(agent) and not dead(sup)
    assert (await ds(device, "start"))["started"] is False  # one supervisor at a time
    assert stat.S_IMODE((root / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "state/mode").stat().st_mode) == 0o600
    await ds(device, "stop")
    assert dead(agent) and dead(sup)
    assert not (await ds(device, "status"))["running"]


async def test_supervisor_detects_a_crash_loop(device: DirTarget) -> None:
    root = Path(device.root)
    await stage(device, "a", "1")
    await ds(device, "activate", "--slot", "a")
    (root / "state").mkdir()
    (root / "state/mode").write_text("crash")
    sup = (await ds(device, "start", "--max-restarts", "2", "--window", "30", "--backoff", "0.05"))["supervisor_pid"]
    wait_for(lambda: dead(sup))
    status = await ds(device, "status")
    assert status["crash_loop"] and status["state"] == "stopped" and status["restarts"] == 2
    assert len((root / "state/runs.log").read_text().split()) == 3  # the first run and two restarts
    assert "a crash loop" in (root / "log/agent.log").read_text()


# ---- the payload -------------------------------------------------------------------------


def test_lock_pins_the_closure_at_installed_versions() -> None:
    lock = resolve(md.distribution("tandem").requires or [], PLATFORM, ">=3.11")
    pins = dict(p.split("==") for p in lock.pins)
    assert pins["torch"].startswith("2.13.0") and "torch==2.13.0+cpu" in lock.text.splitlines()
    for name in ("numpy", "grpcio", "sympy", "markupsafe"):  # direct and transitive
        assert pins[name] == md.version(name)
    for dev_only in ("pytest", "ruff", "hypothesis", "import-linter", "transformers", "pip", "tandem"):
        assert dev_only not in pins
    assert lock.digest == resolve(md.distribution("tandem").requires or [], PLATFORM).digest


def test_lock_markers_follow_the_device() -> None:
    reqs = ["numpy", 'not-installed-anywhere>=1; python_version < "3.9"', 'tqdm; platform_machine == "aarch64"']
    assert [p.split("==")[0] for p in resolve(reqs, PLATFORM).pins] == ["numpy"]
    arm = DevicePlatform("3.11", "aarch64", "2.36")
    assert [p.split("==")[0] for p in resolve(reqs, arm).pins] == ["numpy", "tqdm"]
    with pytest.raises(LockError, match="not installed here"):
        resolve(["not-installed-anywhere"], PLATFORM)
    with pytest.raises(LockError, match="needs Python"):
        resolve(["numpy"], DevicePlatform("3.10", "x86_64"), ">=3.11")
    assert "manylinux_2_17_x86_64" in PLATFORM.pip_platforms and "manylinux_2_36_x86_64" in PLATFORM.pip_platforms


def tiny_project(path: Path) -> Path:
    (path / "tinypkg").mkdir(parents=True)
    (path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "tinypkg"\nversion = "1.2.3"\ndependencies = ["numpy"]\n'
        '[tool.setuptools.packages.find]\ninclude = ["tinypkg*"]\n'
    )
    (path / "tinypkg/__init__.py").write_text("X = 1\n")
    return path


def test_source_digest_changes_with_content_only(tmp_path: Path) -> None:
    root = tiny_project(tmp_path / "p")
    digest = wheels.source_digest(root, wheels.source_files(root))
    os.utime(root / "tinypkg/__init__.py", (0, 0))
    (root / "tinypkg/__pycache__").mkdir()
    (root / "tinypkg/__pycache__/x.cpython-311.pyc").write_bytes(b"junk")
    (root / "other").mkdir()
    (root / "other/__init__.py").write_text("")  # a package pyproject does not include
    assert wheels.source_digest(root, wheels.source_files(root)) == digest
    (root / "tinypkg/__init__.py").write_text("X = 2\n")
    assert wheels.source_digest(root, wheels.source_files(root)) != digest
    real = wheels.source_files(wheels.project_root())
    names = {str(p.relative_to(wheels.project_root())) for p in real}
    assert {"pyproject.toml", "flashing/device_side.py", "device_profiles/cpu-2core.yaml"} <= names
    assert not any(n.startswith(("tests/", ".venv/")) for n in names)


def test_agent_wheel_is_cached_by_source_digest(tmp_path: Path) -> None:
    root, cache = tiny_project(tmp_path / "p"), tmp_path / "cache"
    first = wheels.build_agent_wheel(cache, root)
    assert first.version == "1.2.3" and first.requires == ("numpy",)
    assert wheels.build_agent_wheel(cache, root).file == first.file  # the same file: not rebuilt
    (root / "tinypkg/__init__.py").write_text("X = 2\n")
    second = wheels.build_agent_wheel(cache, root)
    assert second.file.path != first.file.path and second.agent_version != first.agent_version
    assert not (root / "build").exists(), "the build ran in the checkout"


def test_wheelhouse_is_complete_only_when_marked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock, calls = resolve(["numpy"], PLATFORM), []

    def download(tail: list[str], _platform: DevicePlatform, dest: Path, _log: object) -> None:
        calls.append(tail)
        if len(calls) == 2:
            raise wheels.WheelError("network down")
        (dest / f"w{len(calls)}-1-py3-none-any.whl").write_bytes(b"x")

    monkeypatch.setattr(wheels, "_download", download)
    with pytest.raises(wheels.WheelError):
        wheels.build_wheelhouse(lock, PLATFORM, tmp_path)
    entry = next((tmp_path / "wheelhouse").iterdir())
    assert not (entry / wheels.COMPLETE).exists()
    house = wheels.build_wheelhouse(lock, PLATFORM, tmp_path)
    assert (entry / wheels.COMPLETE).exists() and len(calls) == 4
    assert house.lock_file.path.read_text() == lock.text
    assert wheels.build_wheelhouse(lock, PLATFORM, tmp_path) == house and len(calls) == 4  # cached


def test_agent_config_has_exactly_the_agreed_keys(tmp_path: Path) -> None:
    """The keys agreed with `tandem agent run --config`, read back by the agent's own reader."""
    from edge_agent.config_file import KEYS, read_agent_file

    agreed = {"hub", "token", "profile", "model", "bundle", "name", "state_dir", "tls_ca", "quant", "agent_version"}
    assert CONFIG_KEYS == agreed == set(KEYS)
    payload = Payload((), "d", "0.1.0+abc", "agents/w.whl", "bundles/k", "int4", 1, 2, 3)
    root, common = PurePosixPath("/opt/tandem"), {"hub": "h:1", "profile": "cpu-2core", "model": "m", "name": "n"}
    full = agent_config(payload, root, "b", **common, token="t", tls_ca=root / "state/ca.pem")
    data = json.loads(full.to_json())
    assert set(data) == agreed
    assert data["bundle"] == "/opt/tandem/slots/b/bundle" and data["state_dir"] == "/opt/tandem/state"
    assert (data["quant"], data["agent_version"]) == ("int4", "0.1.0+abc")
    first_only = json.loads(agent_config(payload, root, "a", **common).to_json())
    assert set(first_only) == agreed - {"token", "tls_ca"}  # unset keys are left out, not null
    (tmp_path / "agent.json").write_bytes(full.to_json())
    read = read_agent_file(tmp_path / "agent.json")
    assert (read.bundle, read.token, read.agent_version) == ("/opt/tandem/slots/b/bundle", "t", "0.1.0+abc")


def test_unit_fields_and_systemd_verify(tmp_path: Path) -> None:
    root = tmp_path / "R"
    text = unit.render_unit(unit.UnitSpec(PurePosixPath(root)))
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert fields["ExecStart"] == " ".join(unit.agent_argv(PurePosixPath(root)))
    assert device_module("device_service").agent_argv(root) == unit.agent_argv(PurePosixPath(root))
    assert fields["User"] == "tandem-agent" and fields["Restart"] == "on-failure"
    assert fields["ReadWritePaths"] == f"{root}/state {root}/log" and fields["ProtectSystem"] == "strict"
    assert fields["NoNewPrivileges"] == "yes" and int(fields["StartLimitBurst"]) > 0
    assert (fields["Type"], fields["NotifyAccess"], fields["WatchdogSec"]) == ("notify", "main", "60")
    plain = unit.render_unit(unit.UnitSpec(PurePosixPath(root), watchdog_s=None))
    assert "Type=simple" in plain and "Watchdog" not in plain and "NotifyAccess" not in plain
    if shutil.which("systemd-analyze") is None:
        return
    (root / "current/deps/bin").mkdir(parents=True)
    os.symlink(sys.executable, root / "current/deps/bin/python")
    (root / unit.UNIT_NAME).write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(root / unit.UNIT_NAME)], capture_output=True, text=True)
    assert out.returncode == 0 and unit.UNIT_NAME not in out.stderr, out.stderr


# ---- end to end --------------------------------------------------------------------------


@pytest.mark.slow
async def test_real_wheelhouse_installs_offline_and_imports(tmp_path: Path) -> None:
    """The real payload (cached after the first run), prepare-deps on a DirTarget with the
    system python3, stage, and the agent's packages import from the slot with no index."""
    target = DirTarget(tmp_path / "R")
    payload = build_payload("smollm2-135m-instruct", "int4", PLATFORM, target.root)
    for f in payload.files:
        dest = Path(target.path(f.remote))
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(f.local, dest)  # the copy is flashing.transfer's job; here the bytes only need to be there
        assert await target.sha256(PurePosixPath(dest)) == f.sha256
    started = time.monotonic()
    deps = await ds(target, "prepare-deps", "--lock-digest", payload.lock_digest)
    print(f"prepare-deps: {time.monotonic() - started:.1f} s")
    assert deps["reused"] is False
    assert (await ds(target, "prepare-deps", "--lock-digest", payload.lock_digest))["reused"] is True
    args = ["--wheel", payload.wheel_remote, "--lock-digest", payload.lock_digest, "--bundle", payload.bundle_remote]
    await ds(target, "stage", "--slot", "a", *args)
    await ds(target, "activate", "--slot", "a")
    env = {
        "PATH": "/usr/bin:/bin",
        "PIP_NO_INDEX": "1",
        "UV_OFFLINE": "1",
        "PYTHONPATH": str(target.path("current/site")),
    }
    code = (
        "import tandem_cli, edge_agent, models, torch; from models.bundle import load_bundle; print(torch.__version__)"
    )
    out = subprocess.run([str(target.path("current/deps/bin/python")), "-c", code], env=env, capture_output=True,
                         text=True, cwd="/")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "2.13.0+cpu"


# ---- the model bundle --------------------------------------------------------------------


def test_bundle_source_round_trips_mixed_bit_widths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At "source" the tiny GGUF is int8 (its Q8_0 MLP) beside fp32 (its F32 attention), and the
    mixed one int4 (Q4_0 attention) beside int8 (MLP, embedding): each is shipped as it is, its
    bundle's manifest recording every layer's layout, and loads back the same (the flasher checks)."""
    from models.bundle import load_bundle
    from models.source_quant import quant_layout
    from tests.tiny import TinySpec, write_tiny_gguf

    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    source = payload_mod.build_bundle(str(gguf), "source", tmp_path / "flash")
    assert (source.quant, source.notes) == ("source", ())
    assert load_bundle(source.dir, prepare=False).describe("t")["quant"] == "source(f32->fp32,q8_0->int8)"
    record = source.dir.parent / "record.json"
    mtime = record.stat().st_mtime_ns
    assert payload_mod.build_bundle(str(gguf), "source", tmp_path / "flash") == source
    assert record.stat().st_mtime_ns == mtime  # cached: not rebuilt
    int4 = payload_mod.build_bundle(str(gguf), "int4", tmp_path / "flash")
    assert (int4.quant, int4.notes) == ("int4", ()) and int4.key != source.key
    assert {f.path.name for f in int4.files} == {"manifest.json", "weights.pt", "tokenizer.json", "tokenizer_info.json"}
    mixed = write_tiny_gguf(tmp_path / "mixed.gguf", TinySpec(attn_quant="Q4_0", embd_quant="Q8_0"))
    bundle = payload_mod.build_bundle(str(mixed), "source", tmp_path / "flash")
    assert (bundle.quant, bundle.notes) == ("source", ())
    layout = quant_layout(load_bundle(bundle.dir, prepare=False).model)
    assert {spec[0] for spec in layout.values() if spec != "embedding"} == {4, 8}


def test_bundle_that_does_not_load_back_is_a_payload_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.bundle import BundleError
    from tests.tiny import write_tiny_gguf

    def refuse(path: Path, prepare: bool = True) -> None:
        raise BundleError(f"{path}: refused")

    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("models.bundle.load_bundle", refuse)
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(payload_mod.PayloadError, match="does not load back"):
        payload_mod.build_bundle(str(gguf), "source", tmp_path / "flash")


@pytest.mark.real
def test_smollm2_source_bundle_round_trips(tmp_path: Path) -> None:
    """SmolLM2's Q4_1 linears all map to int4 (its Q8_0 embedding is flagged apart), so its
    "source" model is a bundle as it is: the same tensors come back."""
    from models import zoo

    if not zoo.model_path("smollm2-135m-instruct").is_file():
        pytest.skip("smollm2-135m-instruct is not pulled")
    bundle = payload_mod.build_bundle("smollm2-135m-instruct", "source", tmp_path)
    assert (bundle.quant, bundle.notes) == ("source", ())
    assert 50e6 < bundle.resident_bytes < 150e6
