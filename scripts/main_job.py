"""The main job (`make run`): a hub, three edge agents and a mix of budgeted requests, on this machine.

1. `tandem hub up` starts the hub with a managed Mosquitto; it serves gemma3-270m itself as the
   "cloud" (profile cloud-cpu-2core: this machine, counted as cloud).
2. Three `tandem agent run` processes enroll with one-time tokens and serve SmolLM2-135M-Instruct
   as three device classes. Two are emulated: their engine is paced to the profile's predicted
   speed; pacing only slows down, so a profile faster than this machine runs at this machine's speed.
3. `tandem devices list` shows the fleet; then the SDK sends requests with different budgets,
   one burst concurrently, and a table shows where each ran with predicted and measured timings.
4. Everything is shut down with SIGTERM and the exit codes are checked.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tandem import Budget, Client, GenerateResult, TandemError

TANDEM = [sys.executable, "-m", "tandem_cli"]
AGENTS = [  # (name, profile, emulated)
    ("pi-kitchen", "raspberry-pi-5", True),
    ("orin-lab", "jetson-orin-nano", True),
    ("vm-office", "cpu-2core", False),
]
CHAT_MODEL, CLOUD_MODEL = "smollm2-135m-instruct", "gemma3-270m"


@dataclass(frozen=True)
class Job:
    label: str
    prompt: str | list[dict[str, str]]
    budget: Budget
    max_tokens: int = 24


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


JOBS = [
    Job("chat, no budget", chat("What is the capital of France?"), Budget()),
    Job("chat, TTFT <= 80 ms", chat("Name a primary colour."), Budget(ttft_ms=80)),
    Job("completion, energy <= 1 J", "The three primary colours are", Budget(energy_j=1.0)),
    Job("chat, energy <= 2 J", chat("Say hello."), Budget(energy_j=2.0)),
    Job("chat, TPOT <= 5 ms, best effort", chat("Count to three."), Budget(tpot_ms=5, best_effort=True)),
]
BURST = [
    Job(f"burst {i + 1}/3, TTFT <= 300 ms", chat(q), Budget(ttft_ms=300))
    for i, q in enumerate(["What is 2 + 2?", "Name a fruit.", "What colour is the sky?"])
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_line(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """Read proc's stdout until a line containing marker; echo nothing. Raises on exit or timeout."""
    found: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if marker in line:
                found.append(line.strip())
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if not found:
        raise RuntimeError(f"no '{marker}' from {' '.join(proc.args[3:6])} within {timeout} s")  # type: ignore[index]
    return found[0]


def run_job(client: Client, job: Job) -> tuple[Job, GenerateResult | None, str]:
    model = CHAT_MODEL if not isinstance(job.prompt, str) else ""
    try:
        return job, client.generate(job.prompt, model=model, max_tokens=job.max_tokens, budget=job.budget), ""
    except TandemError as exc:
        return job, None, f"{type(exc).__name__}: {exc}"


def table(rows: list[tuple[Job, GenerateResult | None, str]], names: dict[str, str]) -> str:
    head = (
        f"{'request':<34} {'placement':<36} {'pred TTFT':>9} {'TTFT':>7} {'pred TPOT':>9} {'TPOT':>6} "
        f"{'energy J':>8}  answer"
    )
    lines = [head, "-" * len(head)]
    for job, r, err in rows:
        if r is None or r.placement is None:
            lines.append(f"{job.label:<34} {'rejected':<36} {err[:90]}")
            continue
        p = r.placement
        where = f"cloud/{p.profile}" if p.kind == "cloud" else f"{names.get(p.device_id, p.device_id)}/{p.profile}"
        where += " (emul.)" if p.emulated else ""
        over = "" if r.ttft_ms <= (job.budget.ttft_ms or 1e12) else " *"
        text = r.text.strip().replace("\n", " ")[:38]
        lines.append(
            f"{job.label:<34} {where:<36} {p.predicted_ttft_ms:>7.0f}ms {r.ttft_ms:>5.0f}ms"
            f" {p.predicted_tpot_ms:>7.1f}ms {r.tpot_ms:>4.0f}ms {r.energy_j:>8.2f}  {text}{over}"
        )
    return "\n".join(lines)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="tandem-run-"))
    port = free_port()
    hub_addr = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []
    print(f"== Tandem main job (work dir {work})")
    try:
        hub = subprocess.Popen(
            [
                *TANDEM,
                "hub",
                "up",
                "--data-dir",
                str(work / "hub"),
                "--listen",
                hub_addr,
                "--cloud-model",
                CLOUD_MODEL,
                "--cloud-profile",
                "cloud-cpu-2core",
                "--api-key-file",
                str(work / "api-key"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        procs.append(hub)
        print(wait_line(hub, "hub ready", 300))
        for name, profile, emulated in AGENTS:
            token = subprocess.run(
                [*TANDEM, "hub", "token", "create", "--data-dir", str(work / "hub")],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            ).stdout.strip()
            cmd = [
                *TANDEM,
                "agent",
                "run",
                "--hub",
                hub_addr,
                "--token",
                token,
                "--profile",
                profile,
                "--model",
                CHAT_MODEL,
                "--name",
                name,
                "--state-dir",
                str(work / name),
            ]
            agent = subprocess.Popen(
                cmd + (["--emulate"] if emulated else []),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            procs.append(agent)
            print(f"agent {name:<11} {profile:<17} {'EMULATED: paced to the profile' if emulated else 'real'}")
        key = (work / "api-key").read_text().strip()
        with Client(hub_addr, api_key=key, timeout=120) as client:
            deadline = time.time() + 120
            while sum(d.status == "online" for d in client.devices()) < len(AGENTS):
                if time.time() > deadline:
                    raise RuntimeError("agents did not come online within 120 s")
                time.sleep(0.5)
            names = {d.device_id: d.name for d in client.devices()}
            print("\n$ tandem devices list")
            listing = subprocess.run(
                [*TANDEM, "devices", "list", "--hub", hub_addr, "--api-key", key],
                capture_output=True,
                text=True,
                env=env,
            )
            print(listing.stdout.rstrip())
            rows = [run_job(client, job) for job in JOBS]
            with ThreadPoolExecutor(len(BURST)) as pool:
                rows += list(pool.map(lambda j: run_job(client, j), BURST))
        print("\n" + table(rows, names))
        print(
            "\n(emul.) = agent paced to its profile; pacing cannot run faster than this machine, so a profile "
            "faster than it (the Jetson) shows measured times above its prediction.\n"
            "* = measured TTFT over the budget. The burst runs three 'devices' on this 2-core machine at once, so\n"
            "its measured times include CPU contention that separate devices would not have. TTFT is measured at\n"
            "the hub; energy is the edge estimate (0 for the cloud)."
        )
        served = sum(r is not None for _, r, _ in rows)
        print(f"{served} of {len(rows)} requests served, {len(rows) - served} rejected with a named constraint")
    finally:
        codes = shutdown(procs)
    clean = all(c == 0 for c in codes)
    print(f"shut down: exit codes {codes} — {'clean' if clean else 'NOT clean'}")
    return 0 if clean else 1


def shutdown(procs: list[subprocess.Popen]) -> list[int]:
    """SIGTERM agents first, then the hub; kill whatever is still running after 15 s."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]


if __name__ == "__main__":
    sys.exit(main())
