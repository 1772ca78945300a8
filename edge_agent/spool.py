"""A bounded on-disk spool for telemetry the agent could not send yet.

SQLite holds the queue, so a crash loses nothing that was spooled and a half-written record cannot
exist. `push` appends and drops the oldest records beyond `max_records`; `peek` returns records in
order, skipping and deleting those older than `ttl_s`; `ack` deletes what was delivered. Sequence
numbers are the spool's own, strictly increasing: receivers can check order and gaps.

The spool sits in the agent's state directory beside its credential: the directory is made (or
tightened to) 0700, the database and its -wal and -shm files 0600. SQLite gives -wal and -shm the
database's mode, so the database is made 0600 before SQLite opens it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from tandem.files import private_dir, private_file


class Spool:
    def __init__(self, path: Path, max_records: int = 10_000, ttl_s: float = 24 * 3600) -> None:
        if max_records < 1 or ttl_s <= 0:
            raise ValueError("spool needs max_records >= 1 and ttl_s > 0")
        self.max_records, self.ttl_s = max_records, ttl_s
        self.dropped = 0  # records dropped for the bound or the TTL, for telemetry about telemetry
        self._db = _connect_private(path)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, payload TEXT)"
            )

    def push(self, payload: str, now: float | None = None) -> int:
        """Append; returns the record's sequence number."""
        with self._lock:
            seq = self._db.execute(
                "INSERT INTO spool (at, payload) VALUES (?, ?)", (now or time.time(), payload)
            ).lastrowid
            over = self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0] - self.max_records
            if over > 0:
                self._db.execute("DELETE FROM spool WHERE seq IN (SELECT seq FROM spool ORDER BY seq LIMIT ?)", (over,))
                self.dropped += over
            return int(seq)

    def peek(self, limit: int = 500, now: float | None = None) -> list[tuple[int, str]]:
        """The oldest unexpired records, in order (expired ones are deleted on the way)."""
        with self._lock:
            cutoff = (now or time.time()) - self.ttl_s
            self.dropped += self._db.execute("DELETE FROM spool WHERE at < ?", (cutoff,)).rowcount
            return self._db.execute("SELECT seq, payload FROM spool ORDER BY seq LIMIT ?", (limit,)).fetchall()

    def ack(self, seq: int) -> None:
        """Delete records up to and including seq (delivered in order)."""
        with self._lock:
            self._db.execute("DELETE FROM spool WHERE seq <= ?", (seq,))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _connect_private(path: Path) -> sqlite3.Connection:
    """Connect to the spool at `path`, its directory 0700 and its files 0600 (see the module docstring)."""
    private_dir(path.parent)
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        private_file(f, create=f == path)
    return sqlite3.connect(path, check_same_thread=False, isolation_level=None)
