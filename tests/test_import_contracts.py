"""The layering contracts (pyproject.toml, [tool.importlinter]) hold, and a forbidden import breaks them.

Each case copies the packages and pyproject.toml to a temporary directory, writes one module with an
import the architecture forbids, and runs `lint-imports` there: the contract it names must break.
The untouched copy must pass, so the failures come from the planted import alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tandem", "tandem_cli", "cloud_hub", "edge_agent", "partitioner", "device_profiles", "models")
LINT = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layout")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    if not LINT.exists():
        pytest.fail(f"{LINT} is missing: import-linter is a dev dependency (make test installs it)")
    return subprocess.run([str(LINT), "--no-logo", "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120)


def test_the_project_keeps_its_contracts(tree: Path) -> None:
    out = lint(tree)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "source", "contract"),
    [
        ("tandem/_planted.py", "import torch\n", "The SDK knows only its protocol"),
        ("tandem/_planted.py", "from models import zoo\n", "The SDK knows only its protocol"),
        ("cloud_hub/_planted.py", "from edge_agent import agent\n", "they meet on the wire"),
        ("partitioner/_planted.py", "import cloud_hub.router\n", "Layers import downwards only"),
        ("models/_planted.py", "def late():\n    import partitioner.cost\n", "Layers import downwards only"),
        ("models/_planted.py", "import models.runtime\n", "no import cycles"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tree: Path, module: str, source: str, contract: str) -> None:
    planted = tree / module
    if module == "models/_planted.py" and "runtime" in source:
        # a cycle needs both directions: runtime is imported by the planted module and imports it back
        (tree / "models/zoo.py").write_text((tree / "models/zoo.py").read_text() + "\nimport models._planted\n")
    planted.write_text(source)
    try:
        out = lint(tree)
    finally:
        planted.unlink()
        shutil.copy(ROOT / "models/zoo.py", tree / "models/zoo.py")
    assert out.returncode != 0
    broken = " ".join(out.stdout.split("Broken contracts", 1)[-1].split())  # long names wrap
    assert contract in broken, out.stdout


def test_the_request_path_may_not_import_the_fleet_page(tree: Path) -> None:
    router = tree / "cloud_hub/router.py"
    router.write_text(router.read_text() + "\nfrom cloud_hub.ui import views\n")
    try:
        out = lint(tree)
    finally:
        shutil.copy(ROOT / "cloud_hub/router.py", router)
    assert out.returncode != 0
    assert "never imports its fleet page" in out.stdout.split("Broken contracts", 1)[-1], out.stdout
