"""Running the agent on the device: under systemd when it is the init system, else under
`supervise`, this package's own small supervisor. Standard library only (Python >= 3.9); imported
by device_side.py from R/bin/. See device_side.py for the layout.

The supervisor runs the agent, restarts it when it exits non-zero (backoff doubling from
--backoff, at most 60 s), and gives up on a crash loop: more than --max-restarts failures within
--window seconds; R/run/supervisor.json records restarts, the last exit and the crash loop. An
agent that exits 0 chose to stop and is not restarted (systemd's Restart=on-failure). The agent
gets SIGTERM when the supervisor dies, however it dies (PR_SET_PDEATHSIG), so none is orphaned.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from device_util import (
    AGENT_USER,
    UNIT,
    Fail,
    alive,
    read_json,
    run,
    slot_of,
    slot_version,
    systemd_running,
    write_atomic,
)


def prepare_state(root: Path, user: str | None) -> None:
    """R/state 0700 with its files 0600, R/log; both owned by the agent's user when one is named."""
    for d in (root / "state", root / "log", root / "run"):
        d.mkdir(parents=True, exist_ok=True)
    for dirpath, _dirs, files in os.walk(root / "state"):
        os.chmod(dirpath, 0o700)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o600)
    if user and os.geteuid() == 0:
        pw = pwd.getpwnam(user)
        for top in (root / "state", root / "log"):
            for dirpath, _dirs, files in os.walk(top):
                for p in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
                    os.chown(p, pw.pw_uid, pw.pw_gid)


def agent_argv(root: Path) -> list[str]:
    """The agent's command line (flashing/unit.py's ExecStart is the same)."""
    return [
        str(root / "current/deps/bin/python"),
        "-m",
        "tandem_cli",
        "agent",
        "run",
        "--config",
        str(root / "current/agent.json"),
    ]


def check_runnable(root: Path) -> str:
    slot = slot_of(root / "current")
    if slot is None:
        raise Fail("no current slot: stage and activate one first")
    if not (root / "slots" / slot / "site").is_dir() or not (root / "slots" / slot / "agent.json").is_file():
        raise Fail(f"slot {slot} has no staged wheel or config: stage it again")
    return slot


def _die_with_parent() -> None:
    """In the agent (before exec): SIGTERM it when the supervisor dies, even by SIGKILL (Linux
    prctl PR_SET_PDEATHSIG), so no agent outlives its supervisor; own umask for its state."""
    os.umask(0o077)
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the supervisor's stop still kills it
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Supervisor:
    """Run the agent; restart it on failure with exponential backoff; stop on a crash loop."""

    def __init__(self, root: Path, max_restarts: int, window: float, backoff: float, user: str | None) -> None:
        self.root, self.max_restarts, self.window, self.backoff, self.user = root, max_restarts, window, backoff, user
        self.stopping = False
        self.child: subprocess.Popen | None = None
        self.status = {
            "pid": os.getpid(),
            "child_pid": None,
            "restarts": 0,
            "crash_loop": False,
            "last_exit": None,
            "started": time.time(),
            "state": "starting",
        }

    def save(self, **changes: object) -> None:
        self.status.update(changes)
        write_atomic(self.root / "run/supervisor.json", json.dumps(self.status))

    def on_signal(self, _signum: int, _frame: object) -> None:
        self.stopping = True

    def spawn(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(self.root / "current/site"), "PYTHONUNBUFFERED": "1"}
        extra: dict = {}
        if self.user and os.geteuid() == 0:
            pw = pwd.getpwnam(self.user)
            extra = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            env["HOME"] = str(self.root / "state")
        return subprocess.Popen(
            agent_argv(self.root), env=env, cwd=self.root / "state", preexec_fn=_die_with_parent, **extra
        )

    def wait_child(self, child: subprocess.Popen, grace: float = 10.0) -> int:
        while child.poll() is None and not self.stopping:
            time.sleep(0.1)
        if child.poll() is None:  # asked to stop: SIGTERM, then SIGKILL after the grace period
            child.terminate()
            try:
                child.wait(grace)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        return child.returncode

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(0.1, end - time.monotonic()))

    def run(self) -> dict:
        failures: list[float] = []
        while not self.stopping:
            child = self.spawn()
            self.save(child_pid=child.pid, state="running", slot=slot_of(self.root / "current"))
            log(f"agent started, pid {child.pid}")
            rc = self.wait_child(child)
            self.save(child_pid=None, last_exit=rc)
            if self.stopping or rc == 0:
                log(f"agent exited {rc}")
                break
            now = time.monotonic()
            failures = [t for t in failures if now - t < self.window] + [now]
            if len(failures) > self.max_restarts:
                log(f"agent exited {rc}: {len(failures)} failures in {self.window:g} s, a crash loop: giving up")
                self.save(crash_loop=True, state="crash-loop")
                return self.status
            delay = min(self.backoff * 2 ** (len(failures) - 1), 60.0)
            log(f"agent exited {rc}; restart {self.status['restarts'] + 1} in {delay:.1f} s")
            self.save(state="backoff", restarts=self.status["restarts"] + 1)
            self.sleep(delay)
        self.save(state="stopped")
        return self.status


def log(message: str) -> None:
    print(f"[supervisor {time.strftime('%Y-%m-%dT%H:%M:%S')}] {message}", flush=True)


