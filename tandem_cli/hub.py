"""`tandem hub up|init|token create|apikey create`: run and administer a hub.

cloud_hub is imported inside each command: its server and service import torch (about 2 s on two
cores), which `tandem --help` and the other commands must not pay for.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tandem_cli.common import data_dir

if TYPE_CHECKING:
    from cloud_hub.server import HubConfig


def _hub_config(args: argparse.Namespace) -> HubConfig:
    from cloud_hub.hub_requests import Limits
    from cloud_hub.server import HubConfig  # lazy: imports torch (see the module docstring)

    limits = Limits(max_inflight=args.max_inflight, rate_per_s=args.rate_limit, rate_burst=args.rate_burst)
    return HubConfig(
        limits=limits,
        registry=args.registry,
        cloud_backend=args.cloud_backend,
        cloud_upstream_url=args.upstream_url,
        cloud_upstream_key=os.environ.get("TANDEM_UPSTREAM_API_KEY"),
        cloud_upstream_model=args.upstream_model,
        cloud_upstream_prompt=args.upstream_prompt,
        http_listen=args.http_listen,
        ui=not args.no_ui,
        tls_dir=(data_dir(args.data_dir, "hub") / "tls") if args.tls else None,
        device_listen=args.device_listen,
        data_dir=data_dir(args.data_dir, "hub"),
        listen=args.listen,
        cloud_model=args.cloud_model,
        cloud_profile=args.cloud_profile,
        cloud_quant=args.cloud_quant,
        mqtt=args.mqtt,
        calibrate=not args.no_calibration,
        admission_quantile=args.admission_quantile,
        router_policy=args.router_policy,
        placement_sources=args.placement_sources,
        moe2_table=Path(args.moe2_table) if args.moe2_table else None,
        moe2_gate=Path(args.moe2_gate) if args.moe2_gate else None,
    )


async def _serve(config: HubConfig, api_key_file: str | None) -> None:
    """Start the hub, optionally write a fresh API key, and serve until SIGINT or SIGTERM."""
    from cloud_hub.server import Hub  # lazy: imports torch (see the module docstring)

    hub = Hub(config)
    await hub.start()
    if api_key_file:
        key = hub.registry.create_api_key("hub-up")
        path = Path(api_key_file)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_TRUNC: tighten it before the key
            f.write(key)
    # What startup made (torch, protobuf descriptors: about 200k objects) lives as long as the hub:
    # frozen, a full collection no longer walks it (about 140 ms here, every stream stalled).
    gc.freeze()
    print(f"hub ready on {hub.address} (data in {config.data_dir})", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await hub.stop(grace=2.0)
    print("hub stopped", flush=True)


def cmd_hub_up(args: argparse.Namespace) -> int:
    asyncio.run(_serve(_hub_config(args), args.api_key_file))
    return 0


def cmd_hub_init(args: argparse.Namespace) -> int:
    from cloud_hub.pki import init_pki  # lazy: cryptography, needed by this command only

    directory = data_dir(args.data_dir, "hub") / "tls"
    try:
        paths = init_pki(directory, args.host or ["127.0.0.1", "localhost"])
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"CA: {paths['ca.pem']} (give this to agents and clients: --tls-ca)")
    print(f"hub certificate: {paths['hub.pem']} for {', '.join(args.host or ['127.0.0.1', 'localhost'])}")
    print("serve TLS with: tandem hub up --tls --data-dir ...")
    return 0


def cmd_hub_token(args: argparse.Namespace) -> int:
    from cloud_hub.registry import create_token  # lazy: imports torch (see the module docstring)
    from cloud_hub.store import open_store

    store = open_store(args.registry, data_dir(args.data_dir, "hub"))
    print(create_token(store, args.ttl))
    store.close()
    return 0


def cmd_hub_apikey(args: argparse.Namespace) -> int:
    from cloud_hub.registry import create_api_key  # lazy: imports torch (see the module docstring)
    from cloud_hub.store import open_store

    store = open_store(args.registry, data_dir(args.data_dir, "hub"))
    print(create_api_key(store, args.name))
    store.close()
    return 0


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def _sources(text: str) -> tuple[str, ...]:
    """--placement-sources: known source names, comma-separated, none twice."""
    from cloud_hub.placements import SOURCES  # lazy: imports torch (see the module docstring)

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SOURCES]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: name placement sources once each, comma-separated, from {', '.join(sorted(SOURCES))}"
        )
    return names


def _quantile(text: str) -> float:
    try:
        q = float(text)
    except ValueError:
        q = -1.0
    if not 0.5 <= q < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0.5, 1), got {text!r}")
    return q


def _register_up(hub: argparse._SubParsersAction) -> None:
    p = hub.add_parser("up", help="start the hub (and a managed Mosquitto) until interrupted")
    p.add_argument("--data-dir", help="registry and broker files (default: XDG data dir)")
    p.add_argument("--listen", default="127.0.0.1:50051")
    p.add_argument("--cloud-model", help="zoo model the hub serves itself (default: none)")
    p.add_argument(
        "--cloud-profile",
        default="cpu-2core",
        help="device profile of the hub's hardware: a name, or a file `tandem profile` measured (calibrated)",
    )
    p.add_argument(
        "--cloud-quant",
        default="source",
        choices=("source", "fp32", "int8", "int4"),  # models.runtime.QUANTS
        help="precision of the local cloud model (default source: each tensor at its GGUF's own)",
    )
    p.add_argument("--cloud-backend", default="local", help="local | openai (an OpenAI-compatible server)")
    p.add_argument(
        "--upstream-url", help="with --cloud-backend openai: the server's base URL (key: $TANDEM_UPSTREAM_API_KEY)"
    )
    p.add_argument("--upstream-model", help="the model's name on the upstream (default: --cloud-model)")
    p.add_argument(
        "--upstream-prompt",
        default="ids",
        choices=["ids", "text"],
        help="send prompts as token ids (vLLM, llama-server) or text (llama-cpp-python, TGI)",
    )
    p.add_argument("--mqtt", default="managed", help="managed | none | host:port of an external broker")
    p.add_argument("--api-key-file", help="write a fresh API key here (0600) at start-up")
    p.add_argument("--registry", default="sqlite", help="sqlite | sqlite:///path | postgresql://… (replicas)")
    p.add_argument("--http-listen", help="host:port for the OpenAI-compatible API, /metrics and the fleet page (/ui)")
    p.add_argument("--no-ui", action="store_true", help="do not serve the fleet page under /ui")
    p.add_argument("--tls", action="store_true", help="serve gRPC over TLS with the certificate from `hub init`")
    p.add_argument(
        "--device-listen",
        metavar="HOST:PORT",
        help="with --tls and the CA from `hub init`: where devices dial with their certificates (mutual TLS); "
        "default the --listen host at the port the last start used (agents follow a change)",
    )
    p.add_argument(
        "--max-inflight",
        type=_count,
        default=512,
        help="requests served at once (held for a device included); beyond it RESOURCE_EXHAUSTED / 429 (default 512)",
    )
    p.add_argument(
        "--rate-limit",
        type=_rate,
        default=0.0,
        metavar="RPS",
        help="requests per second each API key may start; beyond it RESOURCE_EXHAUSTED / 429 (default 0: no limit)",
    )
    p.add_argument(
        "--rate-burst",
        type=_count,
        default=0,
        metavar="B",
        help="requests a key may start at once (default: one second's worth of --rate-limit)",
    )
    p.add_argument(
        "--admission-quantile",
        type=_quantile,
        default=0.95,
        metavar="Q",
        help="admit a request when this quantile of the device's measured/predicted ratios still fits its budget "
        "(default 0.95)",
    )
    p.add_argument(
        "--no-calibration",
        action="store_true",
        help="route on the profiles' roofline alone and admit on the mean (what hubs did before; for comparison)",
    )
    p.add_argument(
        "--router-policy",
        choices=["budget", "moe2"],
        default="budget",
        help="how requests are placed: budget (edge first, least energy, then latency) or moe2 (the exact MoE² "
        "expert selection; needs --moe2-table)",
    )
    p.add_argument("--moe2-table", metavar="FILE", help="the gate's expert table (tandem experts train writes it)")
    p.add_argument(
        "--moe2-gate",
        metavar="FILE",
        help="the gate tandem experts train saves (its table is --moe2-table): rank each request's experts by the "
        "gate's weights for its own prompt (default: its mean weights, the same for every prompt)",
    )
    p.add_argument(
        "--placement-sources",
        type=_sources,
        default=("edge", "cloud"),
        metavar="LIST",
        help="where requests may run, comma-separated: edge (each agent alone), cloud (the hub's model), split "
        "(an agent's first layers, then the hub's model: it needs a local --cloud-model the agent serves at the "
        "same precision) (default: edge,cloud)",
    )
    p.set_defaults(func=cmd_hub_up)


def register(sub: argparse._SubParsersAction) -> None:
    hub = sub.add_parser("hub", help="run and administer a hub").add_subparsers(dest="hub_command", required=True)
    _register_up(hub)
    p = hub.add_parser("init", help="create the deployment's CA and the hub's TLS certificate")
    p.add_argument("--data-dir")
    p.add_argument("--host", action="append", help="host name or IP the hub is reached at (repeatable)")
    p.set_defaults(func=cmd_hub_init)
    token = hub.add_parser("token", help="enrollment tokens").add_subparsers(dest="token_command", required=True)
    p = token.add_parser("create", help="print a one-time enrollment token")
    p.add_argument("--data-dir")
    p.add_argument("--registry", default="sqlite")
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds until the token expires")
    p.set_defaults(func=cmd_hub_token)
    apikey = hub.add_parser("apikey", help="SDK API keys").add_subparsers(dest="apikey_command", required=True)
    p = apikey.add_parser("create", help="print a new API key")
    p.add_argument("--data-dir")
    p.add_argument("--registry", default="sqlite")
    p.add_argument("--name", default="default")
    p.set_defaults(func=cmd_hub_apikey)
