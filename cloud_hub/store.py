"""The hub's persistent registry: devices, enrollment tokens, API keys.

Two small interfaces (`DeviceStore`, `SecretStore`); `SQLiteStore` implements both and is the
default. Secrets are stored only as hashes (see cloud_hub.auth). Calls are synchronous and short
(one indexed statement each), so the asyncio servers call them directly.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    """Hub-assigned id, also the device's MQTT username."""
    name: str
    """Human-readable name the agent gave."""
    profile: str
    """Device profile name (device_profiles/)."""
    credential_hash: str
    """Salted hash of the device credential."""
    models: tuple[dict, ...] = field(default_factory=tuple)
    """Models the device serves: dicts with name, arch, n_layers, quant, weight_bytes."""
    emulated: bool = False
    """Paced to its profile's predicted speed rather than really that device."""
    status: str = "offline"
    """online | offline, from the MQTT status topic and the work channel."""
    last_seen: float = 0.0
    """Unix time of the last telemetry, status or work-channel message."""
    created: float = 0.0
    """Unix time of enrollment."""


class DeviceStore(ABC):
    @abstractmethod
    def add_device(self, record: DeviceRecord) -> None: ...

    @abstractmethod
    def get_device(self, device_id: str) -> DeviceRecord | None: ...

    @abstractmethod
    def list_devices(self) -> list[DeviceRecord]: ...

    @abstractmethod
    def set_status(self, device_id: str, status: str, last_seen: float) -> None: ...

    @abstractmethod
    def remove_device(self, device_id: str) -> bool: ...


class SecretStore(ABC):
    @abstractmethod
    def add_token(self, lookup: str, expires_at: float) -> None: ...

    @abstractmethod
    def consume_token(self, lookup: str, now: float) -> str:
        """Mark the token used. Returns "ok", or why not: "unknown", "expired", "used"."""

    @abstractmethod
    def add_api_key(self, lookup: str, name: str) -> None: ...

    @abstractmethod
    def has_api_key(self, lookup: str) -> bool: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, name TEXT NOT NULL, profile TEXT NOT NULL, credential_hash TEXT NOT NULL,
    models TEXT NOT NULL, emulated INTEGER NOT NULL, status TEXT NOT NULL, last_seen REAL NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS enrollment_tokens (lookup TEXT PRIMARY KEY, expires_at REAL NOT NULL, used_at REAL);
CREATE TABLE IF NOT EXISTS api_keys (lookup TEXT PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL);
"""


class SQLiteStore(DeviceStore, SecretStore):
    """SQLite in WAL mode; safe to share between the hub's threads (one connection, one lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- devices ---------------------------------------------------------------------------------

    def add_device(self, record: DeviceRecord) -> None:
        r = replace(record, created=record.created or time.time())
        self._run(
            "INSERT INTO devices VALUES (?,?,?,?,?,?,?,?,?)",
            (
                r.device_id,
                r.name,
                r.profile,
                r.credential_hash,
                json.dumps(list(r.models)),
                int(r.emulated),
                r.status,
                r.last_seen,
                r.created,
            ),
        )

    def get_device(self, device_id: str) -> DeviceRecord | None:
        rows = self._run("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        return _device(rows[0]) if rows else None

    def list_devices(self) -> list[DeviceRecord]:
        return [_device(row) for row in self._run("SELECT * FROM devices ORDER BY created, device_id")]

    def set_status(self, device_id: str, status: str, last_seen: float) -> None:
        self._run("UPDATE devices SET status = ?, last_seen = ? WHERE device_id = ?", (status, last_seen, device_id))

    def remove_device(self, device_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,)).rowcount > 0

    # -- secrets ---------------------------------------------------------------------------------

    def add_token(self, lookup: str, expires_at: float) -> None:
        self._run("INSERT INTO enrollment_tokens VALUES (?, ?, NULL)", (lookup, expires_at))

    def consume_token(self, lookup: str, now: float) -> str:
        with self._lock:
            row = self._db.execute(
                "SELECT expires_at, used_at FROM enrollment_tokens WHERE lookup = ?", (lookup,)
            ).fetchone()
            if row is None:
                return "unknown"
            if row[1] is not None:
                return "used"
            if row[0] < now:
                return "expired"
            # The WHERE clause makes the claim atomic: of two racing enrollments, one updates 0 rows.
            claimed = self._db.execute(
                "UPDATE enrollment_tokens SET used_at = ? WHERE lookup = ? AND used_at IS NULL", (now, lookup)
            ).rowcount
            return "ok" if claimed else "used"

    def add_api_key(self, lookup: str, name: str) -> None:
        self._run("INSERT INTO api_keys VALUES (?, ?, ?)", (lookup, name, time.time()))

    def has_api_key(self, lookup: str) -> bool:
        return bool(self._run("SELECT 1 FROM api_keys WHERE lookup = ?", (lookup,)))


def _device(row: tuple) -> DeviceRecord:
    device_id, name, profile, cred, models, emulated, status, last_seen, created = row
    return DeviceRecord(
        device_id, name, profile, cred, tuple(json.loads(models)), bool(emulated), status, last_seen, created
    )
