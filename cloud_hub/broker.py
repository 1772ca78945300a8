"""A Mosquitto broker that the hub starts, configures and stops as a child process.

Devices talk to the hub over MQTT under `tandem/v1/devices/<device_id>/{telemetry,status,commands}`.
`ManagedBroker` owns everything Mosquitto reads: the config, a PBKDF2-SHA512 password file and an
ACL file in `BrokerConfig.data_dir`. The hub connects as a superuser (`hub_username`, with a password
drawn fresh at every `start()`); each device connects with its device id as username and may only
touch topics under its own id, which Mosquitto enforces with a `pattern ... %u` ACL line.

With `BrokerConfig.tls` the broker also has a TLS listener for devices on other machines: a client
must present a certificate from the deployment's CA and still log in with its own account (the ACL
above holds there too); the plaintext listener then binds loopback only, for the hub's own ingest.
Its port is kept in `data_dir/tls-port` as the plaintext one is in `data_dir/port`.

Device accounts live in the password file and survive a restart of the broker: the hub stores only
hashes of device credentials, so it could not re-add them itself.

Contract: `add_user`/`remove_user` return once the running broker has reloaded its files, so a
connect made afterwards sees the change. They block for about 0.1 s (a signal, then the broker's
next loop turn, seen in its log); call them through `asyncio.to_thread` from async code. Failures to
start, reload or find Mosquitto raise `BrokerError` with the tail of the broker's log; bad usernames
and passwords raise `ValueError`.
Passwords never reach a log, a command line or an error message.

Lifetime. The broker lives no longer than the process that started it, and keeps its address across
restarts of the hub:
- Its port is saved in `data_dir/port` and reused by the next `start()` on the same directory when it
  is free, so agents that saved it reach the next hub's broker without being told.
- The child gets PR_SET_PDEATHSIG (SIGTERM, Linux). Linux sends it when the *thread* that forked the
  child ends, so the fork happens on a keeper thread that then waits for the child: the signal comes
  when the hub's process dies, SIGKILL included. Run as root, the hub drops the child to the data
  directory's owner before the exec, not mosquitto itself: a set-uid inside mosquitto would clear the
  death signal.
- Its pid is written to `data_dir/mosquitto.pid`; `start()` first ends a broker left running on the
  same directory (where no death signal reached it: another OS, an older hub). Only a process whose
  command line is `mosquitto -c <this data_dir's mosquitto.conf>` is signalled, never another pid.
- `start(hold_devices=True)` admits the hub's own account only, until `admit_devices()`: the hub
  subscribes first, so no device message reaches a broker that nobody reads yet.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cloud_hub.broker_files import (
    HUB_USERNAME,
    TLS_FILES,
    BrokerError,
    BrokerTls,
    RunAs,
    StartCrash,
    give_to,
    hash_password,
    is_loopback,
    popen_account,
    render_acl,
    render_passwd,
    render_tls_listener,
    run_as_owner,
    validate_username,
)
from cloud_hub.broker_process import (
    accepts,
    bindable,
    file_size,
    free_port,
    is_broker_of,
    log_tail,
    read_from,
    read_int,
    signal_broker,
    spawn_tied,
    wait_gone,
)
from tandem.files import private_dir, private_file

__all__ = ["BrokerConfig", "BrokerError", "BrokerTls", "ManagedBroker", "find_mosquitto"]

log = logging.getLogger("tandem.hub.broker")

# Logged (at "information" level) by the broker's single-threaded main loop just before it re-reads
# its files; any packet it handles after writing the line is judged by the new files.
_RELOAD_MARK = b"Reloading config."
# Logged (at "notice" level) once every listener is bound. A TCP connect alone is no proof: another
# process may hold the port, and mosquitto then exits while our probe reaches that other process.
_RUNNING_RE = re.compile(rb"mosquitto version \S+ running")

_START_TIMEOUT_S = 10.0
_RELOAD_TIMEOUT_S = 5.0
_STOP_TIMEOUT_S = 5.0


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
    """TCP port of the listener; 0 reuses the port saved in data_dir when it is free, else picks a free one."""
    tls: BrokerTls | None = None
    """A TLS listener for devices (client certificates from the deployment's CA); None: plaintext only."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        # Devices' passwords must not cross a network in the clear: beside a TLS listener, the
        # plaintext one is for this machine (the hub's own ingest) only.
        if self.tls is not None and not is_loopback(self.host):
            raise ValueError(f"with a TLS listener the plaintext one must bind loopback, not {self.host!r}")
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
        # Absolute: the config path is how start() recognises a broker left running on this directory.
        self._dir = Path(os.path.abspath(config.data_dir))
        self._conf = self._dir / "mosquitto.conf"
        self._passwd = self._dir / "passwd"  # every account: the hub's and the devices'
        self._active = self._dir / "passwd.active"  # the accounts the broker admits now (see hold_devices)
        self._acl = self._dir / "acl"
        self._log = self._dir / "mosquitto.log"
        self._pid_file = self._dir / "mosquitto.pid"
        self._port_file = self._dir / "port"
        self._tls_port_file = self._dir / "tls-port"
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._tls_port: int | None = None
        self._hub_password: str | None = None
        self._run_as: RunAs | None = None
        self._admitting = True  # devices may connect (False between start(hold_devices=True) and admit_devices())
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
    def tls_port(self) -> int:
        """The TLS listener's port; 0 without one, BrokerError before start() when it is chosen then."""
        tls = self.config.tls
        if tls is None:
            return 0
        port = self._tls_port if self._tls_port is not None else tls.port
        if port == 0:
            raise BrokerError("the broker's TLS port is chosen at start(); it has not been started")
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

    @property
    def pid_path(self) -> Path:
        """The pidfile: the running broker's pid, read by the next start() on this data_dir."""
        return self._pid_file

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, hold_devices: bool = False) -> None:
        """End a broker left running on this data_dir, write the files, spawn mosquitto and wait
        until it listens. With hold_devices, only the hub's account may connect until admit_devices().

        Raises BrokerError when mosquitto is missing, exits early or does not listen within 10 s, or
        when a broker left running on this data_dir cannot be ended.
        """
        if self.running:
            raise BrokerError("broker already running")
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto not found (Debian: apt-get install mosquitto)")
        private_dir(self._dir)  # the broker's passwords and ACL: no one else may list or read them
        self._run_as = run_as_owner(self._dir)
        self._end_stale()
        # A restart of the same ManagedBroker keeps its port and hub password, so clients that are
        # already configured (the hub's ingest, the agents) reconnect by themselves.
        self._port = self._port or self.config.port or self._saved_port(self._port_file, self.config.host)
        self._port = self._port or free_port(self.config.host)
        tls = self.config.tls
        if tls is not None:
            self._tls_port = self._tls_port or tls.port or self._saved_port(self._tls_port_file, tls.host)
            self._tls_port = self._tls_port or free_port(tls.host)
            self._copy_tls_files(tls)
        self._hub_password = self._hub_password or secrets.token_urlsafe(32)
        with self._lock:
            self._admitting = not hold_devices
            self._write_passwd({**self._read_passwd(), HUB_USERNAME: hash_password(self._hub_password)})
        self._write_private(self._acl, render_acl())
        self._write_private(self._conf, self._render_conf())
        for attempt in range(2):
            log_offset = file_size(self._log)  # the log is appended across runs; judge this run's lines only
            self._spawn(binary)
            try:
                self._wait_listening(log_offset)
                break
            except StartCrash as exc:
                # mosquitto 2.0.11 sometimes dies of SIGSEGV while starting on a port it just left (about
                # one restart in seven in tests/test_restarts.py); a second start has always come up.
                if attempt == 1:
                    raise
                log.warning("%s; starting it once more", exc)
        self._write_private(self._port_file, f"{self._port}\n")
        if self._tls_port is not None:
            self._write_private(self._tls_port_file, f"{self._tls_port}\n")

    def admit_devices(self) -> None:
        """Let device accounts connect after start(hold_devices=True); the broker has reloaded on return."""
        with self._lock:
            self._admitting = True
            self._write_passwd(self._read_passwd())
            self._reload()

    def stop(self) -> None:
        """SIGTERM, wait up to 5 s, then SIGKILL; removes the pidfile. Safe to call twice or before start()."""
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
        if read_int(self._pid_file) == proc.pid:
            self._pid_file.unlink(missing_ok=True)

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
            f"password_file {self._active}",
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
        if self.config.tls is not None and self._tls_port is not None:  # listener options follow their line
            lines += render_tls_listener(self._dir, self.config.tls.host, self._tls_port)
        return "\n".join(lines) + "\n"

    def _copy_tls_files(self, tls: BrokerTls) -> None:
        """The CA, certificate and key, into the data directory and given to the broker's account."""
        for name, source in zip(TLS_FILES, (tls.ca_file, tls.cert_file, tls.key_file), strict=True):
            self._write_private(self._dir / name, Path(source).read_text())

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
        """Save every account, and give the broker those it admits now (the hub alone while held)."""
        self._write_private(self._passwd, render_passwd(users))
        active = users if self._admitting else {k: v for k, v in users.items() if k == HUB_USERNAME}
        self._write_private(self._active, render_passwd(active))

    def _write_private(self, path: Path, text: str) -> None:
        """Atomically replace `path` with a 0600 file owned by the account the broker runs as."""
        private_dir(self._dir)  # the broker's passwords and ACL: no one else may list or read them
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
        private_file(self._log, create=True)  # one found looser (an older hub's) is tightened: it names every device
        fd = os.open(self._log, os.O_WRONLY | os.O_APPEND)
        give_to(self._log, self._run_as)
        with os.fdopen(fd, "ab") as log_file:
            self._proc = spawn_tied(
                [binary, "-c", str(self._conf)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                **popen_account(self._run_as),
            )
        self._write_private(self._pid_file, f"{self._proc.pid}\n")

    @staticmethod
    def _saved_port(path: Path, host: str) -> int | None:
        """The port the last start() on this data_dir used (from `path`), if it can be bound now."""
        port = read_int(path)
        return port if port and 0 < port <= 65535 and bindable(host, port) else None

    def _end_stale(self) -> None:
        """End the broker named by the pidfile if it is this data_dir's mosquitto (see the module docstring)."""
        pid = read_int(self._pid_file)
        if pid is None or not is_broker_of(pid, self._conf):
            self._pid_file.unlink(missing_ok=True)
            return
        log.warning("ending broker pid %d, left running on %s by an earlier hub", pid, self._dir)
        try:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not signal_broker(pid, self._conf, sig) or wait_gone(pid, self._conf, _STOP_TIMEOUT_S):
                    break
            else:
                raise BrokerError(f"broker pid {pid} of {self._dir} did not end after SIGKILL")
        except PermissionError as exc:
            raise BrokerError(f"broker pid {pid} of {self._dir} is still running and we may not end it: {exc}") from exc
        self._pid_file.unlink(missing_ok=True)

    def _wait_listening(self, log_offset: int) -> None:
        assert self._proc is not None and self._port is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                error = StartCrash if code < 0 else BrokerError  # killed by a signal: a crash, not a refusal
                raise error(f"mosquitto exited with status {code} while starting{self._diagnosis()}")
            if _RUNNING_RE.search(read_from(self._log, log_offset)) and self._accepting():
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(
            f"mosquitto did not listen on port {self._port} within {_START_TIMEOUT_S} s{self._diagnosis()}"
        )

    def _accepting(self) -> bool:
        assert self._port is not None
        if not accepts(self.config.host, self._port):
            return False
        tls = self.config.tls
        return tls is None or self._tls_port is None or accepts(_reachable(tls.host), self._tls_port)

    def _reload(self) -> None:
        """SIGHUP the broker (if running) and wait for it to log that it is re-reading its files."""
        if not self.running:
            return
        assert self._proc is not None
        offset = file_size(self._log)
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + _RELOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            if _RELOAD_MARK in read_from(self._log, offset):
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
        return f"{hint}\nlast lines of {self._log}:\n{log_tail(self._log)}"


def _reachable(host: str) -> str:
    """An address of this machine's listener bound to `host` (a wildcard is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
