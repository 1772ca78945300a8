"""`tandem agent run`: enroll (first time), connect to a hub and serve.

edge_agent is imported inside the command: it imports torch (about 2 s on two cores), which
`tandem --help` and the other commands must not pay for.

Settings come from the command line, then the --config file (edge_agent.config_file), then the
defaults. The model is the first of: --model / --bundle on the command line, the model an
over-the-air update last swapped in (edge_agent.ota.served_record: a restart keeps the update), the
file's model / bundle, smollm2-135m-instruct.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tandem_cli import flash
from tandem_cli.common import data_dir

QUANTS = ("source", "fp32", "int8", "int4")  # models.runtime.QUANTS


def settings(args: argparse.Namespace) -> argparse.Namespace:
    """The command line's settings over the --config file's (see the module docstring). Raises
    ValueError (edge_agent.config_file.ConfigFileError among them) for a bad file or a missing setting."""
    from edge_agent.config_file import KEYS, AgentFile, read_agent_file

    file = read_agent_file(args.config) if args.config else AgentFile()
    merged = {k: getattr(args, k) if getattr(args, k) is not None else getattr(file, k) for k in KEYS}
    for key in ("hub", "profile"):
        if not merged[key]:
            raise ValueError(f"--{key} is required (on the command line, or as {key!r} in a --config file)")
    if merged["quant"] is not None and merged["quant"] not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)}, got {merged['quant']!r} (from {args.config})")
    merged["name"] = merged["name"] or "edge-device"
    merged["state_dir"] = merged["state_dir"] or str(data_dir(None, f"agent-{merged['name']}"))
    if args.model is None and args.bundle is None:  # the command line did not choose: an update wins
        from edge_agent.ota import served_record  # lazy: imports torch

        if (record := served_record(Path(merged["state_dir"]))) is not None:
            merged["model"], merged["bundle"] = record[0], str(record[1])
    if merged["model"] is None:
        merged["model"] = Path(merged["bundle"]).name if merged["bundle"] else "smollm2-135m-instruct"
    return argparse.Namespace(**{**vars(args), **merged})


def cmd_agent_run(args: argparse.Namespace) -> int:
    try:
        args = settings(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from edge_agent.credentials import EnrollmentRejected  # lazy: edge_agent imports torch (see the module docstring)
    from edge_agent.engines.base import EngineUnavailable
    from edge_agent.runner import build_agent, run_until_signalled

    try:
        agent = build_agent(
            args.hub,
            args.profile,
            args.model,
            Path(args.state_dir),
            args.token,
            args.name,
            args.emulate,
            args.pace_tpot_ms,
            tls_ca=Path(args.tls_ca) if args.tls_ca else None,
            engine=args.engine,
            device=args.device,
            quant=args.quant,
            bundle=Path(args.bundle) if args.bundle else None,
            agent_version=args.agent_version or "",
        )
    except (EngineUnavailable, ValueError) as exc:  # a backend or device this machine cannot run; a bad profile
        print(f"error: {exc}", file=sys.stderr)
        return 2
    on = f" on {args.engine} ({args.device})" if args.engine else ""
    notes = "".join(f"; {n}" for n in agent.notes)
    emulated = " (emulated)" if args.emulate else ""
    source = f" (bundle {args.bundle})" if args.bundle else ""
    print(f"agent {args.name}: {args.model}{source} as {agent.config.profile}{emulated}{on}{notes}", flush=True)
    try:
        asyncio.run(run_until_signalled(agent))
    except EnrollmentRejected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    agent = sub.add_parser("agent", help="the edge agent").add_subparsers(dest="agent_command", required=True)
    p = agent.add_parser("run", help="enroll (first time), connect to the hub and serve")
    p.add_argument("--config", help="JSON file of defaults for these flags (keys: hub, token, profile, model, "
                   "bundle, name, state_dir, tls_ca, quant, agent_version)")  # fmt: skip
    p.add_argument("--hub", help="host:port of the hub (required, here or in --config)")
    p.add_argument("--token", help="enrollment token (first run only)")
    p.add_argument("--profile", help="device profile name (required, here or in --config)")
    p.add_argument(
        "--model", help="zoo model to serve, or the name to serve --bundle under (default smollm2-135m-instruct)"
    )
    p.add_argument("--bundle", help="serve this bundle directory (`tandem optimize`, an update's) at its own precision")
    p.add_argument("--name", help="device name (default edge-device)")
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
    p.add_argument("--agent-version", help="what the agent reports as its version (default: the package's)")
    p.add_argument(
        "--quant",
        choices=QUANTS,
        help="precision the model is served at without --engine: source (each tensor at its GGUF's own, "
        "on the int4/int8 CPU kernels), fp32, or int8/int4 re-quantized (default: the profile's quant, source)",
    )
    p.set_defaults(func=cmd_agent_run)
    flash.register(agent)
