"""What a flash copies to the device, built on the operator's machine and cached.

    <cache>/flash/agent/...        the agent's wheel (flashing.wheels)
    <cache>/flash/wheelhouse/...   its pinned dependencies for the device's platform (flashing.wheels)
    <cache>/flash/bundles/<key>/   the model bundle for (model, quant, GGUF digest): bundle/ + record.json

Everything lands under the install root R at a path that does not depend on the slot, so a file
already on the device (same path, same SHA-256) is never copied again:

    R/bin/device_side.py                 the device-side installer, with device_service.py, device_util.py
    R/tandem-agent.service               the systemd unit (flashing.unit), installed when systemd runs
    R/wheelhouse/<wheel>, requirements-<lock digest>.lock
    R/agents/<digest>/<agent wheel>      one folder per build: two builds share a wheel file name
    R/bundles/<key>/<bundle files>       `device_side.py stage` hard-links them into the slot

The agent's config (`agent_config`) holds the enrollment token and the slot's paths, so it is
made per flash, after the token, and staged with the slot (`stage --config`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from device_profiles import load_profile
from flashing import unit
from flashing.lock import DevicePlatform
from flashing.wheels import (
    AgentWheel,
    WheelFile,
    build_agent_wheel,
    build_wheelhouse,
    given_agent_wheel,
    lock_for,
    unpacked_bytes,
    wheel_file,
)
from models import zoo

if TYPE_CHECKING:
    from models.loaded import LoadedModel  # torch: imported where a bundle is built, not here

DEVICE_SCRIPTS = tuple(Path(__file__).with_name(f"{n}.py") for n in ("device_side", "device_service", "device_util"))
"""The device-side installer (stdlib only): device_side.py imports the other two from its own folder."""
Log = Callable[[str], None]


class PayloadError(Exception):
    """The payload cannot be built; the message says why and what to do."""


def flash_cache() -> Path:
    """<tandem cache>/flash: $TANDEM_CACHE_DIR, else $XDG_CACHE_HOME/tandem, else ~/.cache/tandem."""
    return zoo.cache_dir() / "flash"


@dataclass(frozen=True)
class PayloadFile:
    """One file to copy."""

    local: Path
    """Where it is on this machine."""
    remote: str
    """Its path under the install root R on the device."""
    sha256: str
    size: int


@dataclass(frozen=True)
class Bundle:
    """A cached model bundle and what pre-flight needs to know of it."""

    dir: Path
    quant: str
    """The precision the bundle holds ("int4", "int8", "fp32" or "source")."""
    key: str
    """Cache key: SHA-256 of (model, quant, GGUF digest, bundle format), 24 hex digits."""
    files: tuple[WheelFile, ...]
    resident_bytes: int
    """Weight bytes the agent holds in memory once the model is loaded (models.loaded.weight_bytes)."""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Payload:
    """Every file of a flash, and what the install and pre-flight steps need to know."""

    files: tuple[PayloadFile, ...]
    lock_digest: str
    """Names the device's dependency venv R/deps/<lock_digest> (`prepare-deps --lock-digest`)."""
    agent_version: str
    """The wheel's version and source digest; the agent reports it at the hub."""
    wheel_remote: str
    """The agent's wheel under R (`stage --wheel`)."""
    bundle_remote: str
    """The bundle's folder under R (`stage --bundle`)."""
    quant: str
    """What the bundle holds (the config's `quant`)."""
    transfer_bytes: int
    """The sum of the files' sizes (a first flash copies all of it)."""
    installed_bytes: int
    """Disk the install takes beyond the copied files: unpacked wheels (venv and slot)."""
    model_resident_bytes: int
    """Memory the model's weights take in the agent."""
    notes: tuple[str, ...] = ()
    """What the operator should know (e.g. a precision that could not be bundled)."""

    def transfers(self) -> list[tuple[Path, str, str]]:
        """(local, remote under R, sha256) for flashing.transfer.sync."""
        return [(f.local, f.remote, f.sha256) for f in self.files]


