"""The SQLite registry store: devices, one-time tokens, API keys, persistence."""

from __future__ import annotations

import threading
from pathlib import Path

from cloud_hub import auth
from cloud_hub.store import DeviceRecord, SQLiteStore


def test_devices_round_trip_and_survive_reopen(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    rec = DeviceRecord("dev-1", "pi", "raspberry-pi-5", auth.hash_secret("s"), ({"name": "m", "n_layers": 2},), True)
    store.add_device(rec)
    store.set_status("dev-1", "online", 123.0)
    store.close()
    again = SQLiteStore(tmp_path / "r.db")
    got = again.get_device("dev-1")
    assert got is not None
    assert (got.name, got.profile, got.models, got.emulated, got.status, got.last_seen) == (
        "pi", "raspberry-pi-5", ({"name": "m", "n_layers": 2},), True, "online", 123.0)  # fmt: skip
    assert auth.check_secret("s", got.credential_hash) and not auth.check_secret("t", got.credential_hash)
    assert [d.device_id for d in again.list_devices()] == ["dev-1"]
    assert again.remove_device("dev-1") and not again.remove_device("dev-1")
    assert again.get_device("dev-1") is None


def test_tokens_are_one_time_and_expire(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    store.add_token("a", expires_at=100.0)
    assert store.consume_token("nope", now=50.0) == "unknown"
    assert store.consume_token("a", now=150.0) == "expired"
    store.add_token("b", expires_at=100.0)
    assert store.consume_token("b", now=50.0) == "ok"
    assert store.consume_token("b", now=51.0) == "used"


def test_a_token_is_claimed_once_under_concurrency(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    store.add_token("t", expires_at=1e12)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(store.consume_token("t", 1.0))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] + ["used"] * 15


def test_api_keys_are_stored_hashed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    key = auth.new_secret("api_key")
    store.add_api_key(auth.lookup_key(key), "ci")
    assert store.has_api_key(auth.lookup_key(key))
    assert not store.has_api_key(auth.lookup_key(key + "x"))
    store.close()
    assert key.encode() not in (tmp_path / "r.db").read_bytes()
