"""Write one benchmark's section of docs/benchmarks.md, between its own markers, keeping the rest."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def command_line() -> str:
    """The command that produced the figures, as it was typed (relative script path)."""
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def write_block(name: str, body: str, doc: Path = DOC) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` (append if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def emit(summary: dict, as_json: bool, write_docs: Callable[[dict, str], None] | None) -> None:
    """A benchmark's ending: its docs section when asked (`write_docs(summary, command)`), then its
    headline figures, one JSON line with --json, else indented."""
    if write_docs is not None:
        write_docs(summary, command_line())
    print(json.dumps(summary) if as_json else json.dumps(summary, indent=1))


def model_section(name: str, model: str) -> str:
    """A benchmark's docs section for `model`: SmolLM2's keeps the plain name it was first written
    under, any other model gets `<name>-<model>`."""
    return name if model == "smollm2-135m-instruct" else f"{name}-{model}"
