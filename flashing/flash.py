"""`tandem agent flash`: the steps, in order, that put an agent and its model on a device.

    connect      open the target (ssh:// or dir:)
    facts        read the device: architecture, OS, Python, memory, disk, compiler, GPU
    payload      build (or reuse from the cache) the bundle, the agent's wheel, the wheelhouse
    pre-flight   refuse, before anything is copied, what does not fit or cannot run there
    token        a fresh one-time enrollment token from the hub (first flash of a device only)
    copy         resumable, checksummed: files already there are skipped
    install      the dependencies' venv (once per lock), the wheel into the free A/B slot, its config
    switch       current -> the new slot, previous -> the old one; (re)start the service
    health       the hub lists the device online at the new version, and a request pinned to it
                 answers; else switch back, restart, and wait for the old version to come back

Every failure raises FlashError with the step it happened in; nothing half-installed is left
running: a failure before the switch leaves the running slot untouched, one after it rolls back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from device_profiles import ProfileError, load_profile
from flashing.facts import DeviceFacts, Requirements, gather_facts, preflight
from flashing.lock import DevicePlatform, LockError
from flashing.payload import Payload, PayloadError, agent_config, build_payload
from flashing.target import Target, TargetError, open_target
from flashing.transfer import sync
from flashing.wheels import WheelError
from models.errors import TandemModelError
from tandem import AsyncClient, TandemError

# Seconds the new agent has to enroll (or reconnect), come online and answer a request: it loads
# its model and runs its start-up calibration first (about 15 s for SmolLM2 on 2 cores).
HEALTH_TIMEOUT_S = 180.0


class FlashError(Exception):
    """A flash that stopped; `step` names where, the message says why and what to do."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


@dataclass(frozen=True)
class FlashRequest:
    """What the operator asked for (the `tandem agent flash` options)."""

    target: str
    """ssh://user@host[:port][/root] or dir:/root."""
    hub: str
    """host:port of the hub, as the device will dial it."""
    api_key: str
    """The operator's API key at the hub: for the enrollment token and the health check."""
    profile: str = "cpu-2core"
    model: str = "smollm2-135m-instruct"
    quant: str | None = None
    """None: the profile's default precision."""
    name: str = ""
    """The device's name at the hub (default: the target's host)."""
    identity: str | None = None
    known_hosts: str | None = None
    tls_ca: Path | None = None
    """The deployment's CA, when the hub serves TLS: copied to the device, which trusts it."""
    wheel: Path | None = None
    """Ship this agent wheel instead of building one from this checkout."""
    dry_run: bool = False
    health_timeout_s: float = HEALTH_TIMEOUT_S


@dataclass
class FlashResult:
    """What a flash did: its pre-flight report, bytes copied, the slot and the device id."""

    report: str = ""
    plan: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    files_skipped: int = 0
    slot: str = ""
    device_id: str = ""
    agent_version: str = ""
    rolled_back: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


Progress = Callable[[str, int, int], None]  # (step or file name, done, total)


async def device_side(target: Target, *args: str, timeout: float = 600.0) -> dict:
    """Run flashing/device_side.py on the device (it is copied there first) and read its JSON."""
    script = target.path("bin/device_side.py")
    out = await target.run(["python3", str(script), "--root", str(target.root), *args], timeout=timeout, check=False)
    try:
        answer = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}
    except ValueError:
        answer = {}
    if out.rc != 0 or "error" in answer:
        raise TargetError(answer.get("error") or f"device_side {' '.join(args)} exited {out.rc}: {out.stderr[-1500:]}")
    return answer


