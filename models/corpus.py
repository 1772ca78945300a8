"""Real English text for calibration and evaluation: Debian's python3.11-doc sources.

The split is fixed and written down here: documents are the `_sources/**/*.rst.txt` files, sorted
by path relative to `_sources`; a document is for *evaluation* when the first byte of the SHA-256
of its relative path is below 64 (about a quarter), otherwise for *calibration*. The two sets never
share a document, and the split does not change when files are added or removed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
EVAL_THRESHOLD = 64  # out of 256


@dataclass(frozen=True)
class Document:
    name: str
    """Path relative to the corpus root, e.g. "library/os.rst.txt"."""
    text: str


def split_of(name: str) -> str:
    """ "eval" or "calibration" for a relative document path."""
    return "eval" if hashlib.sha256(name.encode()).digest()[0] < EVAL_THRESHOLD else "calibration"


def documents(split: str, root: Path = DOC_ROOT, limit: int | None = None, min_chars: int = 200) -> list[Document]:
    """Documents of one split ("eval" or "calibration"), sorted by name, skipping tiny ones.

    Raises FileNotFoundError naming the Debian package when the corpus is not installed.
    """
    if split not in ("eval", "calibration"):
        raise ValueError(f"split must be 'eval' or 'calibration', got {split!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: install the Debian package python3.11-doc")
    out = []
    for path in sorted(root.rglob("*.rst.txt")):
        name = path.relative_to(root).as_posix()
        if split_of(name) != split:
            continue
        text = path.read_text(encoding="utf-8")
        if len(text) >= min_chars:
            out.append(Document(name, text))
        if limit is not None and len(out) >= limit:
            break
    return out
