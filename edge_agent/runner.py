"""Build and run an agent from command-line settings (`tandem agent run`)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from device_profiles import DeviceProfile, load_profile
from edge_agent import sdnotify
from edge_agent.agent import Agent, AgentConfig
from edge_agent.calibrate import cached_calibration
from edge_agent.ota import ServedLoader
from edge_agent.pacing import floor_pacer, profile_pacer
from edge_agent.power import detect
from models.bundle import bundle_version, load_bundle
from models.loaded import LoadedModel
from models.runtime import load
from models.serving import ServedModel
from models.threads import GOVERNOR
from partitioner.cost import served_model_cost
from partitioner.predict import faster_than_host
from tandem.files import private_dir

log = logging.getLogger("tandem.agent")


def build_agent(
    hub: str,
    profile: str,
    model: str,
    state_dir: Path,
    token: str | None = None,
    name: str = "edge-device",
    emulate: bool = False,
    pace_tpot_ms: float = 0.0,
    tls_ca: Path | None = None,
    engine: str | None = None,
    device: str = "cpu",
    quant: str | None = None,
    bundle: Path | None = None,
    agent_version: str = "",
) -> Agent:
    """An agent serving `model` as a `profile` device; with emulate, paced to the profile's speed.
    `engine` (torch, onnxruntime, tensorrt) on `device` computes the tokens, loading the model its
    own way; None: the model's own generator on CPU, at precision `quant` (models.runtime.QUANTS;
    None: the profile's `quant`, "source" unless it says otherwise), whose quantized layers decode
    on the CPU kernels (models.fast_decode.CpuDecoder). Raises ValueError (models.errors.InvalidRequest
    among them) for a device without an engine, or a quant the model cannot be served at.

    `bundle` (a models.bundle directory) is served under the name `model` at its own precision
    (models.runtime.load refuses a `quant` it does not hold). Over-the-air updates load their bundles
    as this serves its model: calibrated, paced the same way; `agent_version` is what the Hello reports."""
    prof = load_profile(profile)
    backend = None
    source = str(bundle) if bundle is not None else model
    if engine is not None:
        from edge_agent.engines.registry import make_engine

        backend = make_engine(engine, device)
        backend.load(source)
        loaded = backend.loaded
    elif device != "cpu":
        raise ValueError(f"device {device!r} needs an engine (--engine torch): the default generator runs on cpu")
    else:  # prepared for the CPU kernels as it loads (models.cpu.prepare_cpu)
        loaded = load(source, quant=quant or prof.quant)
    held = None if bundle is not None else quant or prof.quant  # a bundle holds its own precision
    cache = state_dir / "calibrations"
    GOVERNOR.start()  # its first look at the machine before the calibration and the first request
    served, notes = serve_model(model, loaded, backend, prof, held, emulate, pace_tpot_ms, cache)
    if bundle is not None:
        served.info["version"] = bundle_version(bundle)
    sensors = detect()
    notes.append(f"energy measured by {sensors[0].name}" if sensors else "energy estimated (no power sensor)")
    private_state_dir(state_dir)
    config = AgentConfig(
        hub=hub,
        profile=prof.name,  # a measured profile file keeps its class's name: the hub knows the class
        state_dir=state_dir,
        name=name,
        token=token,
        emulated=emulate,
        power_active_w=prof.power_active_w,
        tls_ca=tls_ca,
        power_sensor=sensors[0] if sensors else None,
        agent_version=agent_version,
    )
    agent = Agent(config, served, update_loader(engine, prof, emulate, pace_tpot_ms, cache))
    agent.notes = notes
    return agent


def update_loader(
    engine: str | None, prof: DeviceProfile, emulate: bool, pace_tpot_ms: float, cache: Path | None = None
) -> ServedLoader:
    """How an over-the-air update's bundle is served: as build_agent serves its model."""

    def load_update(name: str, bundle: Path) -> ServedModel:
        if engine is not None:
            raise ValueError(f"this agent computes on the {engine} engine; updates serve on the model's own generator")
        return serve_model(name, load_bundle(bundle), None, prof, None, emulate, pace_tpot_ms, cache)[0]

    return load_update


def serve_model(
    model: str,
    loaded: LoadedModel,
    backend: object,
    prof: DeviceProfile,
    quant: str | None,
    emulate: bool,
    pace_tpot_ms: float,
    cache: Path | None = None,
) -> tuple[ServedModel, list[str]]:
    """`loaded` served as `model`: warmed up, calibrated (without an engine) as precision `quant`
    (None: what it holds, as a bundle's) and paced as asked; with notes for people on what start-up
    found. `cache`: where start-up calibrations are kept and reused (edge_agent.calibrate)."""
    served = ServedModel(model, loaded, backend)  # warmed up, unpaced
    cost = served_model_cost(loaded.config, served.info["weight_bytes"])  # the router's own rule on what it advertises
    notes = [f"at {served.info['quant']}"]
    if backend is None:  # layer skipping and KV prediction run on the model's own route (the kernels')
        notes.append(loaded.attach_routers(model))
        notes.append(loaded.attach_predictors(model))
    if backend is None:  # the model's own generator: calibrated (engines are not profiled yet)
        held = quant or served.info["quant"]
        cal, how = cached_calibration(cache, served, model, held, "cpu", prof)  # unpaced: the host's speed
        served.info["calibration_json"] = cal.to_json()
        notes.append(how)
        if emulate and (gap := faster_than_host(prof, cost, cal)):
            notes.append(gap)
    if emulate:  # paced to what the hub predicts from its profile
        served.pacer = profile_pacer(prof, cost)
    if pace_tpot_ms > 0:  # a fixed floor per token, on top of any profile pacing (demos and failover tests)
        served.pacer = floor_pacer(served.pacer, pace_tpot_ms)
    return served, notes


def private_state_dir(state_dir: Path) -> None:
    """Make the agent's state directory (its credential, its telemetry spool, its calibrations)
    0700; one an earlier version left readable is tightened, its directories 0700 and files 0600."""
    private_dir(state_dir)
    for path in state_dir.rglob("*"):  # chmod, not private_file: a read-only file is tightened, not opened
        if not path.is_symlink() and path.stat().st_mode & 0o077:  # a link's target is not ours to change
            path.chmod(0o700 if path.is_dir() else 0o600)


async def run_until_signalled(agent: Agent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    supervisor = asyncio.create_task(sdnotify.supervise(agent.connected))  # systemd's READY=1 and watchdog
    try:
        await agent.run(stop)
    finally:
        supervisor.cancel()
        await asyncio.gather(supervisor, return_exceptions=True)
