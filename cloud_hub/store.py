"""The hub's persistent registry: devices, enrollment tokens, API keys.

Two small interfaces (`DeviceStore`, `SecretStore`); `SQLStore` implements both over DB-API, with
two dialects: `SQLiteStore` (the default) and `PostgresStore` (hub replicas sharing one database).
Secrets are stored only as hashes (see cloud_hub.auth). Calls are synchronous and short (one
indexed statement each), so the asyncio servers call them directly.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path

from tandem.files import private_dir, private_file


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


@dataclass(frozen=True)
class UpdateRecord:
    """One over-the-air update command (cloud_hub.updates) and how it ended."""

    command_id: str
    """Hub-assigned id; the device fetches the bundle by it."""
    device_id: str
    """The device it was sent to: the only one that may fetch its bundle."""
    model: str
    """Zoo name (or GGUF path) the device is to serve."""
    quant: str
    """Precision of the bundle: fp32, int8 or int4."""
    version: str
    """SHA-256 of the bundle's manifest.json: the new model's ModelInfo.version."""
    bundle: str
    """Where the hub keeps the bundle directory."""
    status: str = "pending"
    """pending | ok | failed."""
    message: str = ""
    """What the device reported (why it failed, or what it serves now)."""
    created: float = 0.0
    """Unix time the command was issued."""

    def summary(self) -> str:
        """As ListDevices shows it: "<command_id> <status>: <message>"."""
        return f"{self.command_id} {self.status}: {self.message}"


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

    @abstractmethod
    def set_models(self, device_id: str, models: tuple[dict, ...]) -> None:
        """What the device serves now (its latest Hello), replacing what it enrolled with."""


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


class CalibrationStore(ABC):
    """What the hub has learnt of each device's speed (cloud_hub.calibrations), as opaque JSON."""

    @abstractmethod
    def save_calibration(self, device_id: str, model: str, state: str) -> None: ...

    @abstractmethod
    def load_calibration(self, device_id: str, model: str) -> str | None: ...


class UpdateStore(ABC):
    """Over-the-air update commands and the agent versions devices report (cloud_hub.updates)."""

    @abstractmethod
    def add_update(self, record: UpdateRecord) -> None: ...

    @abstractmethod
    def get_update(self, command_id: str) -> UpdateRecord | None: ...

    @abstractmethod
    def finish_update(self, command_id: str, device_id: str, status: str, message: str) -> bool:
        """Record a pending command's outcome; False when no pending command of that id is the device's."""

    @abstractmethod
    def latest_updates(self) -> dict[str, UpdateRecord]:
        """Each device's most recent command, by device id."""

    @abstractmethod
    def set_agent_version(self, device_id: str, version: str) -> None: ...

    @abstractmethod
    def agent_versions(self) -> dict[str, str]:
        """What each device's agent reported at its last connect, by device id."""


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, name TEXT NOT NULL, profile TEXT NOT NULL,"
    " credential_hash TEXT NOT NULL, models TEXT NOT NULL, emulated INTEGER NOT NULL, status TEXT NOT NULL,"
    " last_seen {real} NOT NULL, created {real} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS enrollment_tokens (lookup TEXT PRIMARY KEY, expires_at {real} NOT NULL,"
    " used_at {real})",
    "CREATE TABLE IF NOT EXISTS api_keys (lookup TEXT PRIMARY KEY, name TEXT NOT NULL, created {real} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS calibrations (device_id TEXT NOT NULL, model TEXT NOT NULL, state TEXT NOT NULL,"
    " updated {real} NOT NULL, PRIMARY KEY (device_id, model))",
    # Over-the-air updates (added with them): new tables rather than new columns of `devices`, so a
    # registry made before them gains them by the same CREATE ... IF NOT EXISTS, in both dialects.
    "CREATE TABLE IF NOT EXISTS updates (command_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, model TEXT NOT NULL,"
    " quant TEXT NOT NULL, version TEXT NOT NULL, bundle TEXT NOT NULL, status TEXT NOT NULL, message TEXT NOT NULL,"
    " created {real} NOT NULL)",
    "CREATE INDEX IF NOT EXISTS updates_by_device ON updates (device_id, created)",
    "CREATE TABLE IF NOT EXISTS agent_versions (device_id TEXT PRIMARY KEY, version TEXT NOT NULL,"
    " updated {real} NOT NULL)",
)


