"""The agent's configuration file (`tandem agent run --config FILE`): defaults for its flags.

    {"hub": "hub.example:50051", "profile": "jetson-orin-nano", "model": "smollm2-135m-instruct",
     "state_dir": "/var/lib/tandem", "tls_ca": "ca.pem", "agent_version": "image-2026.12"}

A JSON object whose keys are the ones below (all optional, all strings); a flag given on the command
line wins over the file. Relative paths (bundle, state_dir, tls_ca) are relative to the file's own
directory, so a flashed image can ship the file beside what it names. An unknown key, a value that is
not a string or a file that is not a JSON object is a ConfigFileError naming the file and the key:
a misspelt key silently ignored would leave a device running on a default nobody chose.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


class ConfigFileError(ValueError):
    """A configuration file that cannot be used; the message names the file (and the key)."""


@dataclass(frozen=True)
class AgentFile:
    """What a configuration file sets; None: not set (the flag's own default applies)."""

    hub: str | None = None
    """host:port of the hub."""
    token: str | None = None
    """One-time enrollment token (first run only)."""
    profile: str | None = None
    """Device profile name."""
    model: str | None = None
    """Zoo model to serve, or the name to serve `bundle` under."""
    bundle: str | None = None
    """A bundle directory to serve (models.bundle)."""
    name: str | None = None
    """Human-readable device name."""
    state_dir: str | None = None
    """Where the credential, the telemetry spool and updates' bundles are kept."""
    tls_ca: str | None = None
    """The deployment's ca.pem: dial the hub over TLS."""
    quant: str | None = None
    """Precision to serve a GGUF at (source, fp32, int8, int4)."""
    agent_version: str | None = None
    """What the agent reports to the hub as its version (default: the package's)."""


KEYS = tuple(f.name for f in dataclasses.fields(AgentFile))
_PATHS = ("bundle", "state_dir", "tls_ca")


def read_agent_file(path: str | Path) -> AgentFile:
    """The settings of the file at `path`. Raises ConfigFileError (see the module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read the agent configuration ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise ConfigFileError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: the agent configuration must be a JSON object, got {type(data).__name__}")
    for key, value in data.items():
        if key not in KEYS:
            raise ConfigFileError(f"{path}: unknown key {key!r}; the keys are {', '.join(KEYS)}")
        if not isinstance(value, str):
            raise ConfigFileError(f"{path}: key {key!r} must be a string, got {json.dumps(value)[:60]}")
    for key in _PATHS:
        if key in data:
            data[key] = str(path.parent / data[key])  # an absolute value stays as it is
    return AgentFile(**data)
