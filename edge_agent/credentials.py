"""The agent's saved enrollment: what the hub gave this device, kept in `<state dir>/credentials.json`.

Enrolling spends a one-time token, so its result is saved and every later start (and every
reconnect) dials with it instead: the device id and credential sent as call metadata, the broker
telemetry goes to, and, for a device enrolled with a certificate, the hub's device port. The agent
(edge_agent.agent) rewrites the file when a Welcome moves the device port or the broker. The file
is private (0600 in a 0700 directory) and written atomically, since it is the device's secret.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_agent.telemetry import MqttSettings
from tandem.files import write_private


@dataclass(frozen=True)
class Credentials:
    device_id: str
    credential: str
    hub: str
    mqtt: MqttSettings | None
    device_hub: str = ""
    """host:port of the hub's device port, dialled with this device's certificate (mutual TLS); empty:
    the hub address serves this device (plaintext, or TLS without device certificates)."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-tandem-device-id", self.device_id), ("x-tandem-credential", self.credential))


class EnrollmentRejected(RuntimeError):
    """The hub refused the token or the saved credential: retrying will not help."""


def credentials_path(state_dir: Path) -> Path:
    return state_dir / "credentials.json"


def save_credentials(state_dir: Path, creds: Credentials) -> None:
    """Write the credential file readable by the owner only (0600), atomically."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(
        credentials_path(state_dir), json.dumps({**asdict(creds), "mqtt": asdict(creds.mqtt) if creds.mqtt else None})
    )


def load_credentials(state_dir: Path) -> Credentials | None:
    path = credentials_path(state_dir)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    mqtt = MqttSettings(**data["mqtt"]) if data.get("mqtt") else None
    return Credentials(data["device_id"], data["credential"], data["hub"], mqtt, data.get("device_hub", ""))