@dataclass(frozen=True)
class AgentConfig:
    """The agent's config file (`tandem agent run --config`): exactly these keys."""

    hub: str
    token: str | None
    profile: str
    model: str
    bundle: str
    """The slot's bundle folder on the device."""
    name: str
    state_dir: str
    tls_ca: str | None
    """The deployment's CA on the device, when the hub serves TLS."""
    quant: str
    agent_version: str

    def to_json(self) -> bytes:
        """The file's bytes; unset keys (None) are left out: the agent's reader takes strings only."""
        data = {k: v for k, v in asdict(self).items() if v is not None}
        return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


CONFIG_KEYS = frozenset(f.name for f in fields(AgentConfig))


def agent_config(
    payload: Payload,
    root: PurePosixPath,
    slot: str,
    *,
    hub: str,
    profile: str,
    model: str,
    name: str,
    token: str | None = None,
    tls_ca: PurePosixPath | None = None,
) -> AgentConfig:
    """The config for the agent staged into `slot` under `root` (device paths)."""
    return AgentConfig(
        hub=hub,
        token=token,
        profile=profile,
        model=model,
        bundle=str(root / "slots" / slot / "bundle"),
        name=name,
        state_dir=str(root / "state"),
        tls_ca=str(tls_ca) if tls_ca else None,
        quant=payload.quant,
        agent_version=payload.agent_version,
    )


def default_quant(profile: str) -> str:
    """The precision an agent of `profile` serves at unless the operator says otherwise."""
    return load_profile(profile).quant


def _gguf_digest(model: str) -> str:
    """The GGUF's SHA-256: the zoo's recorded one (checked at pull), else the file's own."""
    path = zoo.resolve(model)  # raises ModelNotPulled / UnknownModel with the command to run
    src = zoo.ZOO.get(model)
    return src.sha256 if src is not None else zoo.sha256_file(path)


def _same_model(a: LoadedModel, b: LoadedModel) -> bool:
    """Whether two loaded models hold the same tensors in the same quantized layout."""
    import torch  # lazy: only after the model's load has paid for it

    from models.quant import QuantLinear

    def layout(m: torch.nn.Module) -> list[tuple[str, int, int]]:
        return [(n, q.bits, q.group_size) for n, q in m.named_modules() if isinstance(q, QuantLinear)]

    sa, sb = a.model.state_dict(), b.model.state_dict()
    same_tensors = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return same_tensors and layout(a.model) == layout(b.model)


def _save_checked(model: str, quant: str, out: Path) -> int:
    """Save `model` at `quant` as a bundle at `out`, check it loads back as the same model, and
    return its resident weight bytes. A "source" model whose layers sit on several grids (Gemma's
    Q4_K_M: q4_k -> int4 beside q6_k -> int8) is a bundle as it is: the manifest records each
    layer's layout (models.bundle). Raises PayloadError for a bundle that does not load back the same."""
    from models.bundle import BundleError, load_bundle, save_bundle  # lazy: torch, ~2 s (tandem_cli.optimize)
    from models.errors import InvalidRequest
    from models.loaded import weight_bytes
    from models.runtime import load

    loaded = load(model, quant=quant, prepare=False)
    try:  # the model's layer-skipping routers, where trained for it at this precision, travel with it
        loaded.attach_routers(model)
    except InvalidRequest:  # stale routers (another precision or layer count) never block a flash
        loaded.routers = None
    try:  # and its KV predictors (models.kvpred), likewise
        loaded.attach_predictors(model)
    except InvalidRequest:  # stale or damaged predictors never block a flash either
        loaded.predictors = None
    save_bundle(loaded, out, source=model)
    try:
        same = _same_model(loaded, load_bundle(out, prepare=False))
    except BundleError as exc:
        raise PayloadError(f"{model} at {quant}: the bundle does not load back ({exc})") from exc
    if not same:
        raise PayloadError(f"{model} at {quant}: the bundle does not load back as the same model")
    return weight_bytes(loaded.model)


