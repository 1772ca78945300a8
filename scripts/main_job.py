"""The main job (`make run`): a hub, three edge agents and a mix of budgeted requests, on this machine.

1. `tandem profile --quick` measures this host serving gemma3-270m, the hub's own "cloud" model
   (profile cloud-cpu-2core: this machine, counted as cloud), and writes a calibrated profile.
2. `tandem hub up` starts the hub with a managed Mosquitto and that profile.
3. Three `tandem agent run` processes enroll with one-time tokens and serve SmolLM2-135M-Instruct at
   its source precision (int4 on our kernels) as three device classes; each calibrates itself at
   start-up. Two are emulated: paced to their profile's roofline. Pacing can only slow an agent
   down, so a profile faster than this host is predicted at the host's speed, and the agent says so.
4. `tandem devices list` shows the fleet; then the SDK sends requests with different budgets one at
   a time, and a table shows where each ran with predicted and measured timings. A burst of three
   runs concurrently and is reported apart: three "devices" on two cores contend for the CPU, which
   separate devices would not.
5. Everything is shut down with SIGTERM and the exit codes are checked.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from scripts.fleet import TANDEM, Fleet
from tandem import Budget, Client, GenerateResult, TandemError

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
    Job("chat, TPOT <= 20 ms", chat("Name three rivers."), Budget(tpot_ms=20)),
    Job("completion, TTFT <= 150 ms", "Python is a programming language that", Budget(ttft_ms=150)),
    Job("chat, TPOT <= 5 ms, best effort", chat("Count to three."), Budget(tpot_ms=5, best_effort=True)),
]
BURST = [
    Job(f"burst {i + 1}/3, TTFT <= 300 ms", chat(q), Budget(ttft_ms=300))
    for i, q in enumerate(["What is 2 + 2?", "Name a fruit.", "What colour is the sky?"])
]


def run_job(client: Client, job: Job) -> tuple[Job, GenerateResult | None, str]:
    model = CHAT_MODEL if not isinstance(job.prompt, str) else ""
    try:
        return job, client.generate(job.prompt, model=model, max_tokens=job.max_tokens, budget=job.budget), ""
    except TandemError as exc:
        return job, None, f"{type(exc).__name__}: {exc}"


def kept(job: Job, r: GenerateResult) -> bool:
    """Every limit the budget set was met, as measured at the hub (energy as the answer reports it)."""
    b = job.budget
    return (
        (not b.ttft_ms or r.ttft_ms <= b.ttft_ms)
        and (not b.tpot_ms or r.tpot_ms <= b.tpot_ms)
        and (not b.energy_j or r.energy_j <= b.energy_j)
    )


def table(rows: list[tuple[Job, GenerateResult | None, str]], names: dict[str, str]) -> str:
    head = (
        f"{'request':<32} {'placement':<31} {'pred TTFT':>9} {'TTFT':>7} {'ratio':>5} {'pred TPOT':>9} "
        f"{'TPOT':>6} {'q':>4} {'energy J':>11} {'budget':>6}  answer"
    )
    lines = [head, "-" * len(head)]
    for job, r, err in rows:
        if r is None or r.placement is None:
            lines.append(f"{job.label:<32} {'rejected':<31} {err[:110]}")
            continue
        p = r.placement
        where = f"cloud/{p.profile}" if p.kind == "cloud" else f"{names.get(p.device_id, p.device_id)}/{p.profile}"
        where += " (emul.)" if p.emulated else ""
        has_budget = any((job.budget.ttft_ms, job.budget.tpot_ms, job.budget.energy_j))
        verdict = ("kept" if kept(job, r) else "OVER") if has_budget else "-"
        energy = f"{r.energy_j:.2f} {'meas' if r.energy_measured else 'est'}"
        text = r.text.strip().replace("\n", " ")[:30]
        lines.append(
            f"{job.label:<32} {where:<31} {p.predicted_ttft_ms:>7.0f}ms {r.ttft_ms:>5.0f}ms "
            f"{r.ttft_ms / p.predicted_ttft_ms:>5.2f} {p.predicted_tpot_ms:>7.1f}ms {r.tpot_ms:>4.1f}ms "
            f"{p.quantile:>4.2f} {energy:>11} {verdict:>6}  {text}"
        )
    return "\n".join(lines)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="tandem-run-"))
    print(f"== Tandem main job (work dir {work})")
    print(f"\n$ tandem profile --quick --model {CLOUD_MODEL} --base-profile cloud-cpu-2core --out cloud.yaml")
    cloud_profile = work / "cloud.yaml"
    done = subprocess.run(
        [*TANDEM, "profile", "--quick", "--model", CLOUD_MODEL, "--base-profile", "cloud-cpu-2core",
         "--out", str(cloud_profile)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        print(done.stdout[-2000:], done.stderr[-2000:])
        return 1
    print("\n".join(done.stdout.strip().splitlines()[-3:]))
    fleet = Fleet(work, CLOUD_MODEL, str(cloud_profile))
    with fleet:
        for name, profile, emulated in AGENTS:
            fleet.agent(name, profile, CHAT_MODEL, emulated)
        fleet.wait_online()
        print()
        for line in fleet.agent_lines.values():
            print(line)
        with Client(fleet.address, api_key=fleet.api_key, timeout=120) as client:
            print("\n$ tandem devices list")
            listing = subprocess.run(
                [*TANDEM, "devices", "list", "--hub", fleet.address, "--api-key", fleet.api_key],
                capture_output=True, text=True,
            )  # fmt: skip
            print(listing.stdout.rstrip())
            warm_up(client, fleet)
            rows = [run_job(client, job) for job in JOBS]
            with ThreadPoolExecutor(len(BURST)) as pool:
                burst = list(pool.map(lambda j: run_job(client, j), BURST))
        print("\nRequests one at a time:\n" + table(rows, fleet.names))
        print("\nThe burst, three at once (reported apart: see below):\n" + table(burst, fleet.names))
        print(
            "\n(emul.) = agent paced to its profile; a profile faster than this host is predicted at the host's "
            "speed (the agent says so above).\n"
            "pred = the hub's mean prediction; q = the quantile of that device's measured/predicted ratios that "
            "admission\nmultiplied it by; ratio = measured TTFT / predicted; budget = every limit set was kept "
            "(measured at the hub).\nThe burst runs three 'devices' on this 2-core host at once: their CPU "
            "contention is not in the queue model,\nwhich queues requests per device, so the burst is reported "
            "apart. Energy: 'meas' from a power sensor, 'est' from the profile."
        )
        report(rows, burst)
    clean = all(c == 0 for c in fleet.codes)
    print(f"shut down: exit codes {fleet.codes} — {'clean' if clean else 'NOT clean'}")
    return 0 if clean else 1


def warm_up(client: Client, fleet: Fleet, rounds: int = 3) -> None:
    """A few requests pinned to each placement, best effort, before the budgeted ones: a device's
    calibration was timed alone at start-up, and serving beside the hub and the other agents costs
    more; the hub refits each device online from what these measure (cloud_hub.calibrations)."""
    targets = [("cloud", "The capital of France is", "")] + [
        (device, chat("Say something about the weather."), CHAT_MODEL) for device in fleet.ids()
    ]
    errors = []
    for device, prompt, model in targets:
        for _ in range(rounds):
            r = client.generate(prompt, model=model, max_tokens=16, budget=Budget(best_effort=True), device=device)
            errors.append(abs(r.ttft_ms / r.placement.predicted_ttft_ms - 1))
    first, last = max(errors[::rounds]), max(errors[rounds - 1 :: rounds])
    print(
        f"\nwarm-up: {rounds} requests pinned to each of {len(targets)} placements, refitting each online "
        f"(TTFT off by {100 * first:.0f}% at most on the first request, {100 * last:.0f}% on the last)"
    )


def report(rows: list[tuple[Job, GenerateResult | None, str]], burst: list) -> None:
    served = [(j, r) for j, r, _ in rows if r is not None]
    budgeted = [(j, r) for j, r in served if any((j.budget.ttft_ms, j.budget.tpot_ms, j.budget.energy_j))]
    strict = [(j, r) for j, r in budgeted if not j.budget.best_effort]
    close = [r for _, r in served if r.placement and abs(r.ttft_ms / r.placement.predicted_ttft_ms - 1) <= 0.25]
    print(
        f"\n{len(served)} of {len(rows)} requests one at a time served, {len(rows) - len(served)} rejected with a "
        f"named constraint; {sum(kept(j, r) for j, r in strict)} of {len(strict)} served with a budget (not best "
        f"effort) kept it; measured TTFT within 25% of predicted for {len(close)} of {len(served)}."
    )
    b_served = [(j, r) for j, r, _ in burst if r is not None]
    print(
        f"The burst: {len(b_served)} of {len(burst)} served, {sum(kept(j, r) for j, r in b_served)} kept their budget."
    )


if __name__ == "__main__":
    sys.exit(main())
