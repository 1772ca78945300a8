"""`ssh://user@host[:port][/path]`: a device reached over SSH (asyncssh), keys only.

    user    the login (default: the local user, as `ssh` does)
    port    default 22
    path    the install root, absolute. Default: /opt/tandem when logging in as root; otherwise
            `tandem` under the user's home directory (made absolute on connect, so `root` is a
            relative path until the first operation: relative paths resolve against the home
            directory both in commands and over SFTP, so it names the same place either way).

Authentication is by key only: `identity` (`--identity KEY`) alone when given, else the user's
default keys (~/.ssh/id_*) and ssh-agent. Password and keyboard-interactive logins are never tried.
The host key must be in `known_hosts` (default ~/.ssh/known_hosts); an unknown or changed host key
is refused with the command that adds it, never trusted silently.

One connection (and one SFTP session on it) serves every operation, opened on first use. If it is
lost, the operation in flight raises TargetError and the next one connects again, so a caller may
retry (flashing.transfer resumes an interrupted copy from its .part).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shlex
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from flashing.target import DiskFull, RunResult, Target, TargetError

with warnings.catch_warnings():  # asyncssh imports cryptography's DSA, deprecated there; we never offer DSA
    warnings.simplefilter("ignore", UserWarning)
    import asyncssh

DEFAULT_PORT = 22
CONNECT_TIMEOUT_S = 15.0
"""TCP connect plus handshake and login; a device on a slow cellular link answers well within it."""
ROOT_AS_ROOT = PurePosixPath("/opt/tandem")
ROOT_AS_USER = PurePosixPath("tandem")
"""Under the user's home: an unprivileged login cannot write /opt."""