def supervise(root: Path, args: argparse.Namespace) -> dict:
    check_runnable(root)
    prepare_state(root, args.user)
    sup = Supervisor(root, args.max_restarts, args.window, args.backoff, args.user)
    signal.signal(signal.SIGTERM, sup.on_signal)
    signal.signal(signal.SIGINT, sup.on_signal)
    write_atomic(root / "run/supervisor.pid", str(os.getpid()))
    sup.save()  # `start` waits for this record: the supervisor is up, whatever the agent does next
    try:
        return sup.run()
    finally:
        (root / "run/supervisor.pid").unlink(missing_ok=True)


def supervisor_pid(root: Path) -> int | None:
    try:
        pid = int((root / "run/supervisor.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def start(root: Path, args: argparse.Namespace) -> dict:
    slot = check_runnable(root)
    if systemd_running():
        return systemd_start(root, slot)
    if (pid := supervisor_pid(root)) is not None:
        return {"manager": "supervise", "started": False, "supervisor_pid": pid, "slot": slot}
    prepare_state(root, args.user)
    (root / "run/supervisor.json").unlink(missing_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve().with_name("device_side.py")), "--root", str(root)]
    argv += ["supervise"]
    argv += ["--max-restarts", str(args.max_restarts), "--window", str(args.window), "--backoff", str(args.backoff)]
    argv += ["--user", args.user] if args.user else []
    with open(root / "log/agent.log", "ab") as out:  # detached: own session, no terminal, output to the log
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 10
    while read_json(root / "run/supervisor.json").get("pid") != proc.pid:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise Fail(f"the supervisor did not start (exit {proc.poll()}): see {root / 'log/agent.log'}")
        time.sleep(0.05)
    return {"manager": "supervise", "started": True, "supervisor_pid": proc.pid, "slot": slot}


def kill_group(pid: int) -> None:
    """SIGKILL a supervisor that did not stop, with its group (`start` made it a session leader,
    so the agent is in its group); one run in the foreground has no group of its own."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)


def stop(root: Path, grace: float = 15.0) -> dict:
    """SIGTERM the supervisor (it stops the agent: SIGTERM, then SIGKILL); SIGKILL both if it hangs."""
    if systemd_running():
        run(["systemctl", "stop", UNIT], "systemctl stop")
        return {"manager": "systemd", "stopped": True}
    pid, child = supervisor_pid(root), read_json(root / "run/supervisor.json").get("child_pid")
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            kill_group(pid)
    if alive(child):
        os.kill(child, signal.SIGKILL)
    (root / "run/supervisor.pid").unlink(missing_ok=True)
    return {"manager": "supervise", "stopped": pid is not None}


def ensure_user(name: str, home: Path) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        run(
            ["useradd", "--system", "--no-create-home", "--home-dir", str(home), "--shell", "/usr/sbin/nologin", name],
            f"useradd {name}",
        )


def systemd_start(root: Path, slot: str) -> dict:
    """Install R/tandem-agent.service (made by flashing/unit.py) and enable and start it."""
    unit = root / UNIT
    if not unit.is_file():
        raise Fail(f"no {unit}: the flash copies it")
    if os.geteuid() != 0:
        raise Fail("systemd runs here: installing the agent's unit needs root (run device_side.py with sudo)")
    ensure_user(AGENT_USER, root / "state")
    prepare_state(root, AGENT_USER)
    conf = root / "current/agent.json"
    os.chown(conf.resolve(), 0, pwd.getpwnam(AGENT_USER).pw_gid)  # the token: root writes, the agent reads
    os.chmod(conf.resolve(), 0o640)
    installed = Path("/etc/systemd/system") / UNIT
    if not installed.is_file() or installed.read_text() != unit.read_text():
        shutil.copyfile(unit, installed)
        run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
    if unit_state().get("Result", "success") != "success":  # after a crash loop, systemd refuses to start it
        run(["systemctl", "reset-failed", UNIT], "systemctl reset-failed")
    # --no-block: READY=1 waits for the hub; the flash's health check does the waiting, with its own timeout.
    run(["systemctl", "enable", "--now", "--no-block", UNIT], "systemctl enable --now")
    return {"manager": "systemd", "started": True, "slot": slot}


def unit_state() -> dict:
    out = subprocess.run(
        ["systemctl", "show", UNIT, "--property=ActiveState,SubState,MainPID,NRestarts,Result"],
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def status(root: Path) -> dict:
    slot, prev = slot_of(root / "current"), slot_of(root / "previous")
    base = {
        "slot": slot,
        "version": slot_version(root, slot),
        "previous": prev,
        "previous_version": slot_version(root, prev),
    }
    if systemd_running():
        st = unit_state()
        pid = int(st.get("MainPID", "0") or 0)
        return {
            **base,
            "manager": "systemd",
            "running": st.get("ActiveState") == "active",
            "pid": pid or None,
            "restarts": int(st.get("NRestarts", "0") or 0),
            "crash_loop": st.get("Result") == "start-limit-hit",
            "state": st.get("SubState"),
        }
    sup = read_json(root / "run/supervisor.json")
    pid, sup_pid = sup.get("child_pid"), supervisor_pid(root)
    return {
        **base,
        "manager": "supervise",
        "running": sup_pid is not None and alive(pid),
        "pid": pid,
        "supervisor_pid": sup_pid,
        "restarts": sup.get("restarts", 0),
        "crash_loop": sup.get("crash_loop", False),
        "last_exit": sup.get("last_exit"),
        "state": sup.get("state", "stopped") if sup_pid else "stopped",
    }