class SQLStore(DeviceStore, SecretStore, CalibrationStore, UpdateStore):
    """Both interfaces over one DB-API connection in autocommit mode, guarded by a lock.

    Subclasses open the connection and name their dialect: the placeholder and the float type.
    Statements are written once, with `?` placeholders, and translated here.
    """

    placeholder = "?"
    real_type = "REAL"

    def __init__(self, conn: object) -> None:
        self._db = conn
        self._lock = threading.Lock()
        for statement in _SCHEMA:
            self._exec(statement.format(real=self.real_type))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> object:
        with self._lock:
            return self._db.execute(sql.replace("?", self.placeholder), args)

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql.replace("?", self.placeholder), args).fetchall()

    def _count(self, sql: str, args: tuple) -> int:
        """Rows changed by one statement."""
        with self._lock:
            return self._db.execute(sql.replace("?", self.placeholder), args).rowcount

    # -- devices ---------------------------------------------------------------------------------

    def add_device(self, record: DeviceRecord) -> None:
        r = replace(record, created=record.created or time.time())
        self._exec(
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
        self._exec("UPDATE devices SET status = ?, last_seen = ? WHERE device_id = ?", (status, last_seen, device_id))

    def remove_device(self, device_id: str) -> bool:
        self._exec("DELETE FROM calibrations WHERE device_id = ?", (device_id,))
        self._exec("DELETE FROM updates WHERE device_id = ?", (device_id,))
        self._exec("DELETE FROM agent_versions WHERE device_id = ?", (device_id,))
        return self._count("DELETE FROM devices WHERE device_id = ?", (device_id,)) > 0

    def set_models(self, device_id: str, models: tuple[dict, ...]) -> None:
        self._exec("UPDATE devices SET models = ? WHERE device_id = ?", (json.dumps(list(models)), device_id))

    # -- secrets ---------------------------------------------------------------------------------

    def add_token(self, lookup: str, expires_at: float) -> None:
        self._exec("INSERT INTO enrollment_tokens VALUES (?, ?, NULL)", (lookup, expires_at))

    def consume_token(self, lookup: str, now: float) -> str:
        # One conditional UPDATE claims the token atomically, also across hub replicas sharing the
        # database: of two racing enrollments, one changes a row and the other none.
        claimed = self._count(
            "UPDATE enrollment_tokens SET used_at = ? WHERE lookup = ? AND used_at IS NULL AND expires_at >= ?",
            (now, lookup, now),
        )
        if claimed:
            return "ok"
        rows = self._run("SELECT expires_at, used_at FROM enrollment_tokens WHERE lookup = ?", (lookup,))
        if not rows:
            return "unknown"
        return "used" if rows[0][1] is not None else "expired"

    def add_api_key(self, lookup: str, name: str) -> None:
        self._exec("INSERT INTO api_keys VALUES (?, ?, ?)", (lookup, name, time.time()))

    def has_api_key(self, lookup: str) -> bool:
        return bool(self._run("SELECT 1 FROM api_keys WHERE lookup = ?", (lookup,)))

    # -- calibrations ---------------------------------------------------------------------------

    def save_calibration(self, device_id: str, model: str, state: str) -> None:
        self._exec(
            "INSERT INTO calibrations VALUES (?,?,?,?) ON CONFLICT (device_id, model)"
            " DO UPDATE SET state = excluded.state, updated = excluded.updated",
            (device_id, model, state, time.time()),
        )

    def load_calibration(self, device_id: str, model: str) -> str | None:
        rows = self._run("SELECT state FROM calibrations WHERE device_id = ? AND model = ?", (device_id, model))
        return rows[0][0] if rows else None

    # -- over-the-air updates ------------------------------------------------------------------

    def add_update(self, record: UpdateRecord) -> None:
        r = replace(record, created=record.created or time.time())
        self._exec(
            "INSERT INTO updates VALUES (?,?,?,?,?,?,?,?,?)",
            (r.command_id, r.device_id, r.model, r.quant, r.version, r.bundle, r.status, r.message, r.created),
        )

    def get_update(self, command_id: str) -> UpdateRecord | None:
        rows = self._run("SELECT * FROM updates WHERE command_id = ?", (command_id,))
        return UpdateRecord(*rows[0]) if rows else None

    def finish_update(self, command_id: str, device_id: str, status: str, message: str) -> bool:
        # Conditional, as consume_token: a late or repeated result never overwrites the first outcome.
        return (
            self._count(
                "UPDATE updates SET status = ?, message = ? WHERE command_id = ? AND device_id = ?"
                " AND status = 'pending'",
                (status, message, command_id, device_id),
            )
            > 0
        )

    def latest_updates(self) -> dict[str, UpdateRecord]:
        rows = self._run(
            "SELECT * FROM updates u WHERE created = (SELECT MAX(created) FROM updates WHERE device_id = u.device_id)"
            " ORDER BY created, command_id"
        )
        return {row[1]: UpdateRecord(*row) for row in rows}  # of two at the same instant, the later id wins

    def set_agent_version(self, device_id: str, version: str) -> None:
        self._exec(
            "INSERT INTO agent_versions VALUES (?,?,?) ON CONFLICT (device_id)"
            " DO UPDATE SET version = excluded.version, updated = excluded.updated",
            (device_id, version, time.time()),
        )

    def agent_versions(self) -> dict[str, str]:
        return dict(self._run("SELECT device_id, version FROM agent_versions"))


class SQLiteStore(SQLStore):
    """The default: one file, WAL mode; safe to share between the hub's threads.

    The database holds credential hashes: it and its -wal and -shm files are the owner's only (0600),
    tightened when an earlier version left them readable. SQLite creates -wal and -shm with the
    database's own mode, so the database is made 0600 before SQLite opens it. A directory made for
    it is 0700; an existing one is the operator's (see `open_store` for the hub's data directory).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for p in self.files():
            private_file(p, create=p == self.path)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        super().__init__(conn)

    def files(self) -> tuple[Path, ...]:
        """The database and its write-ahead log and shared-memory index."""
        return (self.path, self.path.with_name(self.path.name + "-wal"), self.path.with_name(self.path.name + "-shm"))


class PostgresStore(SQLStore):
    """PostgreSQL (psycopg 3), for several hub replicas sharing one registry."""

    placeholder = "%s"
    real_type = "DOUBLE PRECISION"

    def __init__(self, url: str) -> None:
        import psycopg

        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise ConnectionError(f"cannot reach PostgreSQL at {_redact_url(url)}: {exc}") from exc
        super().__init__(conn)


def _redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_store(url: str, data_dir: Path) -> SQLStore:
    """A store from a URL: "sqlite" (default file in data_dir), "sqlite:///path" or "postgresql://…".

    The default keeps the hub's state in data_dir, which is made (or tightened to) 0700."""
    if url in ("", "sqlite"):
        private_dir(data_dir)
        return SQLiteStore(data_dir / "registry.db")
    if url.startswith("sqlite:///"):
        return SQLiteStore(url[len("sqlite:///") - 1 :])
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    raise ValueError(f"unsupported registry URL {_redact_url(url)!r}: use sqlite:///path or postgresql://…")


def _device(row: tuple) -> DeviceRecord:
    device_id, name, profile, cred, models, emulated, status, last_seen, created = row
    return DeviceRecord(
        device_id, name, profile, cred, tuple(json.loads(models)), bool(emulated), status, last_seen, created
    )
