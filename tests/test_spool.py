"""The agent's telemetry spool: order, bound (drop-oldest), time-to-live, durability."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.spool import Spool


def test_fifo_order_and_ack(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    seqs = [spool.push(f"m{i}") for i in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert [p for _, p in spool.peek()] == ["m0", "m1", "m2", "m3", "m4"]
    spool.ack(seqs[2])
    assert [p for _, p in spool.peek()] == ["m3", "m4"]


def test_bound_drops_the_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_records=3)
    for i in range(7):
        spool.push(f"m{i}")
    assert [p for _, p in spool.peek()] == ["m4", "m5", "m6"]
    assert spool.dropped == 4 and len(spool) == 3


def test_ttl_expires_old_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", ttl_s=10)
    spool.push("old", now=100.0)
    spool.push("new", now=105.0)
    assert [p for _, p in spool.peek(now=112.0)] == ["new"]
    assert spool.dropped == 1


def test_survives_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    spool.push("kept")
    spool.close()
    assert [p for _, p in Spool(tmp_path / "s.db").peek()] == ["kept"]


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_records"):
        Spool(tmp_path / "s.db", max_records=0)
