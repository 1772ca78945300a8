"""Over-the-air updates, the agent's side: a command from the hub, its bundle fetched and verified.

The hub publishes an update command on the device's MQTT `commands` topic (cloud_hub.updates). The
agent fetches the bundle it names with `Registry.FetchBundle` into `<state dir>/bundles/.fetch-*`,
checks every file's size and SHA-256 as it completes and the manifest's SHA-256 against the
command's version, then moves the directory to `<state dir>/bundles/<version>/` (a bundle already
there is verified and reused). Loading it (models.bundle.load_bundle checks the manifest's
checksums again) and swapping it in are the agent's (edge_agent.agent.Agent.update).

Every failure is an `UpdateFailed` whose message says why; the model being served is untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from models.bundle import bundle_version, load_bundle
from models.serving import ServedModel
from tandem.files import private_dir
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

log = logging.getLogger("tandem.agent.ota")

_VERSION = re.compile(r"[0-9a-f]{64}")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
"""One component of a bundle file's path: no "..", no hidden or absolute names."""
MAX_DEPTH = 3
"""A bundle's files sit at most this deep (kvpred/d0.5/predictors.pt)."""


def _safe_path(name: str) -> bool:
    """A relative path of at most MAX_DEPTH plain components, e.g. "weights.pt", "routers/r0.2/routers.pt"."""
    parts = name.split("/")
    return len(parts) <= MAX_DEPTH and all(_PART.fullmatch(p) for p in parts)


ServedLoader = Callable[[str, Path], ServedModel]
"""(model name, verified bundle directory) -> the model ready to serve (warmed up, paced as the agent
paces). Called in a worker thread; raises anything to fail the update with its message."""


class UpdateFailed(Exception):
    """An update that cannot be carried out; its message is what the hub records."""


@dataclass(frozen=True)
class UpdateCommand:
    """What the hub asks for (cloud_hub.updates): serve `model` from the bundle of `version`."""

    command_id: str
    """The hub's id: FetchBundle asks for the bundle by it, the UpdateResult names it."""
    model: str
    """The name to serve the model under (a zoo name)."""
    quant: str
    """The bundle's precision, for messages."""
    version: str
    """SHA-256 of the bundle's manifest.json, lowercase hex."""

    @classmethod
    def from_payload(cls, payload: bytes) -> UpdateCommand:
        """Parse a command message. Raises ValueError saying what is wrong with it."""
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"command is not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("type") != "update":
            raise ValueError(f"not an update command: {str(data)[:100]}")
        fields = {k: data.get(k) for k in ("command_id", "model", "quant", "version")}
        missing = [k for k, v in fields.items() if not isinstance(v, str) or not v]
        if missing:
            raise ValueError(f"update command lacks {', '.join(missing)}")
        if not _VERSION.fullmatch(fields["version"]):
            raise ValueError(f"update command's version {fields['version'][:80]!r} is not a SHA-256")
        return cls(**fields)


