"""A Mosquitto broker that the hub starts, configures and stops as a child process.

Devices talk to the hub over MQTT under `tandem/v1/devices/<device_id>/{telemetry,status,commands}`.
`ManagedBroker` owns everything Mosquitto reads: the config, a PBKDF2-SHA512 password file and an
ACL file in `BrokerConfig.data_dir`. The hub connects as a superuser (`hub_username`, with a password
drawn fresh at every `start()`); each device connects with its device id as username and may only
touch topics under its own id, which Mosquitto enforces with a `pattern ... %u` ACL line.

Device accounts live in the password file and survive a restart of the broker: the hub stores only
hashes of device credentials, so it could not re-add them itself.

Contract: `add_user`/`remove_user` return once the running broker has reloaded its files, so a
connect made afterwards sees the change. They block for about 0.1 s (a signal, then the broker's
next loop turn, seen in its log); call them through `asyncio.to_thread` from async code. Failures to
start, reload or find Mosquitto raise `BrokerError` with the tail of the broker's log; bad usernames
and passwords raise `ValueError`.
Passwords never reach a log, a command line or an error message.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cloud_hub.broker_files import (
    HUB_USERNAME,
    BrokerError,
    RunAs,
    give_to,
    hash_password,
    render_acl,
    run_as_owner,
    validate_username,
)

__all__ = ["BrokerConfig", "BrokerError", "ManagedBroker", "find_mosquitto"]

# Logged (at "information" level) by the broker's single-threaded main loop just before it re-reads
# its files; any packet it handles after writing the line is judged by the new files.
_RELOAD_MARK = b"Reloading config."
# Logged (at "notice" level) once every listener is bound. A TCP connect alone is no proof: another
# process may hold the port, and mosquitto then exits while our probe reaches that other process.
_RUNNING_RE = re.compile(rb"mosquitto version \S+ running")

_START_TIMEOUT_S = 10.0
_RELOAD_TIMEOUT_S = 5.0
_STOP_TIMEOUT_S = 5.0
_LOG_TAIL_LINES = 20


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary: PATH first, then the sbin directories Debian installs it in."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("mosquitto", path=search)


@dataclass(frozen=True)
class BrokerConfig:
    """Where the managed broker listens and keeps its files."""

    data_dir: Path
    """Directory for mosquitto.conf, the password and ACL files and mosquitto.log; created if absent."""
    host: str = "127.0.0.1"
    """Address the listener binds to."""
    port: int = 0
    """TCP port of the listener; 0 picks a free port at start()."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        # Both values are written into mosquitto.conf, where whitespace and newlines split lines and tokens.
        if not self.host or any(c.isspace() for c in self.host):
            raise ValueError(f"invalid broker host {self.host!r}")
        if "\n" in str(self.data_dir) or "\r" in str(self.data_dir):
            raise ValueError("broker data_dir must not contain newlines")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"broker port {self.port} is outside 0-65535")


