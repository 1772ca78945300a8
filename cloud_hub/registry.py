"""The hub's registry: enrollment, credentials and API keys, and the devices it knows.

Plain logic over a `SQLStore` (SQLite or PostgreSQL) and the live `Fleet`; the gRPC servicers
translate to and from it. Errors are `cloud_hub.errors.HubError`s. Secrets are stored hashed
(`cloud_hub.auth`) and shown once, when they are made.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cloud_hub import auth
from cloud_hub.errors import InvalidRequest, NotFound, Unauthenticated
from cloud_hub.fleet import Fleet
from cloud_hub.pki import DeviceCA, admit_csr, sign_device_csr
from cloud_hub.store import DeviceRecord, SecretStore, SQLStore
from device_profiles import ProfileError, load_profile
from models.config import ModelConfig
from tandem.v1 import tandem_pb2 as pb

log = logging.getLogger("tandem.hub")


@dataclass(frozen=True)
class MqttAccess:
    """How agents reach the broker; the hub adds each enrolled device as a broker user."""

    host: str
    port: int
    add_user: Callable[[str, str], None] | None = field(repr=False, default=None)
    """Registers (username, password) with the broker; None for an external broker."""
    remove_user: Callable[[str], object] | None = field(repr=False, default=None)
    """Removes a username from the broker (closing its session); None for an external broker."""
    tls_port: int = 0
    """The broker's TLS listener for devices (client certificates); 0: none, `port` is for everyone."""


def create_token(store: SecretStore, ttl_s: float) -> str:
    """A one-time enrollment token valid for ttl_s seconds; only its hash is stored."""
    if not ttl_s > 0:
        raise InvalidRequest(f"token lifetime must be positive, got {ttl_s}")
    token = auth.new_secret("token")
    store.add_token(auth.lookup_key(token), time.time() + ttl_s)
    return token


def create_api_key(store: SecretStore, name: str) -> str:
    """A new SDK API key; only its hash is stored, so this is the one time it is shown."""
    key = auth.new_secret("api_key")
    store.add_api_key(auth.lookup_key(key), name)
    return key


def model_config(m: pb.ModelInfo) -> ModelConfig:
    """The config a server advertised for a model; raises InvalidRequest naming the model when it is
    not one the cost model can read."""
    try:
        return ModelConfig(**json.loads(m.config_json))
    except Exception as exc:  # malformed JSON, unknown fields, invalid sizes
        raise InvalidRequest(f"model {m.name!r}: config_json is not a valid model config ({exc})") from exc