def build_bundle(model: str, quant: str, cache: Path | None = None, log: Log | None = None) -> Bundle:
    """The bundle of `model` (zoo name or GGUF path) at `quant`, built once per (model, quant,
    GGUF digest, what is trained for it). Raises ModelNotPulled/UnknownModel (models.errors) or
    PayloadError."""
    cache = cache or flash_cache()
    from models.bundle import FORMAT  # lazy: torch
    from models.zoo import trained_stamp  # what is trained for it (routers, predictors) goes in the bundle

    stamp = f"{model}\0{quant}\0{_gguf_digest(model)}\0{FORMAT}\0{trained_stamp(model)}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:24]
    entry = cache / "bundles" / key
    record_path = entry / "record.json"
    if not record_path.is_file():
        if log:
            log(f"building the {quant} bundle of {model}")
        shutil.rmtree(entry, ignore_errors=True)  # an entry without its record is half-built
        entry.mkdir(parents=True)
        resident = _save_checked(model, quant, entry / "bundle")
        record = {"quant": quant, "resident_bytes": resident, "notes": []}
        tmp = entry / "record.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, record_path)  # written last: the entry is complete
    record = json.loads(record_path.read_text())
    files = tuple(wheel_file(p) for p in sorted((entry / "bundle").rglob("*")) if p.is_file())  # routers/, kvpred/
    return Bundle(entry / "bundle", record["quant"], key, files, record["resident_bytes"], tuple(record["notes"]))


def _write_unit(cache: Path, root: PurePosixPath) -> Path:
    path = cache / "units" / hashlib.sha256(str(root).encode()).hexdigest()[:16] / unit.UNIT_NAME
    text = unit.render_unit(unit.UnitSpec(root))
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def _file(local: Path, remote: str, known: WheelFile | None = None) -> PayloadFile:
    known = known or wheel_file(local)
    return PayloadFile(local, remote, known.sha256, known.size)


def build_payload(
    model: str,
    quant: str,
    platform: DevicePlatform,
    root: PurePosixPath,
    *,
    wheel: Path | None = None,
    cache: Path | None = None,
    log: Log | None = None,
) -> Payload:
    """Build (or take from the cache) everything a flash of `model` at `quant` onto a device of
    `platform` with install root `root` copies. `wheel`: ship this agent wheel instead of one
    built from this checkout. Raises WheelError (flashing.wheels), PayloadError, or the models'
    errors for a model that is not pulled."""
    cache = cache or flash_cache()
    agent: AgentWheel = given_agent_wheel(wheel) if wheel else build_agent_wheel(cache, log=log)
    lock = lock_for(agent, platform)
    house = build_wheelhouse(lock, platform, cache, log=log)
    bundle = build_bundle(model, quant, cache, log=log)
    wheel_remote = f"agents/{agent.digest[:16]}/{agent.file.path.name}"
    files = [
        *(_file(script, f"bin/{script.name}") for script in DEVICE_SCRIPTS),
        _file(_write_unit(cache, root), unit.UNIT_NAME),
        _file(house.lock_file.path, f"wheelhouse/{house.lock_file.path.name}", house.lock_file),
        *(_file(w.path, f"wheelhouse/{w.path.name}", w) for w in house.wheels),
        _file(agent.file.path, wheel_remote, agent.file),
        *(_file(f.path, f"bundles/{bundle.key}/{f.path.relative_to(bundle.dir).as_posix()}", f) for f in bundle.files),
    ]
    installed = sum(unpacked_bytes(w.path) for w in (*house.wheels, agent.file))
    return Payload(
        files=tuple(files),
        lock_digest=lock.digest,
        agent_version=agent.agent_version,
        wheel_remote=wheel_remote,
        bundle_remote=f"bundles/{bundle.key}",
        quant=bundle.quant,
        transfer_bytes=sum(f.size for f in files),
        installed_bytes=installed,
        model_resident_bytes=bundle.resident_bytes,
        notes=bundle.notes,
    )