async def wait_healthy(client: AsyncClient, device_id: str, model: str, version: str, timeout_s: float) -> str:
    """Wait until the hub lists `device_id` online with an open work channel at agent `version`,
    and a request for `model` pinned to it answers; returns the id. Raises TimeoutError saying
    what was last seen."""
    deadline, last = time.monotonic() + timeout_s, f"the hub does not list {device_id}"
    while True:
        try:
            found = [d for d in await client.devices() if d.device_id == device_id]
        except TandemError as exc:
            last, found = f"the hub did not answer: {exc}", []
        for d in found:
            if not (d.status == "online" and d.connected and d.agent_version == version):
                last = f"{device_id} is {d.status} at agent version {d.agent_version or '?'}, not {version}"
                continue
            try:
                await client.generate("Hello", model=model, device=device_id, max_tokens=2, timeout=60)
                return device_id
            except TandemError as exc:
                last = f"{device_id} is online but its health request failed: {exc}"
        if time.monotonic() >= deadline:
            raise TimeoutError(last)
        await asyncio.sleep(1.0)


def default_name(target_url: str) -> str:
    if target_url.startswith("dir:"):
        return PurePosixPath(target_url[4:]).name or "device"
    host = target_url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    return host.split(":")[0] or "device"


async def connect(request: FlashRequest) -> Target:
    try:
        target = open_target(request.target, request.identity, request.known_hosts)
        await target.run(["true"], timeout=30)
    except ValueError as exc:
        raise FlashError("connect", str(exc)) from exc
    except TargetError as exc:
        raise FlashError("connect", str(exc)) from exc
    return target


RUNTIME_BYTES = 600_000_000
"""Memory an agent takes besides its model's weights: the interpreter, torch and its allocator, gRPC,
the KV cache of a few requests (an agent serving SmolLM2 int4 here: about 480 MB resident, of which
the weights are 100 MB)."""


@dataclass
class _Clock:
    """Reports each step as it starts and records how long each took."""

    progress: Progress
    seconds: dict[str, float] = field(default_factory=dict)
    current: str = ""
    since: float = 0.0

    def step(self, name: str) -> None:
        self.stop()
        self.current, self.since = name, time.monotonic()
        self.progress(name, 0, 0)

    def stop(self) -> None:
        if self.current:
            self.seconds[self.current] = round(time.monotonic() - self.since, 2)
            self.current = ""


async def _missing_bytes(target: Target, payload: Payload) -> int:
    """Bytes of the payload not yet on the device (a file of the right size counts as there: the
    copy checks its checksum later)."""
    sizes = await asyncio.gather(*(target.size(target.path(f.remote)) for f in payload.files))
    return sum(f.size for f, size in zip(payload.files, sizes, strict=True) if size != f.size)


async def _requirements(target: Target, request: FlashRequest, payload: Payload, python: str) -> Requirements:
    deps_ready = await target.size(target.path(f"deps/{payload.lock_digest}/.ready")) is not None
    return Requirements(
        model=request.model,
        resident_bytes=payload.model_resident_bytes,
        runtime_bytes=RUNTIME_BYTES,
        payload_bytes=await _missing_bytes(target, payload),
        installed_bytes=0 if deps_ready else payload.installed_bytes,
        python=python,
        backend="cpu",  # the agent's default engine: our kernels on the CPU
    )


def _plan(request: FlashRequest, payload: Payload, target: Target, enrolled: bool, slot: str) -> list[str]:
    mb = payload.transfer_bytes / 1e6
    return [
        f"plan for {request.target} (install root {target.root}):",
        f"  model     {request.model} at {payload.quant} ({payload.model_resident_bytes / 1e6:.0f} MB of weights)",
        f"  payload   {len(payload.files)} files, {mb:.0f} MB (files already there are skipped)",
        f"  agent     {payload.agent_version} on deps/{payload.lock_digest[:12]} into slot {slot}",
        f"  enroll    {'no: the device is enrolled (its state is kept)' if enrolled else 'a fresh one-time token'}",
        f"  hub       {request.hub} as {request.name!r}, profile {request.profile}",
        *(f"  note      {n}" for n in payload.notes),
    ]


async def _free_slot(target: Target) -> str:
    """The A/B slot a new release goes into: the one `R/current` does not point at ("a" at first).
    Read with readlink, not device_side.py: before the first copy the device has no script."""
    out = await target.run(["readlink", str(target.path("current"))], check=False)
    return "a" if out.stdout.strip().endswith("slots/b") or out.rc != 0 else "b"