async def fetch_bundle(channel: grpc.aio.Channel, metadata: tuple, command: UpdateCommand, bundles: Path) -> Path:
    """The bundle of `command`, verified, at `bundles/<version>`: reused when already there, else
    fetched from the hub. Raises UpdateFailed (a failed call, a file whose size or SHA-256 does not
    match, a manifest of another version); nothing half-fetched is left behind."""
    final = bundles / command.version
    if final.is_dir() and _is_version(final, command.version):
        return final
    private_dir(bundles)
    tmp = Path(tempfile.mkdtemp(dir=bundles, prefix=".fetch-"))
    try:
        stream = pb_grpc.RegistryStub(channel).FetchBundle(
            pb.FetchBundleRequest(command_id=command.command_id), metadata=metadata, timeout=600
        )
        await _receive(stream, tmp)
        if not _is_version(tmp, command.version):
            raise UpdateFailed(f"the bundle's manifest is not version {command.version[:12]}")
        if final.exists():  # a damaged earlier copy
            shutil.rmtree(final)
        tmp.rename(final)
    except grpc.aio.AioRpcError as exc:
        raise UpdateFailed(f"fetching the bundle failed: {exc.code().name}: {exc.details()}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class _File:
    """One file of the bundle being written, hashed as it is."""

    def __init__(self, into: Path, chunk: pb.BundleChunk, done: set[str]) -> None:
        if not _safe_path(chunk.path) or chunk.path in done:
            raise UpdateFailed(f"the hub sent a file named {chunk.path[:80]!r} (twice, or not a plain relative path)")
        self.name, self.size, self.sha256 = chunk.path, chunk.size, chunk.sha256
        self.written = 0
        self.digest = hashlib.sha256()
        (into / chunk.path).parent.mkdir(parents=True, exist_ok=True)
        self.out = (into / chunk.path).open("wb")

    def write(self, chunk: pb.BundleChunk) -> bool:
        """Append `chunk`; True once the file is complete and matches its SHA-256. Raises UpdateFailed."""
        if chunk.offset != self.written:
            raise UpdateFailed(f"{self.name}: chunk at offset {chunk.offset}, expected {self.written}")
        self.out.write(chunk.data)
        self.digest.update(chunk.data)
        self.written += len(chunk.data)
        if self.written > self.size:
            raise UpdateFailed(f"{self.name}: more than its {self.size} bytes")
        if self.written < self.size:
            return False
        self.out.close()
        if self.digest.hexdigest() != self.sha256:
            raise UpdateFailed(
                f"{self.name}: checksum mismatch: SHA-256 {self.digest.hexdigest()[:12]}…, expected {self.sha256[:12]}…"
            )
        return True


async def _receive(stream: AsyncIterator[pb.BundleChunk], into: Path) -> None:
    """Write the stream's chunks under `into`, checking each file when its last byte is in."""
    current: _File | None = None
    done: set[str] = set()
    try:
        async for chunk in stream:
            if current is not None and current.name != chunk.path:
                raise UpdateFailed(f"{current.name}: the hub moved on before its last byte")
            current = current or _File(into, chunk, done)
            if current.write(chunk):
                done.add(current.name)
                current = None
    finally:
        if current is not None:
            current.out.close()
    if current is not None:
        raise UpdateFailed(f"{current.name}: the transfer ended before its last byte")
    if "manifest.json" not in done:
        raise UpdateFailed("the bundle came without its manifest.json")


def _is_version(path: Path, version: str) -> bool:
    try:
        return bundle_version(path) == version
    except OSError:
        return False


def load_update(loader: ServedLoader, command: UpdateCommand, bundle: Path) -> ServedModel:
    """The verified bundle loaded and ready to serve as `command.model`, its ModelInfo.version set.
    Blocks (call it in a thread). Raises UpdateFailed."""
    try:
        served = loader(command.model, bundle)
    except Exception as exc:  # a bundle that does not verify or load, an engine that refuses it
        raise UpdateFailed(f"loading the bundle failed: {type(exc).__name__}: {exc}") from exc
    served.info["version"] = command.version
    return served


def bundle_served(like: ServedModel | None) -> ServedLoader:
    """The plain loader: models.bundle.load_bundle served by the model's own generator, paced as
    `like` (the model served before) was."""

    def load(name: str, path: Path) -> ServedModel:
        return ServedModel(name, load_bundle(path), pacer=like.pacer if like is not None else None)

    return load


def served_path(state_dir: Path) -> Path:
    return state_dir / "served.json"


def save_served(state_dir: Path, model: str, bundle: Path) -> None:
    """Remember the model an update swapped in, so that the agent serves it again after a restart
    (`tandem agent run` takes it over its configuration file's model; a --model or --bundle flag wins)."""
    tmp = state_dir / ".served.tmp"
    tmp.write_text(json.dumps({"model": model, "bundle": str(bundle)}))
    tmp.replace(served_path(state_dir))


def served_record(state_dir: Path) -> tuple[str, Path] | None:
    """(model name, bundle directory) of the last update that succeeded here, or None (none yet, or
    its bundle is gone)."""
    try:
        data = json.loads(served_path(state_dir).read_text())
        model, bundle = data["model"], Path(data["bundle"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (model, bundle) if (bundle / "manifest.json").is_file() else None
