"""Over-the-air model updates: an operator asks a device to serve another model.

    command_id = await updates.update_device("dev-1a2b", "smollm2-135m-instruct", "int4")

1. `update_device` checks the device and the model, prepares the model as a bundle on the hub
   (models.bundle, cached under `<data dir>/bundles` by model file and precision), records the
   command as pending in the registry and publishes it, QoS 1, on the device's MQTT topic
   `tandem/v1/devices/{id}/commands`: {"type": "update", "command_id", "model", "quant", "version"}.
2. The agent fetches the bundle with `Registry.FetchBundle` (`bundle_chunks`: only the device the
   command is for), each file in 1 MiB chunks that carry the file's SHA-256 as the manifest states
   it, so a file damaged anywhere after the hub built it is refused by the agent.
3. The agent swaps the model in between requests and answers on its work channel with an
   `UpdateResult` and a fresh `Hello`; `on_agent_message` records the outcome and replaces the
   session's models, so routing and ListDevices see the new model and its version.

Commands travel over MQTT only: a hub without a broker (`mqtt="none"`) refuses updates with
FAILED_PRECONDITION, as it does for a device that is offline (its broker session, which would hold
a QoS 1 message, ends with its connection). The hub publishes with paho-mqtt, connecting for each
command: commands are rare, unlike the telemetry the ingest's own client reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import paho.mqtt.client as mqtt

from cloud_hub.errors import HubError, InvalidRequest, NotFound, PermissionDenied, Unavailable
from cloud_hub.fleet import AgentSession, Fleet
from cloud_hub.registry import model_record
from cloud_hub.store import SQLStore, UpdateRecord
from device_profiles import ProfileError, load_profile
from models import zoo
from models.bundle import bundle_files, bundle_version, save_bundle
from models.errors import InvalidRequest as ModelInvalidRequest
from models.errors import ModelNotPulled, UnknownModel
from models.runtime import load
from tandem.files import private_dir
from tandem.v1 import tandem_pb2 as pb

log = logging.getLogger("tandem.hub.updates")

CHUNK_BYTES = 1 << 20
"""Bytes of a file a BundleChunk carries (well under the hub's 4 MiB message limit)."""
BUNDLE_QUANTS = ("fp32", "int8", "int4", "source")
"""Precisions a bundle holds (models.bundle; "source": each layer at its GGUF's own, bit widths mixed)."""


class UpdateRefused(HubError):
    """An update this hub cannot carry out now: no broker, the device offline, the model not pulled."""

    code, kind = grpc.StatusCode.FAILED_PRECONDITION, "failed_precondition"


@dataclass(frozen=True)
class MqttLogin:
    """Where the hub publishes commands, as which account (the hub's own: it may write every topic)."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)


def publish_command(login: MqttLogin, topic: str, payload: str, timeout_s: float = 5.0) -> None:
    """Publish `payload` at QoS 1 and wait for the broker's acknowledgement. Blocks (call it in a
    thread); raises Unavailable when the broker cannot be reached or does not acknowledge in time."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"{login.username}-cmd-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )
    client.username_pw_set(login.username, login.password)
    try:
        client.connect(login.host, login.port, keepalive=10)
    except OSError as exc:
        raise Unavailable(f"cannot reach the MQTT broker at {login.host}:{login.port}: {exc}") from exc
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise Unavailable(f"the MQTT broker did not acknowledge the command within {timeout_s:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()


class BundleCache:
    """Bundles the hub built for updates, one directory per model file and precision."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def path(self, gguf: Path, quant: str, model: str = "") -> Path:
        """Where the bundle of `gguf` at `quant` lives: keyed by the file's path, size and modification
        time (as models.runtime keys its prepared weights), so a replaced file gets a new bundle, and
        by what is trained for `model` (routers, predictors: models.zoo.trained_stamp), so retraining
        does too."""
        st = gguf.stat()
        trained = zoo.trained_stamp(model) if model else ""
        key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:{trained}".encode()).hexdigest()[:12]
        return self.root / f"{gguf.stem}-{quant}-{key}"

    def prepare(self, model: str, gguf: Path, quant: str) -> Path:
        """The bundle of `gguf` at `quant`, built on first use (seconds to minutes: call it in a thread).
        Two requests for the same bundle build it once."""
        out = self.path(gguf, quant, model)
        with self._guard:
            lock = self._locks.setdefault(out.name, threading.Lock())
        with lock:
            if not (out / "manifest.json").is_file():
                private_dir(self.root)
                loaded = load(gguf, quant=quant, prepare=False)
                try:  # its layer-skipping routers, where trained for it at this precision, go along
                    loaded.attach_routers(model)
                except ModelInvalidRequest as exc:
                    log.warning("the %s bundle of %s goes without routers: %s", quant, model, exc)
                try:  # and its KV predictors (models.kvpred), likewise
                    loaded.attach_predictors(model)
                except ModelInvalidRequest as exc:
                    log.warning("the %s bundle of %s goes without KV predictors: %s", quant, model, exc)
                save_bundle(loaded, out, source=model)
                log.info("built the %s bundle of %s in %s", quant, model, out)
        return out


class Updates:
    """Issues update commands, serves their bundles and records what devices report."""

    def __init__(self, store: SQLStore, fleet: Fleet, mqtt_login: MqttLogin | None, bundles: BundleCache) -> None:
        self.store, self.fleet, self.mqtt_login, self.bundles = store, fleet, mqtt_login, bundles

    # -- the operator's side -----------------------------------------------------------------------

    async def update_device(self, device_id: str, model: str, quant: str = "") -> str:
        """Send `device_id` a command to serve `model` at `quant` (empty: its profile's precision);
        returns the command's id once the broker has it.

        Raises NotFound for an unknown device or model, InvalidRequest for a bad precision,
        UpdateRefused (FAILED_PRECONDITION) without a broker, for an offline device or a zoo model not
        pulled on the hub, Unavailable when the broker does not take the command."""
        record = self.store.get_device(device_id)
        if record is None:
            raise NotFound(f"device {device_id!r} is not registered")
        quant = _bundle_quant(quant, record.profile)
        gguf = _model_file(model)
        if self.mqtt_login is None:
            raise UpdateRefused("over-the-air updates travel over MQTT, and this hub runs without a broker (mqtt none)")
        status = self.fleet.status_of(device_id) if device_id in self.fleet.sessions else record.status
        if status != "online":
            raise UpdateRefused(f"device {device_id!r} is offline: updates go to connected devices")
        bundle = await asyncio.to_thread(self.bundles.prepare, model, gguf, quant)
        version = await asyncio.to_thread(bundle_version, bundle)
        command = UpdateRecord("cmd-" + secrets.token_hex(8), device_id, model, quant, version, str(bundle))
        self.store.add_update(command)  # before publishing: a quick device's result must find it
        payload = json.dumps({"type": "update", "command_id": command.command_id, "model": model, "quant": quant,
                              "version": version})  # fmt: skip
        topic = f"tandem/v1/devices/{device_id}/commands"
        try:
            await asyncio.to_thread(publish_command, self.mqtt_login, topic, payload)
        except Unavailable as exc:
            self.store.finish_update(command.command_id, device_id, "failed", f"not sent: {exc}")
            raise
        log.info("update %s: %s to serve %s (%s, version %s)", command.command_id, device_id, model, quant,
                 version[:12])  # fmt: skip
        return command.command_id

    # -- the device's side ---------------------------------------------------------------------------

    async def bundle_chunks(self, device_id: str, command_id: str) -> AsyncIterator[pb.BundleChunk]:
        """The files of command `command_id`'s bundle (models.bundle.bundle_files: routers' and
        predictors' under their subdirectories too) in CHUNK_BYTES pieces, each file's in order and
        manifest.json last. Raises NotFound for an unknown command, PermissionDenied when it is
        another device's, Unavailable when this hub no longer has its bundle."""
        command = self.store.get_update(command_id)
        if command is None:
            raise NotFound(f"no update command {command_id!r}")
        if command.device_id != device_id:
            raise PermissionDenied(f"update command {command_id!r} is for another device")
        root = Path(command.bundle)
        try:
            checksums = bundle_files(json.loads((root / "manifest.json").read_text()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise Unavailable(f"the bundle of update {command_id!r} is no longer on this hub ({exc})") from exc
        # Each file's checksum as the manifest states it, and the manifest's as the command named it:
        # the device checks what it received against what the hub built, not against what it read now.
        for name, sha in [*checksums.items(), ("manifest.json", command.version)]:
            async for chunk in _file_chunks(root, name, sha):
                yield chunk

    def connected(self, session: AgentSession, hello: pb.Hello) -> None:
        """A work channel opened with `hello`: record the agent's version and the models it serves."""
        self.store.set_agent_version(session.device_id, hello.agent_version)
        self.store.set_models(session.device_id, tuple(model_record(m) for m in hello.models))

    def on_agent_message(self, session: AgentSession, msg: pb.AgentMessage) -> None:
        """The session's hook (AgentSession.on_control) for what is about the device, not a work: a
        Hello after the first (the agent swapped its models) and an UpdateResult."""
        kind = msg.WhichOneof("kind")
        if kind == "hello":
            self._hello_again(session, msg.hello)
        elif kind == "update":
            self._result(session, msg.update)

    def _hello_again(self, session: AgentSession, hello: pb.Hello) -> None:
        session.models = tuple(hello.models)
        session.offers = None  # routing candidates are rebuilt from the new models on the next request
        self.fleet.calibrations.attach(session.device_id, session.models)
        self.connected(session, hello)
        log.info("%s now serves %s", session.device_id, ", ".join(f"{m.name} ({m.quant})" for m in hello.models))

    def _result(self, session: AgentSession, result: pb.UpdateResult) -> None:
        status = "ok" if result.ok else "failed"
        message = result.message or (f"serving {result.model} version {result.version[:12]}" if result.ok else "")
        if not self.store.finish_update(result.command_id, session.device_id, status, message[:1000]):
            log.warning("%s reported on update %r, not a pending command of its own", session.device_id,
                        result.command_id)  # fmt: skip
            return
        log.info("update %s on %s: %s: %s", result.command_id, session.device_id, status, message)


def _bundle_quant(quant: str, profile: str) -> str:
    """The precision to build: `quant`, or the device profile's when empty. Raises InvalidRequest."""
    if not quant:
        try:
            quant = load_profile(profile).quant
        except ProfileError as exc:
            raise InvalidRequest(f"quant: empty, and the device's profile {profile!r} cannot be read ({exc})") from exc
    if quant not in BUNDLE_QUANTS:
        raise InvalidRequest(f"quant: {quant!r} has no bundle form; an update ships {', '.join(BUNDLE_QUANTS)} weights")
    return quant


def _model_file(model: str) -> Path:
    """The GGUF of zoo model (or path) `model` on the hub. Raises InvalidRequest, NotFound, UpdateRefused."""
    if not model:
        raise InvalidRequest("model: required (a zoo name)")
    try:
        return zoo.resolve(model)
    except UnknownModel as exc:
        raise NotFound(f"model: {exc}") from exc
    except ModelNotPulled as exc:
        raise UpdateRefused(f"model: {exc} (on the hub)") from exc


async def _file_chunks(root: Path, name: str, sha256: str) -> AsyncIterator[pb.BundleChunk]:
    path = root / name
    size = path.stat().st_size
    with path.open("rb") as f:
        offset = 0
        while True:
            data = await asyncio.to_thread(f.read, CHUNK_BYTES)
            if not data and offset:
                return
            yield pb.BundleChunk(path=name, offset=offset, data=data, size=size, sha256=sha256)
            offset += len(data)
            if offset >= size:
                return


__all__ = ["BUNDLE_QUANTS", "CHUNK_BYTES", "BundleCache", "MqttLogin", "UpdateRefused", "Updates", "publish_command"]