async def _device_id(target: Target) -> str | None:
    """The id the device enrolled as (its state's credentials.json), or None before enrollment."""
    path = target.path("state/credentials.json")
    if await target.size(path) is None:
        return None
    try:
        return str(json.loads(await target.read(path))["device_id"])
    except (ValueError, KeyError) as exc:
        raise FlashError("health", f"{path} on the device is not a credentials file ({exc})") from exc


async def _wait_online(target: Target, client: AsyncClient, model: str, version: str, timeout_s: float) -> str:
    """wait_healthy for the device's own id (read from its state once it has enrolled), failing
    early when the device's service manager reports a crash loop."""
    deadline, last = time.monotonic() + timeout_s, "the agent never enrolled"
    while time.monotonic() < deadline:
        status = await device_side(target, "status")
        if status.get("crash_loop"):
            raise TimeoutError(f"the agent is in a crash loop (last exit {status.get('last_exit')}; see log/agent.log)")
        device_id = await _device_id(target)
        if device_id is not None:
            try:
                return await wait_healthy(client, device_id, model, version, min(5.0, deadline - time.monotonic()))
            except TimeoutError as exc:
                last = str(exc)
        await asyncio.sleep(1.0)
    raise TimeoutError(last)


async def _payload(target: Target, request: FlashRequest, facts: DeviceFacts) -> Payload:
    """Build the payload in a worker thread (the bundle loads the model: seconds of CPU)."""
    quant = request.quant or load_profile(request.profile).quant
    try:
        if facts.glibc is None:
            raise LockError(
                f"the device's C library is {facts.libc.strip() or 'unknown'}: only glibc (manylinux) is shipped"
            )
        platform = DevicePlatform(python=facts.python_minor, machine=facts.arch, glibc=facts.glibc)
        return await asyncio.to_thread(build_payload, request.model, quant, platform, target.root, wheel=request.wheel)
    except (LockError, PayloadError, WheelError, TandemModelError) as exc:
        raise FlashError("payload", str(exc)) from exc


async def _copy(target: Target, request: FlashRequest, payload: Payload, progress: Progress) -> tuple[int, int]:
    files = payload.transfers()
    if request.tls_ca is not None:
        files.append((request.tls_ca, "state/ca.pem", None))
    report = await sync(target, files, progress=lambda done, total, name: progress("copy", done, total))
    return report.bytes_sent, report.files_skipped


async def _write_config(target: Target, request: FlashRequest, payload: Payload, slot: str, token: str | None) -> str:
    """The slot's agent.json, written under R/incoming/ (stage copies it into the slot)."""
    tls_ca = target.path("state/ca.pem") if request.tls_ca is not None else None
    config = agent_config(
        payload,
        target.root,
        slot,
        hub=request.hub,
        profile=request.profile,
        model=request.model,
        name=request.name,
        token=token,
        tls_ca=tls_ca,
    )
    remote = "incoming/agent.json"
    await target.write(target.path(remote), 0, [config.to_json()])
    return remote


async def _install(target: Target, payload: Payload, slot: str, config: str) -> None:
    await device_side(target, "prepare-deps", "--lock-digest", payload.lock_digest, timeout=900)
    await device_side(
        target,
        "stage",
        "--slot",
        slot,
        "--wheel",
        payload.wheel_remote,
        "--lock-digest",
        payload.lock_digest,
        "--bundle",
        payload.bundle_remote,
        "--config",
        config,
    )


async def _roll_back(target: Target, client: AsyncClient, model: str, timeout_s: float, why: str) -> str:
    """Switch back to the previous slot and wait for it; returns FlashError's message."""
    try:
        status = await device_side(target, "rollback")
    except TargetError:  # no previous slot: a first flash that failed leaves nothing running
        await device_side(target, "stop")
        return f"{why}; there is no previous version to roll back to, so the agent was stopped"
    await device_side(target, "restart")
    old = (await device_side(target, "status")).get("version") or ""
    try:
        device_id = await _wait_online(target, client, model, old, timeout_s)
    except TimeoutError as exc:
        return f"{why}; rolled back to slot {status['current']}, which did not come back either: {exc}"
    return f"{why}; rolled back to slot {status['current']} (agent {old}): {device_id} is online again"