@dataclass(frozen=True)
class SSHAddress:
    """The parts of an ssh:// URL."""

    user: str
    """The login name."""
    host: str
    """Host name or address, as dialled."""
    port: int
    """TCP port of the device's sshd."""
    root: PurePosixPath
    """Install root: absolute, or relative to the user's home directory."""

    @classmethod
    def parse(cls, url: str) -> SSHAddress:
        """Raises ValueError for a URL that is not ssh://[user@]host[:port][/path]."""
        parts = urlsplit(url)
        if parts.scheme != "ssh" or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"target {url!r}: expected ssh://user@host[:port][/path]")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError as exc:
            raise ValueError(f"target {url!r}: bad port ({exc})") from None
        user = parts.username or getpass.getuser()
        default = ROOT_AS_ROOT if user == "root" else ROOT_AS_USER
        root = PurePosixPath(parts.path) if parts.path not in ("", "/") else default
        return cls(user, parts.hostname, port, root)

    @property
    def where(self) -> str:
        """host:port, bracketed for an IPv6 address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class SSHTarget(Target):
    """A device over SSH; see the module docstring. Raises TargetError from every method."""

    def __init__(
        self,
        url: str,
        identity: str | None = None,
        known_hosts: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.addr = SSHAddress.parse(url)
        self.url = url
        self.root = self.addr.root
        self.identity = identity
        self.known_hosts = known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        self.connect_timeout = connect_timeout
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._connecting = asyncio.Lock()  # concurrent first calls share one connection

    # -- the connection -----------------------------------------------------------------------------

    async def _session(self) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
        """The live connection and its SFTP session, (re)opened when there is none."""
        async with self._connecting:
            if self._conn is None or self._sftp is None or self._conn.is_closed():
                await self._drop()
                self._conn = await self._connect()
                try:
                    self._sftp = await self._conn.start_sftp_client()
                    if not self.root.is_absolute():  # resolve `tandem` against the home directory once
                        self.root = PurePosixPath(await self._sftp.realpath(str(self.root)))
                except (asyncssh.Error, OSError) as exc:
                    await self._drop()
                    raise TargetError(f"{self.addr.where}: cannot start SFTP: {_reason(exc)}") from exc
            return self._conn, self._sftp

    async def _connect(self) -> asyncssh.SSHClientConnection:
        if self.identity and not os.path.isfile(self.identity):
            raise TargetError(f"identity file {self.identity} does not exist")
        if not os.path.exists(self.known_hosts):
            raise TargetError(self._unknown_host(f"{self.known_hosts} does not exist"))
        keys = [self.identity] if self.identity else ()  # (): the default keys
        try:
            return await asyncssh.connect(
                self.addr.host,
                self.addr.port,
                username=self.addr.user,
                known_hosts=self.known_hosts,
                client_keys=keys,
                agent_path=None if self.identity else (),  # with --identity, that key only
                preferred_auth="publickey",
                connect_timeout=self.connect_timeout,
            )
        except Exception as exc:
            error = self._connect_error(exc)
            if error is None:
                raise
            raise error from exc

    def _connect_error(self, exc: Exception) -> TargetError | None:
        """The TargetError an operator can act on for a failed connect; None for an unexpected one."""
        where, user = self.addr.where, self.addr.user
        if isinstance(exc, asyncssh.PermissionDenied):
            key = self.identity or "(your default keys ~/.ssh/id_* and ssh-agent)"
            return TargetError(
                f"{where} refused key {key} for user {user}: add its public key to ~{user}/.ssh/authorized_keys "
                "on the device, or pass --identity with a key it accepts"
            )
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            return TargetError(self._unknown_host(f"its host key is not in {self.known_hosts} (or has changed)"))
        if isinstance(exc, TimeoutError):
            return TargetError(f"cannot reach {where}: no answer within {self.connect_timeout:.0f} s")
        if isinstance(exc, asyncssh.ConnectionLost):
            return TargetError(f"cannot reach {where}: the connection closed during the SSH handshake ({exc.reason})")
        if isinstance(exc, ConnectionRefusedError):
            return TargetError(f"cannot reach {where}: connection refused (is sshd running, and on this port?)")
        if isinstance(exc, OSError):
            return TargetError(f"cannot reach {where}: {exc.strerror or exc}")
        if isinstance(exc, asyncssh.Error):
            return TargetError(f"{where}: SSH failed: {exc.reason}")
        if isinstance(exc, ValueError):  # asyncssh: an unreadable key or known_hosts file
            return TargetError(f"{where}: cannot use the key or known_hosts file: {exc}")
        return None

    def _unknown_host(self, why: str) -> str:
        a = self.addr
        return (
            f"{a.where}: host not trusted: {why}. Check the key's fingerprint with the device's owner, then add it: "
            f"ssh-keyscan -p {a.port} {a.host} >> {self.known_hosts}   (or log in once with: ssh -p {a.port} "
            f"{a.user}@{a.host})"
        )

    async def _drop(self) -> None:
        """Forget the connection (after a loss, or on close), closing what is still open."""
        conn, self._conn, self._sftp = self._conn, None, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):  # already lost: nothing left to report
                await conn.wait_closed()

    async def close(self) -> None:
        await self._drop()

    @contextlib.contextmanager
    def _errors(self, action: str, path: PurePosixPath | str) -> Iterator[None]:
        """Map asyncssh's errors during `action` on `path` to TargetError."""
        where = self.addr.where
        try:
            yield
        except asyncssh.TimeoutError as exc:  # a command ran too long (caught before asyncssh.Error: it is one)
            raise _Timeout(str(exc)) from exc
        except asyncssh.SFTPPermissionDenied as exc:
            raise TargetError(f"{where}: permission denied: user {self.addr.user} cannot {action} {path}") from exc
        except asyncssh.SFTPNoSuchFile as exc:
            raise TargetError(f"{where}: cannot {action} {path}: no such file or directory") from exc
        except _LOST as exc:
            self._conn = self._sftp = None  # the next operation connects again
            raise TargetError(f"{where}: connection lost while trying to {action} {path}: {_reason(exc)}") from exc
        except asyncssh.Error as exc:
            raise TargetError(f"{where}: cannot {action} {path}: {_reason(exc)}") from exc

    # -- Target ---------------------------------------------------------------------------------------

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = 300.0, check: bool = True
    ) -> RunResult:
        conn, _ = await self._session()
        command = shlex.join(argv)
        try:
            with self._errors("run", command[:200]):
                done = await conn.run(command, input=stdin, encoding=None, check=False, timeout=timeout)
        except _Timeout as exc:
            raise TargetError(f"{self.url}: {command[:200]} took over {timeout:.0f} s") from exc
        # No exit status: killed by a signal (or the channel closed); report it as 255, as ssh does.
        rc = done.exit_status if done.exit_status is not None and done.exit_status >= 0 else 255
        result = RunResult(rc, _text(done.stdout), _text(done.stderr))
        if check and rc != 0:
            raise TargetError(f"{self.url}: {command[:200]} exited {rc}: {result.stderr.strip()[-2000:]}")
        return result

    async def size(self, path: PurePosixPath) -> int | None:
        _, sftp = await self._session()
        with self._errors("stat", path):
            try:
                attrs = await sftp.stat(str(self.path(path)))
            except asyncssh.SFTPNoSuchFile:
                return None
        return attrs.size

    async def read(self, path: PurePosixPath) -> bytes:
        _, sftp = await self._session()
        with self._errors("read", path):
            async with sftp.open(str(self.path(path)), "rb") as f:
                return await f.read()

    async def write(self, path: PurePosixPath, offset: int, chunks: Iterable[bytes]) -> int:
        """Raises DiskFull when the device's file system fills up (OpenSSH's sftp-server reports
        ENOSPC as a bare "Failure", so a failed write is checked against the free space)."""
        _, sftp = await self._session()
        path = self.path(path)
        with self._errors("write", path):
            await sftp.makedirs(str(path.parent), exist_ok=True)
            # No FXF_TRUNC: the bytes before `offset` are kept (a resumed copy).
            f = await sftp.open(str(path), asyncssh.FXF_WRITE | asyncssh.FXF_CREAT, encoding=None)
            try:
                pos = offset
                for chunk in chunks:
                    await self._write_at(sftp, f, path, chunk, pos)
                    pos += len(chunk)
                await f.truncate(pos)
            finally:
                with contextlib.suppress(asyncssh.Error, OSError):  # the write's own error is the one to report
                    await f.close()
        return pos - offset

    async def _write_at(
        self, sftp: asyncssh.SFTPClient, f: asyncssh.SFTPClientFile, path: PurePosixPath, chunk: bytes, pos: int
    ) -> None:
        try:
            await f.write(chunk, pos)
        except (asyncssh.SFTPFailure, asyncssh.SFTPNoSpaceOnFilesystem, asyncssh.SFTPQuotaExceeded) as exc:
            free = await _free_bytes(sftp, path.parent)
            if isinstance(exc, asyncssh.SFTPNoSpaceOnFilesystem) or (free is not None and free < len(chunk)):
                raise DiskFull(path, free or 0) from exc
            raise


async def _free_bytes(sftp: asyncssh.SFTPClient, folder: PurePosixPath) -> int | None:
    """Bytes free to an unprivileged writer at `folder` (statvfs@openssh.com), None when unknown."""
    try:
        st = await sftp.statvfs(str(folder))
    except (asyncssh.Error, OSError):
        return None
    return st.bavail * st.frsize


_LOST = (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection, asyncssh.DisconnectError, ConnectionError)
"""The link dropped (a local file's OSError is not one of these: it is the caller's to see)."""


class _Timeout(TargetError):
    """A command ran past its timeout (run() words the message)."""


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _text(out: object) -> str:
    if isinstance(out, bytes):
        return out.decode(errors="replace")
    return out or ""
