"""Assemble and run the hub: registry store, MQTT broker and ingest, router, backends, gRPC.

    hub = Hub(HubConfig(data_dir=Path("hub-data"), cloud_model="gemma3-270m"))
    await hub.start()        # binds, starts a managed Mosquitto unless an external one is given
    ...
    await hub.stop(grace=2)  # drains streams, stops the broker

`tandem hub up` is a thin wrapper over this.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cloud_hub.backends import make_backend
from cloud_hub.broker import BrokerConfig, BrokerTls, ManagedBroker
from cloud_hub.broker_process import bindable, read_int
from cloud_hub.calibrations import Calibrations, served_calibration
from cloud_hub.fleet import Fleet
from cloud_hub.hub_requests import Limits
from cloud_hub.interceptor import AdmissionInterceptor, DeviceCertInterceptor, ErrorInterceptor
from cloud_hub.metrics import HubMetrics
from cloud_hub.pki import DeviceCA, load_device_ca
from cloud_hub.placements import Placements, SourceContext, make_sources
from cloud_hub.registry import MqttAccess, Registry
from cloud_hub.router import BudgetRouter, Router
from cloud_hub.service import HubService
from cloud_hub.servicers import InferenceServicer, RegistryServicer, WorkChannelServicer
from cloud_hub.store import open_store
from cloud_hub.telemetry import TelemetryIngest
from cloud_hub.updates import BundleCache, MqttLogin, Updates
from device_profiles import load_profile
from tandem.files import private_file
from tandem.v1 import tandem_pb2_grpc as pb_grpc

log = logging.getLogger("tandem.hub")
SERVICES = ("tandem.v1.Inference", "tandem.v1.Registry", "tandem.v1.WorkChannel")


@dataclass(frozen=True)
class HubConfig:
    data_dir: Path
    """Registry database, broker files, logs."""
    listen: str = "127.0.0.1:50051"
    """gRPC address; port 0 picks a free one (see Hub.port)."""
    registry: str = "sqlite"
    """Registry database: "sqlite" (data_dir/registry.db), "sqlite:///path" or "postgresql://…" (replicas)."""
    cloud_model: str | None = None
    """Zoo model the hub serves itself; None = edge only."""
    cloud_backend: str = "local"
    """Serving backend for the cloud model (cloud_hub.backends.BACKENDS)."""
    cloud_upstream_url: str | None = None
    """OpenAI-compatible server (…/v1 base without the /v1) for cloud_backend "openai"."""
    cloud_upstream_key: str | None = field(default=None, repr=False)
    """API key for that server."""
    cloud_upstream_model: str | None = None
    """The model's name on that server (default: cloud_model)."""
    cloud_upstream_prompt: str = "ids"
    """How prompts are sent upstream: "ids" (vLLM, llama-server, a hub) or "text" (llama-cpp-python, TGI)."""
    cloud_profile: str = "cpu-2core"
    """Device profile describing the hub's own hardware, for the cost model."""
    mqtt: str = "managed"
    """"managed" (start Mosquitto), "none" (no telemetry), or host:port of an external broker."""
    mqtt_username: str = ""
    """External broker only: the hub's user (needs tandem/v1/# access)."""
    mqtt_password: str = field(default="", repr=False)
    """External broker only: its password."""
    limits: Limits = field(default_factory=Limits)
    """Request size limits, token lifetime, the in-flight limit and the per-key rate limit."""
    placement_sources: tuple[str, ...] = ("edge", "cloud")
    """Kinds of placement the hub considers (cloud_hub.placements.SOURCES), asked in this order."""
    max_message_bytes: int = 4 * 1024 * 1024
    """gRPC message size limit, both directions; larger messages get RESOURCE_EXHAUSTED."""
    http_listen: str | None = None
    """host:port of the OpenAI-compatible HTTP API and /metrics; None = no HTTP server."""
    max_body_bytes: int = 1 << 20
    """Largest HTTP request body; larger ones get 413."""
    ui: bool = True
    """Serve the fleet page (cloud_hub.ui) under /ui on the HTTP server."""
    tls_dir: Path | None = None
    """Serve gRPC over TLS with hub.pem / hub.key from this directory (`tandem hub init`). With its ca.pem
    devices need their own certificates (mutual TLS on the device port and the broker's TLS listener)."""
    device_listen: str | None = None
    """With mutual TLS, host:port of the device port; None: the listen host, at the port kept in
    data_dir/device-port (reused when free, else a free one)."""
    cloud_quant: str = "source"
    """Precision the local cloud model is served at (models.runtime.QUANTS): "source" keeps each tensor
    at its GGUF's own precision on the CPU kernels."""
    calibrate: bool = True
    """Predict from devices' calibrations and admit on quantiles; False: the profiles' roofline alone and
    mean admission (what the hub did before; for comparison)."""
    ping_every_s: float = 5.0
    """How often the hub pings each agent's work channel to measure its round trip."""
    split_dtype: str = "float16"
    """How split stages send hidden states: "float32", "float16" or "int8" (models.stage.DTYPES)."""
    admission_quantile: float = 0.95
    """Admission multiplies each device's prediction by this quantile of its measured/predicted ratios
    (cloud_hub.calibrations); answers report it. In [0.5, 1)."""
    router_policy: str = "budget"
    """How requests are placed: "budget" (cloud_hub.router.BudgetRouter: edge first, then least energy, then
    lowest latency) or "moe2" (cloud_hub.moe2_router.Moe2Router: the exact MoE² expert selection; needs
    moe2_table)."""
    moe2_table: Path | None = None
    """The gate's expert table (partitioner.moe2.table; `tandem experts train` writes it beside the gate),
    for router_policy "moe2"."""
    moe2_gate: Path | None = None
    """The gate itself (`tandem experts train` saves it; the table beside it is moe2_table), for router_policy
    "moe2": each request's experts are ranked by the gate's weights for its own prompt (cloud_hub.moe2_gate).
    None: by the gate's mean weights over the calibration requests, the same for every prompt."""