async def flash(request: FlashRequest, progress: Progress | None = None) -> FlashResult:
    """Flash `request.target` (see the module docstring). Raises FlashError."""
    clock, result = _Clock(progress or (lambda *_: None)), FlashResult()
    clock.step("connect")
    target = await connect(request)
    try:
        clock.step("facts")
        try:
            facts = await gather_facts(target)
            profile = load_profile(request.profile)
        except (TargetError, ProfileError) as exc:
            raise FlashError("facts", str(exc)) from exc
        clock.step("payload")
        payload = await _payload(target, request, facts)
        clock.step("pre-flight")
        report = preflight(facts, profile, await _requirements(target, request, payload, facts.python_minor))
        enrolled = await _device_id(target) is not None
        slot = await _free_slot(target)
        result.report, result.plan, result.slot = report.render(), _plan(request, payload, target, enrolled, slot), slot
        if not report.ok:
            raise FlashError("pre-flight", "refused; nothing was copied.\n" + report.render())
        if request.dry_run:
            return result
        async with AsyncClient(request.hub, api_key=request.api_key, tls_ca=_str(request.tls_ca)) as client:
            clock.step("token")
            token = None if enrolled else (await client.create_enrollment_token(3600)).token
            clock.step("copy")
            result.bytes_sent, result.files_skipped = await _copy(target, request, payload, clock.progress)
            clock.step("install")
            await _install(target, payload, slot, await _write_config(target, request, payload, slot, token))
            clock.step("switch")
            await device_side(target, "activate", "--slot", slot)
            await device_side(target, "restart")
            clock.step("health")
            try:
                result.device_id = await _wait_online(
                    target, client, request.model, payload.agent_version, request.health_timeout_s
                )
            except TimeoutError as exc:
                why = f"the new agent ({payload.agent_version}) did not come online: {exc}"
                raise FlashError(
                    "health", await _roll_back(target, client, request.model, request.health_timeout_s, why)
                ) from exc
        result.agent_version = payload.agent_version
    except TargetError as exc:
        raise FlashError(clock.current or "flash", str(exc)) from exc
    except TandemError as exc:
        raise FlashError(clock.current or "flash", f"the hub refused: {exc}") from exc
    finally:
        clock.stop()
        result.seconds = clock.seconds
        await target.close()
    return result


async def rollback(request: FlashRequest, progress: Progress | None = None) -> FlashResult:
    """`tandem agent flash --rollback`: switch the device to its previous slot and wait for it."""
    clock, result = _Clock(progress or (lambda *_: None)), FlashResult(rolled_back=True)
    clock.step("connect")
    target = await connect(request)
    try:
        clock.step("switch")
        result.slot = (await device_side(target, "rollback"))["current"]
        await device_side(target, "restart")
        result.agent_version = (await device_side(target, "status")).get("version") or ""
        clock.step("health")
        async with AsyncClient(request.hub, api_key=request.api_key, tls_ca=_str(request.tls_ca)) as client:
            try:
                result.device_id = await _wait_online(
                    target, client, request.model, result.agent_version, request.health_timeout_s
                )
            except TimeoutError as exc:  # the slot we left was running: go back to it
                why = f"slot {result.slot} (agent {result.agent_version}) did not come online: {exc}"
                raise FlashError(
                    "health", await _roll_back(target, client, request.model, request.health_timeout_s, why)
                ) from exc
    except TargetError as exc:
        raise FlashError(clock.current or "rollback", str(exc)) from exc
    finally:
        clock.stop()
        result.seconds = clock.seconds
        await target.close()
    return result


def _str(path: Path | None) -> str | None:
    return str(path) if path is not None else None
