"""The agent's systemd unit, rendered on the operator's side and shipped as `R/tandem-agent.service`.

The unit names only stable paths under the install root R: `R/current/deps/bin/python` (each slot
links `deps` to the venv of its own lock) and `R/current/agent.json`, so switching `current` and
restarting is all a new version or a rollback needs; the unit itself changes only with R.

Choices, and why:
- `User=tandem-agent`, a static system user (useradd --system, made by device_side.py), not
  `DynamicUser=`: a dynamic user's uid is only stable for `StateDirectory=` under /var/lib, but the
  agent's credential, certs and spool live in R/state, which must keep one owner across restarts,
  reflashes and rollbacks.
- `Type=notify`, `NotifyAccess=main`, `WatchdogSec=60`: the agent sends READY=1 once it is connected
  to its hub and serving, and WATCHDOG=1 every half period from its event loop
  (edge_agent/sdnotify.py), so a hung loop is restarted. `TimeoutStartSec` covers the model's load,
  its calibration and the first connection; device_side.py starts the unit with --no-block and
  the flash's own health check does the waiting. `watchdog_s=None` gives Type=simple.
- `Restart=on-failure` with `StartLimitIntervalSec`/`StartLimitBurst`: a crash loop stops the unit
  (state "failed") instead of restarting forever; the flash's health check then rolls back.
- `ProtectSystem=strict` and `ReadWritePaths=R/state R/log`: the agent can write its state and
  log and nothing else, its own code and model included. `UMask=0077`: its files are 0600.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

UNIT_NAME = "tandem-agent.service"
AGENT_USER = "tandem-agent"


@dataclass(frozen=True)
class UnitSpec:
    """What the unit depends on."""

    root: PurePosixPath
    """The install root R on the device."""
    user: str = AGENT_USER
    """The user the agent runs as."""
    restart_s: float = 5.0
    """RestartSec: the pause before a failed agent is started again."""
    start_limit_interval_s: float = 300.0
    """StartLimitIntervalSec: the window in which starts are counted."""
    start_limit_burst: int = 5
    """StartLimitBurst: more starts than this in the window is a crash loop; the unit fails."""
    watchdog_s: float | None = 60.0
    """WatchdogSec: the agent pings every half of it (None: no watchdog, and Type=simple)."""
    start_timeout_s: float = 300.0
    """TimeoutStartSec: from exec to READY=1 (model load, calibration, first connection)."""
    stop_timeout_s: float = 30.0
    """TimeoutStopSec: SIGTERM, then SIGKILL after this long."""

    def __post_init__(self) -> None:
        if not self.root.is_absolute() or any(c.isspace() for c in str(self.root)):
            raise ValueError(f"install root {self.root!s}: must be absolute, without spaces (systemd paths)")


def agent_argv(root: PurePosixPath) -> list[str]:
    """The agent's command line; device_side.py's supervise mode runs the same one."""
    return [str(root / "current/deps/bin/python"), "-m", "tandem_cli", "agent", "run", "--config",
            str(root / "current/agent.json")]  # fmt: skip


def render_unit(spec: UnitSpec) -> str:
    """The unit file's text."""
    r = spec.root
    notify = (
        ["Type=notify", "NotifyAccess=main", f"WatchdogSec={spec.watchdog_s:g}"] if spec.watchdog_s else ["Type=simple"]
    )
    lines = [
        "[Unit]",
        "Description=Tandem edge agent",
        "Wants=network-online.target",
        "After=network-online.target",
        f"StartLimitIntervalSec={spec.start_limit_interval_s:g}",
        f"StartLimitBurst={spec.start_limit_burst}",
        "",
        "[Service]",
        *notify,
        f"User={spec.user}",
        f"Group={spec.user}",
        f"Environment=PYTHONPATH={r / 'current/site'}",
        "Environment=PYTHONUNBUFFERED=1",
        f"WorkingDirectory={r / 'state'}",
        f"ExecStart={' '.join(agent_argv(r))}",
        "Restart=on-failure",
        f"RestartSec={spec.restart_s:g}",
        f"TimeoutStartSec={spec.start_timeout_s:g}",
        f"TimeoutStopSec={spec.stop_timeout_s:g}",
        "UMask=0077",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        f"ReadWritePaths={r / 'state'} {r / 'log'}",
        f"StandardOutput=append:{r / 'log/agent.log'}",
        "StandardError=inherit",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"