class Registry:
    def __init__(
        self,
        store: SQLStore,
        fleet: Fleet,
        mqtt: MqttAccess | None,
        token_ttl_s: float = 3600.0,
        device_ca: DeviceCA | None = None,
    ) -> None:
        self.store, self.fleet, self.mqtt = store, fleet, mqtt
        self.token_ttl_s = token_ttl_s
        self.device_ca = device_ca
        """Signs each enrolled device's certificate (mutual TLS); None: devices get none."""
        # API keys (lookup digests) the store has confirmed. Keys are never revoked (the store cannot
        # delete one), so a confirmed key stays valid and later requests skip the database (a round
        # trip to PostgreSQL for replicas, on the event loop). Were revocation added, it must clear this.
        self._api_keys: set[str] = set()

    # -- secrets ---------------------------------------------------------------------------------

    def create_token(self, ttl_s: float | None = None) -> str:
        return create_token(self.store, ttl_s or self.token_ttl_s)

    def issue_token(self, ttl_s: float = 0.0) -> tuple[str, float]:
        """An operator's enrollment token (Registry.CreateToken) and when it expires (Unix time); a
        lifetime of 0 is the hub's default. Raises InvalidRequest for a negative lifetime."""
        ttl_s = ttl_s or self.token_ttl_s
        return create_token(self.store, ttl_s), time.time() + ttl_s

    def create_api_key(self, name: str) -> str:
        return create_api_key(self.store, name)

    def check_api_key(self, key: str | None) -> None:
        """Raises Unauthenticated for a missing or unknown key."""
        if not key:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        lookup = auth.lookup_key(key)
        if lookup in self._api_keys:
            return
        if not self.store.has_api_key(lookup):
            raise Unauthenticated("invalid API key")
        self._api_keys.add(lookup)

    def known_api_key(self, lookup: str) -> bool:
        """Whether an API key's lookup digest (auth.lookup_key) is one of this hub's (the fleet page
        keeps only the digest of the key it logged in with)."""
        if lookup in self._api_keys:
            return True
        if not lookup or not self.store.has_api_key(lookup):
            return False
        self._api_keys.add(lookup)
        return True

    # -- devices ---------------------------------------------------------------------------------

    def enroll(
        self, token: str, name: str, profile: str, models: list[pb.ModelInfo], emulated: bool, csr: bytes = b""
    ) -> pb.EnrollResponse:
        """Register a device with a one-time token: its id, credential and broker login, and with a
        device CA its certificate for `csr` (CN = its id) and the CA.

        Raises InvalidRequest for an unknown profile, a bad name, a model config the cost model
        cannot read (refused now, not at routing time) or, with a device CA, a missing or bad CSR;
        PermissionDenied when the hub cannot sign (no ca.key); Unauthenticated for a spent or wrong
        token. Every refusal but the last leaves the token unspent."""
        try:
            load_profile(profile)
        except ProfileError as exc:
            raise InvalidRequest(f"unknown or invalid device profile {profile!r}: {exc}") from exc
        if not name or len(name) > 128:
            raise InvalidRequest("device name must be 1-128 characters")
        for m in models:
            model_config(m)
        admit_csr(self.device_ca, csr)
        status = self.store.consume_token(auth.lookup_key(token or ""), time.time())
        if status != "ok":
            raise Unauthenticated(f"enrollment token {status}")
        device_id = "dev-" + secrets.token_hex(6)
        credential = auth.new_secret("credential")
        models_json = tuple(model_record(m) for m in models)
        record = DeviceRecord(device_id, name, profile, auth.hash_secret(credential), models_json, emulated)
        certificate, ca = b"", b""
        if self.device_ca is not None:  # the CSR passed admit_csr above
            certificate, ca = sign_device_csr(self.device_ca, csr, device_id), self.device_ca.certificate
        self.store.add_device(record)
        mqtt = pb.MqttInfo(topic_prefix=f"tandem/v1/devices/{device_id}")
        if self.mqtt is not None:
            password = secrets.token_urlsafe(24)
            if self.mqtt.add_user is not None:
                self.mqtt.add_user(device_id, password)
            mqtt = pb.MqttInfo(
                host=self.mqtt.host,
                port=self.mqtt.port,
                username=device_id,
                password=password,
                topic_prefix=mqtt.topic_prefix,
                tls_port=self.mqtt.tls_port,
            )
        log.info("enrolled %s (%s, profile %s)", device_id, name, profile)
        return pb.EnrollResponse(
            device_id=device_id, credential=credential, mqtt=mqtt, certificate=certificate, ca_certificate=ca
        )

    def authenticate_device(self, device_id: str | None, credential: str | None) -> DeviceRecord:
        record = self.store.get_device(device_id or "")
        if record is None or not credential or not auth.check_secret(credential, record.credential_hash):
            raise Unauthenticated("unknown device or wrong device credential")
        return record

    def deregister(self, record: DeviceRecord) -> None:
        session = self.fleet.sessions.get(record.device_id)
        if session is not None:
            self.fleet.detach(session)
        self.store.remove_device(record.device_id)

    def revoke(self, device_id: str) -> None:
        """An operator's revocation: the device's work channel ends, its credential and broker login are
        gone, so it can neither reconnect nor publish. Raises NotFound for an unknown device. Blocks
        while the managed broker reloads its users (call it off the event loop)."""
        record = self.store.get_device(device_id)
        if record is None:
            raise NotFound(f"device {device_id!r} is not registered")
        self.deregister(record)
        if self.mqtt is not None and self.mqtt.remove_user is not None:
            self.mqtt.remove_user(device_id)
        log.info("revoked %s (%s)", device_id, record.name)

    def devices(self) -> list[pb.Device]:
        out = []
        agents, updates = self.store.agent_versions(), self.store.latest_updates()
        for r in self.store.list_devices():
            update = updates.get(r.device_id)
            t = self.fleet.telemetry.get(r.device_id)
            session = self.fleet.sessions.get(r.device_id)
            out.append(
                pb.Device(
                    device_id=r.device_id,
                    name=r.name,
                    profile=r.profile,
                    # The replica holding a device's work channel knows best; others read the registry.
                    status=self.fleet.status_of(r.device_id) if r.device_id in self.fleet.sessions else r.status,
                    models=[model_info(m) for m in r.models],
                    last_seen_unix=max(r.last_seen, t.at if t else 0.0),
                    load=t.load if t else 0.0,
                    queue_depth=t.queue_depth if t else 0,
                    emulated=r.emulated,
                    connected=session is not None,
                    agent_version=agents.get(r.device_id, ""),
                    update=update.summary() if update is not None else "",
                )
            )
        return out


def model_info(record: dict) -> pb.ModelInfo:
    """A registry row's model as the wire shows it: without its config, and without the fields this
    hub does not know (a newer replica wrote the row: a rolling upgrade shares one registry)."""
    known = pb.ModelInfo.DESCRIPTOR.fields_by_name
    return pb.ModelInfo(**{k: v for k, v in record.items() if k != "config_json" and k in known})


def model_record(m: pb.ModelInfo) -> dict:
    """What the registry keeps of a model a device serves (from its enrollment, then its latest Hello)."""
    return {
        "name": m.name,
        "arch": m.arch,
        "n_layers": m.n_layers,
        "quant": m.quant,
        "engine": m.engine,
        "weight_bytes": m.weight_bytes,
        "config_json": m.config_json,
        "version": m.version,
        "skip_ratios": list(m.skip_ratios),
        "kv_variants": [
            {
                "depth": v.depth,
                "aux_layers": list(v.aux_layers),
                "agreement": v.agreement,
                "bpb_ratio": v.bpb_ratio,
                "prefill_share": v.prefill_share,
            }
            for v in m.kv_variants
        ],
        "skip_variants": [{"ratio": v.ratio, "layers": v.layers, "agreement": v.agreement} for v in m.skip_variants],
    }
