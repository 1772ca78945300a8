"""The `tandem` command: model zoo and local generation.

Thin wrappers over importable code: each sub-command parses arguments, calls the library and
prints. Errors of the Tandem family print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from models.errors import TandemModelError


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def cmd_models_list(args: argparse.Namespace) -> int:
    from models import zoo

    root = Path(args.cache_dir) if args.cache_dir else None
    print(f"{'NAME':<24} {'PULLED':<7} DESCRIPTION")
    for src, pulled in zoo.list_models(root):
        print(f"{src.name:<24} {'yes' if pulled else 'no':<7} {src.description}")
    print(f"cache: {(root or zoo.cache_dir()) / 'models'}")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from models import zoo

    root = Path(args.cache_dir) if args.cache_dir else None
    for name in args.names:
        print(f"pulling {name} …", file=sys.stderr)
        path = zoo.pull(name, root, progress=_progress_bar(f"verify {name}"), force=args.force)
        print(f"{name}: {path} (sha256 verified)")
        if args.prepare:
            from models.runtime import load

            load(name)  # dequantizes once into the prepared cache, so later loads take about a second
            print(f"{name}: prepared")
    return 0


def _data_dir(value: str | None, leaf: str) -> Path:
    if value:
        return Path(value)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tandem" / leaf


def cmd_hub_up(args: argparse.Namespace) -> int:
    import asyncio
    import gc
    import signal

    from cloud_hub.server import Hub, HubConfig

    config = HubConfig(
        registry=args.registry,
        cloud_backend=args.cloud_backend,
        cloud_upstream_url=args.upstream_url,
        cloud_upstream_key=os.environ.get("TANDEM_UPSTREAM_API_KEY"),
        cloud_upstream_model=args.upstream_model,
        cloud_upstream_prompt=args.upstream_prompt,
        http_listen=args.http_listen,
        tls_dir=(_data_dir(args.data_dir, "hub") / "tls") if args.tls else None,
        data_dir=_data_dir(args.data_dir, "hub"),
        listen=args.listen,
        cloud_model=args.cloud_model,
        cloud_profile=args.cloud_profile,
        mqtt=args.mqtt,
    )

    async def serve() -> None:
        hub = Hub(config)
        await hub.start()
        if args.api_key_file:
            key = hub.service.create_api_key("hub-up")
            path = Path(args.api_key_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(key)
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

    asyncio.run(serve())
    return 0


def cmd_hub_init(args: argparse.Namespace) -> int:
    from cloud_hub.pki import init_pki

    directory = _data_dir(args.data_dir, "hub") / "tls"
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
    from cloud_hub.service import create_token
    from cloud_hub.store import open_store

    store = open_store(args.registry, _data_dir(args.data_dir, "hub"))
    print(create_token(store, args.ttl))
    store.close()
    return 0


def cmd_hub_apikey(args: argparse.Namespace) -> int:
    from cloud_hub.service import create_api_key
    from cloud_hub.store import open_store

    store = open_store(args.registry, _data_dir(args.data_dir, "hub"))
    print(create_api_key(store, args.name))
    store.close()
    return 0


def cmd_agent_run(args: argparse.Namespace) -> int:
    import asyncio

    from edge_agent.agent import EnrollmentRejected
    from edge_agent.engines.base import EngineUnavailable
    from edge_agent.runner import build_agent, run_until_signalled

    state = Path(args.state_dir) if args.state_dir else _data_dir(None, f"agent-{args.name}")
    try:
        agent = build_agent(
            args.hub,
            args.profile,
            args.model,
            state,
            args.token,
            args.name,
            args.emulate,
            args.pace_tpot_ms,
            tls_ca=Path(args.tls_ca) if args.tls_ca else None,
            engine=args.engine,
            device=args.device,
        )
    except (EngineUnavailable, ValueError) as exc:  # a backend or device this machine cannot run
        print(f"error: {exc}", file=sys.stderr)
        return 2
    on = f" on {args.engine} ({args.device})" if args.engine else ""
    print(f"agent {args.name}: {args.model} as {args.profile}{' (emulated)' if args.emulate else ''}{on}", flush=True)
    try:
        asyncio.run(run_until_signalled(agent))
    except EnrollmentRejected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _client(args: argparse.Namespace):
    from tandem import Client

    key = args.api_key or os.environ.get("TANDEM_API_KEY")
    return Client(args.hub, api_key=key, timeout=args.timeout, tls_ca=args.tls_ca)


def cmd_devices_list(args: argparse.Namespace) -> int:
    import time

    from tandem.errors import TandemError

    try:
        with _client(args) as client:
            devices = client.devices()
    except TandemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'ID':<17} {'NAME':<14} {'PROFILE':<18} {'STATUS':<8} {'MODEL':<34} {'LOAD':>5} {'LAST SEEN':>10}")
    for d in devices:
        ago = f"{time.time() - d.last_seen_unix:.0f}s ago" if d.last_seen_unix else "never"
        model = ",".join(m.name for m in d.models) + (" (emulated)" if d.emulated else "")
        print(f"{d.device_id:<17} {d.name[:14]:<14} {d.profile:<18} {d.status:<8} {model:<34} {d.load:>5.2f} {ago:>10}")
    return 0


def cmd_generate_remote(args: argparse.Namespace) -> int:
    from tandem import Budget
    from tandem.errors import TandemError

    budget = Budget(args.ttft_ms or 0.0, args.tpot_ms or 0.0, args.energy_j or 0.0, args.best_effort)
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    try:
        with _client(args) as client:
            stream = client.generate(
                prompt,
                stream=True,
                model=args.model or "",
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                stop=tuple(args.stop or ()),
                budget=budget,
            )
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except TandemError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    r = stream.result
    p = r.placement
    where = f"{p.kind} {p.device_id or ''} {p.profile} {p.model}" if p else "?"
    print(
        f"\n[{r.finish_reason}; {where}; TTFT {r.ttft_ms:.0f} ms, TPOT {r.tpot_ms:.1f} ms, {r.energy_j:.2f} J]",
        file=sys.stderr,
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.hub:
        return cmd_generate_remote(args)
    from models.runtime import load
    from models.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    if not args.prompt:
        raise SystemExit("error: a prompt is required")
    loaded = load(args.model or "smollm2-135m-instruct")
    gen = loaded.generator()
    chat = loaded.tokenizer.info.chat_template is not None and not args.raw
    prompt = [{"role": "user", "content": args.prompt}] if chat else args.prompt
    finish = None
    for ev in gen.stream([prompt], params):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        finish = ev.finish_reason or finish
    sys.stdout.write("\n")
    print(f"[finish: {finish}]", file=sys.stderr)
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    """Quantize and/or prune a model into a bundle; print its size, speed and quality."""
    import copy
    import time

    import torch
    from tqdm import tqdm

    from models.bundle import save_bundle
    from models.corpus import documents
    from models.eval import agreement, bits_per_byte, windows
    from models.prune import block_influence, prune_layers
    from models.quant import quantize_model, weight_bytes
    from models.runtime import LoadedModel, load
    from models.transformer import Step

    bits = {"none": None, "int8": 8, "int4": 4}[args.quant]
    steps = tqdm(total=5, desc="optimize", file=sys.stderr)
    base = load(args.model)
    steps.update(1)
    model = copy.deepcopy(base.model)
    if args.prune_layers:
        calib = windows(base.tokenizer, [d.text for d in documents("calibration", limit=8)], 256)
        kept = prune_layers(model, args.prune_layers, block_influence(model, calib))
        print(f"kept layers: {kept}", file=sys.stderr)
    steps.update(1)
    if bits:
        quantize_model(model, bits, args.group_size)
    steps.update(1)
    out = save_bundle(LoadedModel(model, base.tokenizer, base.path), Path(args.out), source=str(args.model))
    steps.update(1)
    evals = windows(base.tokenizer, [d.text for d in documents("eval", limit=4)], 256)
    q_base, q_new = bits_per_byte(base.model, base.tokenizer, evals), bits_per_byte(model, base.tokenizer, evals)
    agree = agreement(base.model, model, evals)
    with torch.inference_mode():
        model.setup_cache(1, 80)
        model(torch.tensor([[1] * 16]), Step.at(0, 16))
        start = time.perf_counter()
        for i in range(64):
            model(torch.tensor([[5]]), Step.at(16 + i, 1))
        tok_s = 64 / (time.perf_counter() - start)
    steps.update(1)
    steps.close()
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"bundle: {out} ({size / 1e6:.1f} MB on disk, weights {weight_bytes(model) / 1e6:.1f} MB, "
        f"{model.cfg.n_layers} layers)"
    )
    print(f"speed: {tok_s:.1f} decode tok/s (this machine, {torch.get_num_threads()} threads)")
    print(
        f"quality: {q_new.bpb:.4f} bits/byte vs {q_base.bpb:.4f} for the base ({q_new.bpb / q_base.bpb - 1:+.2%}), "
        f"top-1 agreement {agree:.3f}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem edge-cloud inference")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the model zoo").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("list", help="list zoo models and whether they are pulled")
    p.add_argument("--cache-dir", help="cache directory (default: $TANDEM_CACHE_DIR or XDG cache)")
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("pull", help="fetch and verify zoo models")
    p.add_argument("names", nargs="+")
    p.add_argument("--cache-dir")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.add_argument("--prepare", action="store_true", help="also dequantize into the prepared-weights cache")
    p.set_defaults(func=cmd_models_pull)

    p = sub.add_parser("optimize", help="quantize and/or prune a model into a bundle")
    p.add_argument("--model", default="smollm2-135m-instruct", help="zoo name or .gguf path")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="int4")
    p.add_argument("--group-size", type=int, help="quantization group (default: per channel for int8, 32 for int4)")
    p.add_argument("--prune-layers", type=int, default=0, help="drop this many layers (least block influence)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.set_defaults(func=cmd_optimize)

    hub = sub.add_parser("hub", help="run and administer a hub").add_subparsers(dest="hub_command", required=True)
    p = hub.add_parser("up", help="start the hub (and a managed Mosquitto) until interrupted")
    p.add_argument("--data-dir", help="registry and broker files (default: XDG data dir)")
    p.add_argument("--listen", default="127.0.0.1:50051")
    p.add_argument("--cloud-model", help="zoo model the hub serves itself (default: none)")
    p.add_argument("--cloud-profile", default="cpu-2core", help="device profile of the hub's hardware")
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
    p.add_argument("--http-listen", help="host:port for the OpenAI-compatible API and /metrics")
    p.add_argument("--tls", action="store_true", help="serve gRPC over TLS with the certificate from `hub init`")
    p.set_defaults(func=cmd_hub_up)
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

    agent = sub.add_parser("agent", help="the edge agent").add_subparsers(dest="agent_command", required=True)
    p = agent.add_parser("run", help="enroll (first time), connect to the hub and serve")
    p.add_argument("--hub", required=True, help="host:port of the hub")
    p.add_argument("--token", help="enrollment token (first run only)")
    p.add_argument("--profile", required=True, help="device profile name")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--name", default="edge-device")
    p.add_argument("--state-dir", help="where the credential is kept (default: XDG data dir)")
    p.add_argument("--emulate", action="store_true", help="pace to the profile's predicted speed")
    p.add_argument("--pace-tpot-ms", type=float, default=0.0, help="at least this many ms per token")
    p.add_argument("--tls-ca", help="the deployment's ca.pem: dial the hub over TLS")
    p.add_argument(
        "--engine",
        choices=("onnxruntime", "tensorrt", "torch"),  # edge_agent.engines.registry.ENGINES
        help="inference engine that computes the tokens (default: the model's own generator, on cpu)",
    )
    p.add_argument("--device", default="cpu", help="the engine's device: cpu, or cuda[:n] (default cpu)")
    p.set_defaults(func=cmd_agent_run)

    devices = sub.add_parser("devices", help="the fleet").add_subparsers(dest="devices_command", required=True)
    p = devices.add_parser("list", help="devices registered with a hub")
    p.add_argument("--hub", default=os.environ.get("TANDEM_HUB", "127.0.0.1:50051"))
    p.add_argument("--api-key", help="default: $TANDEM_API_KEY")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--tls-ca", help="the deployment's ca.pem, for a hub serving TLS")
    p.set_defaults(func=cmd_devices_list)

    p = sub.add_parser("generate", help="generate text, locally or through a hub (--hub), streaming")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--model", help="zoo name or path to a .gguf (default: smollm2-135m-instruct; via a hub: any)")
    p.add_argument("--hub", help="host:port of a hub: run there, wherever it routes the request")
    p.add_argument("--api-key", help="with --hub (default: $TANDEM_API_KEY)")
    p.add_argument("--tls-ca", help="with --hub: the deployment's ca.pem, for a hub serving TLS")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--ttft-ms", type=float, help="budget: time to first token")
    p.add_argument("--tpot-ms", type=float, help="budget: time per output token")
    p.add_argument("--energy-j", type=float, help="budget: edge energy")
    p.add_argument("--best-effort", action="store_true", help="serve even when no placement meets the budget")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TandemModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
