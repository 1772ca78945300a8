"""What the managed Mosquitto reads: topic names, account names, password hashes, the ACL, file owners.

Pure functions and constants, kept apart from the process management in `cloud_hub.broker`.
Device ids become MQTT usernames, lines of the password file and (through %u) ACL topics, so the
rules for each live here together.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import pwd
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

TOPIC_ROOT = "tandem/v1"
DEVICE_CHANNELS = ("telemetry", "status", "commands")
HUB_USERNAME = "tandem-hub"

# Device ids become MQTT usernames, lines of the password file and (through %u) ACL topics, so only
# characters that are inert in all three are allowed: no ':' (password file), '/', '+', '#' (topics),
# whitespace or newlines (config syntax).
_USERNAME_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")

# mosquitto_passwd's own format for "sha512-pbkdf2": $7$<iterations>$<b64 salt>$<b64 hash>. Its default
# of 101 iterations is kept: our secrets are 256-bit random tokens (cloud_hub.auth), so stretching
# buys nothing, and the broker pays the iterations on every CONNECT.
_PBKDF2_ITERATIONS = 101
_SALT_BYTES = 12


class BrokerError(RuntimeError):
    """Mosquitto is missing, failed to start or reload, or was used before `start()`."""


class StartCrash(BrokerError):
    """mosquitto died of a signal while starting (not a refusal of its config): start() tries once more."""


def device_topic(device_id: str, channel: str) -> str:
    """`tandem/v1/devices/<device_id>/<channel>`; ValueError for a bad id or an unknown channel."""
    if channel not in DEVICE_CHANNELS:
        raise ValueError(f"unknown channel {channel!r}; expected one of {DEVICE_CHANNELS}")
    return f"{TOPIC_ROOT}/devices/{validate_username(device_id)}/{channel}"


def validate_username(username: str) -> str:
    """Return `username` if it is 1-128 ASCII letters, digits, '-' or '_'; raise ValueError otherwise."""
    if not isinstance(username, str) or not _USERNAME_RE.fullmatch(username):
        raise ValueError(
            f"invalid MQTT username {username!r}: use 1-128 ASCII letters, digits, '-' or '_' "
            "(it is written into the broker's password and ACL files)"
        )
    return username


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A Mosquitto 2.x password-file hash (`$7$`, PBKDF2-HMAC-SHA512) of `password`."""
    if not password:
        raise ValueError("empty MQTT password")
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    return f"$7${_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def render_passwd(users: dict[str, str]) -> str:
    """A Mosquitto password file: one `name:hash` line per account."""
    return "".join(f"{name}:{entry}\n" for name, entry in users.items())


@dataclass(frozen=True)
class BrokerTls:
    """The broker's TLS listener: devices on other machines connect here with the deployment's CA.

    With it, the plaintext listener must bind loopback only (the hub's own ingest uses it)."""

    ca_file: Path
    """The deployment's CA (ca.pem): the only issuer of client certificates the listener accepts."""
    cert_file: Path
    """The broker's certificate, signed by that CA for the names devices dial (hub.pem serves)."""
    key_file: Path
    """Its private key (hub.key)."""
    host: str = "0.0.0.0"
    """Address the TLS listener binds to (the hub's gRPC listen host)."""
    port: int = 0
    """Its TCP port; 0 reuses the one saved in the data directory when free, else picks a free one."""

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() for c in self.host):  # written into mosquitto.conf
            raise ValueError(f"invalid broker TLS host {self.host!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"broker TLS port {self.port} is outside 0-65535")


TLS_FILES = ("tls-ca.pem", "tls-cert.pem", "tls-key.pem")
"""The TLS listener's files, copied into the broker's data directory: mosquitto may run as that
directory's owner (see run_as_owner), who need not be able to read the hub's TLS directory."""


def render_tls_listener(data_dir: Path, host: str, port: int) -> list[str]:
    """mosquitto.conf lines for the TLS listener. Every client must present a certificate from our CA
    (require_certificate) and still log in with its own user and password: the password file is what
    revocation edits, and the ACL's %u is that username, so a device reaches only its own topics."""
    ca, cert, key = (data_dir / name for name in TLS_FILES)
    return [
        f"listener {port} {host}",
        f"cafile {ca}",
        f"certfile {cert}",
        f"keyfile {key}",
        "require_certificate true",
        "use_identity_as_username false",
    ]


def is_loopback(host: str) -> bool:
    """Whether `host` (a broker bind address) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RunAs:
    """The account the broker process ends up running as, and so the owner of its files."""

    name: str | None
    """Value for mosquitto's `user` option; None when we are not root (the option would be ignored)."""
    uid: int
    gid: int


def render_acl() -> str:
    # Mosquitto applies `pattern` lines to every user, with %u replaced by the connecting username
    # (2.0 refuses the substitution for names containing '+', '#' or '/'; ours cannot contain them).
    # Lines after `user X` apply to X only. Without a matching line, access is denied.
    return (
        "# Written by cloud_hub.broker; edits are lost at the next start().\n"
        f"pattern readwrite {TOPIC_ROOT}/devices/%u/#\n"
        f"user {HUB_USERNAME}\n"
        f"topic readwrite {TOPIC_ROOT}/#\n"
    )


def run_as_owner(data_dir: Path) -> RunAs:
    """The account mosquitto will run as: the owner of data_dir when we are root, else ourselves.

    Run as root, mosquitto drops privileges to its `user` option (default `mosquitto`) before it opens
    its log, password and ACL files, at start and at every reload. Rather than chown files into an
    account that may not even reach data_dir (pytest's tmp_path sits in a 0700 root directory), we
    name the data_dir's owner as `user`: whoever owns the directory can read and write the files in
    it. Production gives data_dir to an unprivileged account (`chown mosquitto data_dir`) and the
    broker drops to it; a root-owned data_dir (tests in a root container) keeps the broker root, with
    a warning in its log. Not root, mosquitto cannot switch users and ignores `user`, so we omit it.
    """
    st = data_dir.stat()
    if os.geteuid() != 0:
        return RunAs(None, os.geteuid(), os.getegid())
    try:
        account = pwd.getpwuid(st.st_uid)
    except KeyError:
        raise BrokerError(f"{data_dir} is owned by uid {st.st_uid}, which has no account name") from None
    return RunAs(account.pw_name, account.pw_uid, account.pw_gid)


def give_to(path: Path, run_as: RunAs) -> None:
    if os.geteuid() == 0:
        os.chown(path, run_as.uid, run_as.gid)


def popen_account(run_as: RunAs) -> dict[str, object]:
    """subprocess.Popen arguments that start mosquitto as run_as when we are root (none otherwise).

    Started as that account, mosquitto never changes user itself, so what the kernel clears at a
    change of user (the parent-death signal, see cloud_hub.broker) survives.
    """
    if os.geteuid() != 0 or run_as.uid == 0 or run_as.name is None:
        return {}
    return {"user": run_as.uid, "group": run_as.gid, "extra_groups": os.getgrouplist(run_as.name, run_as.gid)}
