"""Import boundaries, checked in a fresh interpreter: the SDK loads only its protocol, grpc and the
standard library; the CLI's parser (`tandem --help`) does not load torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "models", "cloud_hub", "edge_agent", "partitioner", "device_profiles", "tandem_cli")


def _modules_after(code: str) -> set[str]:
    """The keys of sys.modules after running `code` in a fresh interpreter of this venv."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def _loaded(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in packages)


def test_sdk_imports_no_framework_package() -> None:
    modules = _modules_after("import tandem\ntandem.Client")
    assert {"tandem.client", "grpc"} <= modules  # the listing is real, so an empty one cannot pass
    assert _loaded(modules, HEAVY) == []


def test_cli_help_does_not_import_torch() -> None:
    code = (  # what `python -m tandem_cli --help` runs, with its usage text swallowed
        "import contextlib, io, runpy, sys\n"
        "sys.argv = ['tandem', '--help']\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    runpy.run_module('tandem_cli', run_name='__main__')"
    )
    modules = _modules_after(code)
    assert {"tandem_cli.main", "tandem_cli.optimize", "tandem.client"} <= modules
    assert _loaded(modules, ("torch",)) == []


def test_python_m_tandem_cli_help_exits_zero() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tandem_cli", "--help"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tandem ")
    assert "{models,optimize,profile,partition,hub,agent,devices,generate,experts}" in done.stdout