ROUTER_POLICIES = ("budget", "moe2")
"""HubConfig.router_policy's choices."""


def make_router(cfg: HubConfig, metrics: HubMetrics | None = None) -> Router:
    """The router `cfg.router_policy` names; a MoE² router records its overhead in `metrics`. Raises
    ValueError for an unknown policy or "moe2" without a table, partitioner.moe2.table.TableError for a
    bad table, partitioner.moe2.gate.GateMismatch for a gate trained for another expert set than the
    table's (or damaged), FileNotFoundError for a missing file, and what loading the gate's feature
    embedder raises (EmbeddingsUnavailable, ModelNotPulled)."""
    if cfg.router_policy == "budget":
        if cfg.moe2_gate is not None or cfg.moe2_table is not None:
            raise ValueError(
                "moe2_table and moe2_gate are for router_policy 'moe2' (tandem hub up --router-policy moe2)"
            )
        return BudgetRouter(cfg.admission_quantile)
    if cfg.router_policy != "moe2":
        raise ValueError(f"unknown router_policy {cfg.router_policy!r}; available: {', '.join(ROUTER_POLICIES)}")
    if cfg.moe2_table is None:
        raise ValueError("router_policy 'moe2' needs moe2_table: the gate's expert table (tandem experts train)")
    from cloud_hub.moe2_gate import PromptGate  # only a MoE² hub loads them
    from cloud_hub.moe2_router import Moe2Router
    from partitioner.moe2.table import ExpertTable

    table = ExpertTable.load(Path(cfg.moe2_table))
    gate = PromptGate.load(Path(cfg.moe2_gate), table) if cfg.moe2_gate is not None else None
    observe = metrics.observe_moe2_overhead if metrics is not None else None
    return Moe2Router(table, cfg.admission_quantile, gate=gate, observe=observe)