class ManagedBroker:
    """One Mosquitto child process with password and ACL files; see the module docstring."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self._dir = config.data_dir
        self._conf = self._dir / "mosquitto.conf"
        self._passwd = self._dir / "passwd"
        self._acl = self._dir / "acl"
        self._log = self._dir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._hub_password: str | None = None
        self._run_as: RunAs | None = None
        self._lock = threading.Lock()  # serialises password-file rewrites and reloads

    # -- properties -------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        """The listener's actual port; BrokerError before start() when the config asked for port 0."""
        port = self._port if self._port is not None else self.config.port
        if port == 0:
            raise BrokerError("the broker's port is chosen at start(); it has not been started")
        return port

    @property
    def hub_username(self) -> str:
        return HUB_USERNAME

    @property
    def hub_password(self) -> str:
        """The hub superuser's password (kept across restarts of this instance); BrokerError before start()."""
        if self._hub_password is None:
            raise BrokerError("the hub password is drawn at start(); the broker has not been started")
        return self._hub_password

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self._log

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Write the files, spawn mosquitto and wait until it accepts TCP connections.

        Raises BrokerError when mosquitto is missing, exits early or does not listen within 10 s.
        """
        if self.running:
            raise BrokerError("broker already running")
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto not found (Debian: apt-get install mosquitto)")
        self._dir.mkdir(parents=True, exist_ok=True)
        self._run_as = run_as_owner(self._dir)
        # A restart of the same ManagedBroker keeps its port and hub password, so clients that are
        # already configured (the hub's ingest, the agents) reconnect by themselves.
        self._port = self._port or self.config.port or _free_port(self.config.host)
        self._hub_password = self._hub_password or secrets.token_urlsafe(32)
        with self._lock:
            self._write_passwd({**self._read_passwd(), HUB_USERNAME: hash_password(self._hub_password)})
        self._write_private(self._acl, render_acl())
        self._write_private(self._conf, self._render_conf())
        log_offset = _size(self._log)  # the log is appended across runs; judge this run's lines only
        self._spawn(binary)
        self._wait_listening(log_offset)

    def stop(self) -> None:
        """SIGTERM, wait up to 5 s, then SIGKILL. Safe to call twice or before start()."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> ManagedBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- accounts ---------------------------------------------------------------------------------

    def add_user(self, username: str, password: str) -> None:
        """Create or replace a device account; a running broker has reloaded when this returns.

        A stopped broker picks the change up at its next start().

        ValueError for an invalid username, the hub's own name or an empty password; BrokerError if
        the reload is not seen within 5 s.
        """
        self._check_device_name(username)
        entry = hash_password(password)
        with self._lock:
            self._write_passwd({**self._read_passwd(), username: entry})
            self._reload()

    def remove_user(self, username: str) -> bool:
        """Delete a device account (False if it did not exist); reloads a running broker as add_user does.

        Mosquitto re-checks connected clients on reload, so a removed device's open session is closed too.
        """
        self._check_device_name(username)
        with self._lock:
            users = self._read_passwd()
            if users.pop(username, None) is None:
                return False
            self._write_passwd(users)
            self._reload()
        return True

    def usernames(self) -> list[str]:
        """Device usernames in the password file (the hub account excluded), sorted."""
        return sorted(name for name in self._read_passwd() if name != HUB_USERNAME)

    # -- internals --------------------------------------------------------------------------------

    @staticmethod
    def _check_device_name(username: str) -> None:
        validate_username(username)
        if username == HUB_USERNAME:
            raise ValueError(f"{HUB_USERNAME!r} is the hub's own account and cannot be a device")

    def _render_conf(self) -> str:
        assert self._run_as is not None and self._port is not None
        lines = [
            "# Written by cloud_hub.broker at every start(); edits are lost.",
            "per_listener_settings false",
            f"listener {self._port} {self.config.host}",
            "allow_anonymous false",
            f"password_file {self._passwd}",
            f"acl_file {self._acl}",
            # Sessions and retained messages are not kept across restarts: the hub restarts the broker
            # with itself and devices re-announce their status when they reconnect.
            "persistence false",
            f"log_dest file {self._log}",
            # "information" carries the reload marker that add_user/remove_user wait for.
            *(f"log_type {kind}" for kind in ("error", "warning", "notice", "information")),
            "connection_messages true",
        ]
        if self._run_as.name is not None:
            lines.append(f"user {self._run_as.name}")
        return "\n".join(lines) + "\n"

    def _read_passwd(self) -> dict[str, str]:
        if not self._passwd.exists():
            return {}
        users = {}
        for line in self._passwd.read_text().splitlines():
            name, sep, entry = line.partition(":")
            if sep and name:
                users[name] = entry
        return users

    def _write_passwd(self, users: dict[str, str]) -> None:
        self._write_private(self._passwd, "".join(f"{name}:{entry}\n" for name, entry in users.items()))

    def _write_private(self, path: Path, text: str) -> None:
        """Atomically replace `path` with a 0600 file owned by the account the broker runs as."""
        self._dir.mkdir(parents=True, exist_ok=True)
        run_as = self._run_as or run_as_owner(self._dir)  # add_user before the first start()
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        give_to(tmp, run_as)
        os.replace(tmp, path)

    def _spawn(self, binary: str) -> None:
        assert self._run_as is not None
        # Our handle on the log also takes mosquitto's stderr, where it reports errors that come before
        # its own logging is set up (a bad config line, a port in use): one file holds the whole story.
        fd = os.open(self._log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        give_to(self._log, self._run_as)
        with os.fdopen(fd, "ab") as log:
            self._proc = subprocess.Popen(
                [binary, "-c", str(self._conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    def _wait_listening(self, log_offset: int) -> None:
        assert self._proc is not None and self._port is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise BrokerError(f"mosquitto exited with status {code} while starting{self._diagnosis()}")
            if _RUNNING_RE.search(_read_from(self._log, log_offset)) and _accepts(self.config.host, self._port):
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(
            f"mosquitto did not listen on port {self._port} within {_START_TIMEOUT_S} s{self._diagnosis()}"
        )

    def _reload(self) -> None:
        """SIGHUP the broker (if running) and wait for it to log that it is re-reading its files."""
        if not self.running:
            return
        assert self._proc is not None
        offset = _size(self._log)
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + _RELOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            if _RELOAD_MARK in _read_from(self._log, offset):
                return
            time.sleep(0.01)
        raise BrokerError(f"mosquitto did not reload within {_RELOAD_TIMEOUT_S} s{self._diagnosis()}")

    def _diagnosis(self) -> str:
        hint = ""
        if self._run_as is not None and self._run_as.name not in (None, "root"):
            hint = (
                f"\n(mosquitto runs as {self._run_as.name!r}, the owner of {self._dir}: "
                "every parent directory must be searchable by that account)"
            )
        return f"{hint}\nlast lines of {self._log}:\n{_tail(self._log)}"


# -- helpers --------------------------------------------------------------------------------------


def _free_port(host: str) -> int:
    # The port is released before mosquitto binds it, so another process could take it in between;
    # mosquitto then exits with "Address already in use", which start() reports.
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read()


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(log empty)"
