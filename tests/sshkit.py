"""A real OpenSSH server for tests: throwaway host and user keys, an sshd on 127.0.0.1.

    with ssh_server() as kit:
        target = open_target(kit.url("root", "/tmp/x"), kit.identity, kit.known_hosts)

Needs /usr/sbin/sshd and ssh-keygen (Debian's openssh-server) and root: sshd's privilege separation
wants /run/sshd and a root-owned server. The kit's folder is world-readable (0755) because sshd reads
the authorized keys file as the user logging in, and tests log in as an unprivileged user too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
START_TIMEOUT_S = 10.0


def sshd_missing() -> str | None:
    """Why an ssh server cannot run here, or None when it can."""
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        return "OpenSSH server not installed (apt install openssh-server)"
    if os.geteuid() != 0:
        return "sshd needs root here (privilege separation directory /run/sshd)"
    return None


@dataclass(frozen=True)
class SSHKit:
    """A running sshd and what a client needs to log in to it."""

    dir: Path
    """The kit's folder (keys, config, known_hosts); removed at teardown."""
    port: int
    """The port sshd listens on, at 127.0.0.1."""
    identity: str
    """Private key authorized for every user."""
    known_hosts: str
    """A known_hosts file naming the server's host key."""
    pid: int
    """sshd's (the listener's) process id."""

    def url(self, user: str = "root", path: str = "") -> str:
        return f"ssh://{user}@127.0.0.1:{self.port}{path}"

    def kill_connections(self) -> int:
        """SIGKILL every process sshd started for a connection (its descendants); the listener stays.
        Returns how many were killed."""
        victims = _descendants(self.pid)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(victims)


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces; fields follow its ")"
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _config(d: Path, port: int) -> Path:
    cfg = d / "sshd_config"
    cfg.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
        # Many connections from one test run; the default 10:30:100 would drop some at random.
        "MaxStartups 100\n"
    )
    return cfg


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited {proc.returncode}: {log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} within {START_TIMEOUT_S} s")


@contextlib.contextmanager
def ssh_server() -> Iterator[SSHKit]:
    """Start sshd (see the module docstring); stop it and remove its folder on exit."""
    d = Path(tempfile.mkdtemp(prefix="tandem-sshkit-"))
    d.chmod(0o755)
    _keygen(d / "host_key")
    _keygen(d / "user_key")
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    (d / "authorized_keys").chmod(0o644)
    port = free_port()
    cfg = _config(d, port)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = (d / "sshd.log").open("wb")  # a file, not a pipe: a full pipe would stall sshd
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stderr=log)
    try:
        _wait_listening(proc, port, d / "sshd.log")
        host_key = (d / "host_key.pub").read_text().split()
        (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
        yield SSHKit(d, port, str(d / "user_key"), str(d / "known_hosts"), proc.pid)
    finally:
        SSHKit(d, port, "", "", proc.pid).kill_connections()  # before the listener: then they are orphans
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(d, ignore_errors=True)