class Hub:
    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.store = open_store(config.registry, config.data_dir)
        self.fleet = Fleet()
        self.broker: ManagedBroker | None = None
        self.ingest: TelemetryIngest | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.device_ca: DeviceCA | None = load_device_ca(config.tls_dir) if config.tls_dir is not None else None
        """The deployment's CA when devices need certificates (tls_dir has ca.pem); None: they do not."""
        self.device_port = 0
        """The port where devices dial with their certificate (mutual TLS); 0 without it."""
        self.service: HubService | None = None
        self.registry: Registry | None = None
        self.updates: Updates | None = None
        self._mqtt_login: tuple[str, str] = ("", "")
        self._health_task: asyncio.Task | None = None
        self._http = None
        self._http_task: asyncio.Task | None = None
        self.http_port = 0

    async def start(self) -> None:
        cfg = self.config
        metrics = HubMetrics()
        router = make_router(cfg, metrics)  # first: a bad policy, table or gate fails before anything starts
        mqtt = await asyncio.to_thread(self._start_broker)
        if mqtt is not None:
            await self._start_ingest()
        options = {}
        if cfg.cloud_backend == "openai":
            if not cfg.cloud_upstream_url:
                raise ValueError("cloud_backend 'openai' needs cloud_upstream_url")
            options = {
                "base_url": cfg.cloud_upstream_url,
                "api_key": cfg.cloud_upstream_key,
                "upstream_model": cfg.cloud_upstream_model,
                "prompt_format": cfg.cloud_upstream_prompt,
            }
        if cfg.cloud_backend == "local":
            options = {"quant": cfg.cloud_quant}
        cloud = None
        if cfg.cloud_model:
            cloud = await asyncio.to_thread(make_backend, cfg.cloud_backend, cfg.cloud_model, **options)
        profile = load_profile(cfg.cloud_profile) if cloud else None
        self.registry = Registry(self.store, self.fleet, mqtt, cfg.limits.token_ttl_s, device_ca=self.device_ca)
        login = MqttLogin(*self._mqtt_access(), *self._mqtt_login) if mqtt is not None else None
        self.updates = Updates(self.store, self.fleet, login, BundleCache(cfg.data_dir / "bundles"))
        self.fleet.calibrations = Calibrations(self.store, cfg.admission_quantile, cfg.calibrate)
        if cloud is not None and profile is not None:  # a profiled cloud (`tandem profile`) is predicted by it
            cal = served_calibration(profile, cloud.model_info())
            self.fleet.calibrations.set_calibration("cloud", cloud.model, cal)
        sources = make_sources(cfg.placement_sources, SourceContext(self.fleet, cloud, profile))
        self.service = HubService(self.fleet, Placements(sources, self.fleet), router, cloud, cfg.limits, metrics)
        self.service.split_dtype = cfg.split_dtype
        if self.ingest is not None:
            self.ingest.on_message_count = self.service.metrics.telemetry_messages.inc
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
        ]
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor()]
        if self.service.rate is not None:  # the per-key rate limit, before any handler runs
            interceptors.insert(0, AdmissionInterceptor(self.service.admit, ("/tandem.v1.Inference/Generate",)))
        if self.device_ca is not None:  # outermost: a call naming a device needs that device's certificate
            interceptors.insert(0, DeviceCertInterceptor())
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        self._bind()  # before the servicers: the Enroll answer and each Welcome name the device port
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(self.registry, self.service), self.server)
        registry = RegistryServicer(self.registry, self.updates, device_port=self.device_port)
        pb_grpc.add_RegistryServicer_to_server(registry, self.server)
        channel = WorkChannelServicer(
            self.registry, ping_every_s=cfg.ping_every_s, updates=self.updates, device_port=self.device_port
        )
        pb_grpc.add_WorkChannelServicer_to_server(channel, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.server.start()
        if cfg.http_listen:
            await self._start_http(cfg.http_listen)
        self._health_task = asyncio.create_task(self._track_health())
        log.info("hub listening on port %d", self.port)

    def _bind(self) -> None:
        """The gRPC port (TLS with tls_dir) and, with the deployment's CA, the device port, which
        requires a client certificate from that CA. Two ports because gRPC Python can require a client
        certificate on a port or not ask for one at all: Enroll (its token is its credential) and SDK
        calls (API keys) stay on the first. Raises RuntimeError when a port cannot be bound."""
        cfg, server = self.config, self.server
        assert server is not None
        if cfg.tls_dir is None:
            self.port = server.add_insecure_port(cfg.listen)
        else:
            key, cert = (cfg.tls_dir / "hub.key").read_bytes(), (cfg.tls_dir / "hub.pem").read_bytes()
            self.port = server.add_secure_port(cfg.listen, grpc.ssl_server_credentials([(key, cert)]))
        if self.port == 0:
            raise RuntimeError(f"could not bind {cfg.listen}")
        if self.device_ca is None:
            return
        if self.device_ca.key is None:
            log.warning("%s has no ca.key: enrolled devices connect, new ones are refused", cfg.tls_dir)
        mutual = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=self.device_ca.certificate, require_client_auth=True
        )
        listen = cfg.device_listen or self._saved_device_listen()
        self.device_port = server.add_secure_port(listen, mutual)
        if self.device_port == 0:
            raise RuntimeError(f"could not bind the device port {listen}")
        path = cfg.data_dir / "device-port"
        private_file(path, create=True)
        path.write_text(f"{self.device_port}\n")

    def _saved_device_listen(self) -> str:
        """The listen host at the device port the last start on this data_dir used, if it is free now
        (agents saved it), else at a free one."""
        host = self.config.listen.rsplit(":", 1)[0]
        saved = read_int(self.config.data_dir / "device-port")
        free = saved is not None and 0 < saved <= 65535 and bindable(host.strip("[]"), saved)
        return f"{host}:{saved if free else 0}"

    async def _start_http(self, listen: str) -> None:
        import socket

        import uvicorn

        from cloud_hub.openai_api import create_app

        host, _, port = listen.rpartition(":")
        # IPPROTO_TCP, not 0: asyncio (3.11) sets TCP_NODELAY only then; else each response waits ~40 ms
        # for the client's delayed acknowledgement
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        self.http_port = sock.getsockname()[1]
        app = create_app(self.registry, self.service, self.config.max_body_bytes, self.config.ui, self.address)
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self._http = uvicorn.Server(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # re-raises why it did not start
            await asyncio.sleep(0.02)

    @property
    def http_address(self) -> str:
        return f"{(self.config.http_listen or '').rpartition(':')[0]}:{self.http_port}"

    async def _track_health(self) -> None:
        """Health reflects readiness: Inference serves when some placement can take a request."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        while True:
            ready = self.service is not None and bool(self.service.placements.models())
            await self.health.set("tandem.v1.Inference", serving if ready else not_serving)
            for name in ("", "tandem.v1.Registry", "tandem.v1.WorkChannel"):
                await self.health.set(name, serving)
            await asyncio.sleep(0.5)

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def _start_broker(self) -> MqttAccess | None:
        """Start the managed broker (or take the external one's address); None without MQTT."""
        cfg = self.config
        if cfg.mqtt == "none":
            return None
        if cfg.mqtt == "managed":
            # Its port is kept in its data directory and it dies with this process (cloud_hub.broker),
            # so a hub restarted after a crash serves the same address. Devices wait for the ingest.
            self.broker = ManagedBroker(BrokerConfig(data_dir=cfg.data_dir / "mqtt", tls=self._broker_tls()))
            self.broker.start(hold_devices=True)
            self._mqtt_login = (self.broker.hub_username, self.broker.hub_password)
            b = self.broker
            return MqttAccess(b.host, b.port, b.add_user, b.remove_user, tls_port=b.tls_port)
        host, _, port = cfg.mqtt.rpartition(":")
        self._mqtt_login = (cfg.mqtt_username, cfg.mqtt_password)
        return MqttAccess(host, int(port), None)

    def _broker_tls(self) -> BrokerTls | None:
        """With the deployment's CA, the broker's TLS listener for devices: hub.pem serves as its
        certificate (devices dial it at the name they dial the hub at), on the hub's listen host."""
        tls = self.config.tls_dir
        if tls is None or self.device_ca is None:
            return None
        host = self.config.listen.rsplit(":", 1)[0].strip("[]")
        return BrokerTls(tls / "ca.pem", tls / "hub.pem", tls / "hub.key", host=host)

    async def _start_ingest(self) -> None:
        """Subscribe to all devices' telemetry; the client runs in this loop and calls back directly."""
        access = self._mqtt_access()
        fleet, store = self.fleet, self.store

        def on_status(device_id: str, status: str) -> None:
            fleet.mqtt_status[device_id] = status
            store.set_status(device_id, fleet.status_of(device_id), time.time())

        self.ingest = TelemetryIngest(
            access[0], access[1], *self._mqtt_login, on_telemetry=fleet.update_telemetry, on_status=on_status
        )
        await self.ingest.start()
        if self.broker is not None:  # subscribed: what devices publish from now on reaches us
            await asyncio.to_thread(self.broker.admit_devices)

    def _mqtt_access(self) -> tuple[str, int]:
        if self.broker is not None:
            return self.broker.host, self.broker.port
        host, _, port = self.config.mqtt.rpartition(":")
        return host, int(port)

    async def stop(self, grace: float = 2.0) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._http is not None:
            if self._http.config.app.state.ui is not None:
                self._http.config.app.state.ui.closing.set()  # its event streams end now, not at the grace's end
            self._http.should_exit = True
            await self._http_task
        for session in list(self.fleet.sessions.values()):
            self.fleet.detach(session)  # ends each work channel; agents reconnect to the next hub
        if self.server is not None:
            await self.server.stop(grace)
        if self.ingest is not None:
            await self.ingest.stop()
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
        self.store.close()
