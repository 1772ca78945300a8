"""The registry store suite, run against SQLite and a real PostgreSQL server alike."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_hub import auth
from cloud_hub.store import DeviceRecord, PostgresStore, SQLiteStore, SQLStore
from tests.pg import fresh_database

Opener = Callable[[], SQLStore]  # opens (or re-opens) the same database


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    if request.param == "sqlite":
        return lambda: SQLiteStore(tmp_path / "r.db")
    url = fresh_database(request.getfixturevalue("pg_server"))
    return lambda: PostgresStore(url)


def test_devices_round_trip_and_survive_reopen(open_store: Opener) -> None:
    store = open_store()
    rec = DeviceRecord("dev-1", "pi", "raspberry-pi-5", auth.hash_secret("s"), ({"name": "m", "n_layers": 2},), True)
    store.add_device(rec)
    store.set_status("dev-1", "online", 123.0)
    store.close()
    again = open_store()
    got = again.get_device("dev-1")
    assert got is not None
    assert (got.name, got.profile, got.models, got.emulated, got.status, got.last_seen) == (
        "pi",
        "raspberry-pi-5",
        ({"name": "m", "n_layers": 2},),
        True,
        "online",
        123.0,
    )
    assert auth.check_secret("s", got.credential_hash) and not auth.check_secret("t", got.credential_hash)
    assert [d.device_id for d in again.list_devices()] == ["dev-1"]
    assert again.remove_device("dev-1") and not again.remove_device("dev-1")
    assert again.get_device("dev-1") is None


def test_tokens_are_one_time_and_expire(open_store: Opener) -> None:
    store = open_store()
    store.add_token("a", expires_at=100.0)
    assert store.consume_token("nope", now=50.0) == "unknown"
    assert store.consume_token("a", now=150.0) == "expired"
    store.add_token("b", expires_at=100.0)
    assert store.consume_token("b", now=50.0) == "ok"
    assert store.consume_token("b", now=51.0) == "used"


def test_a_token_is_claimed_once_under_concurrency(open_store: Opener) -> None:
    """16 claims at once through 4 connections (4 hub replicas): exactly one wins."""
    stores = [open_store() for _ in range(4)]
    stores[0].add_token("t", expires_at=1e12)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(stores[i % 4].consume_token("t", 1.0))) for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] + ["used"] * 15


def test_api_keys_are_stored_hashed(open_store: Opener, tmp_path: Path) -> None:
    store = open_store()
    key = auth.new_secret("api_key")
    store.add_api_key(auth.lookup_key(key), "ci")
    assert store.has_api_key(auth.lookup_key(key))
    assert not store.has_api_key(auth.lookup_key(key + "x"))
    assert [row[0] for row in store._run("SELECT lookup FROM api_keys")] == [auth.lookup_key(key)]
    store.close()
    if (tmp_path / "r.db").exists():
        assert key.encode() not in (tmp_path / "r.db").read_bytes()


def test_duplicate_device_id_is_refused(open_store: Opener) -> None:
    store = open_store()
    rec = DeviceRecord("dev-1", "a", "cpu-2core", auth.hash_secret("s"))
    store.add_device(rec)
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        store.add_device(rec)
    assert len(store.list_devices()) == 1
