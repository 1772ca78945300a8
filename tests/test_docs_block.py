"""Benchmarks rewrite only their own section of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

from benchmarks.docs_block import write_block


def test_block_is_replaced_in_place_and_the_rest_kept(tmp_path: Path) -> None:
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\nhand-written intro\n")
    write_block("a", "first A", doc)
    write_block("b", "only B", doc)
    write_block("a", "second A", doc)
    text = doc.read_text()
    assert text.count("<!-- a:start -->") == 1 and "second A" in text and "first A" not in text
    assert text.index("hand-written intro") < text.index("second A") < text.index("only B")
