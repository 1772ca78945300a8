"""`tandem agent run`: enroll (first time), connect to a hub and serve.

edge_agent is imported inside the command: it imports torch (about 2 s on two cores), which
`tandem --help` and the other commands must not pay for.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tandem_cli.common import data_dir


def cmd_agent_run(args: argparse.Namespace) -> int:
    from edge_agent.agent import EnrollmentRejected  # lazy: imports torch (see the module docstring)
    from edge_agent.engines.base import EngineUnavailable
    from edge_agent.runner import build_agent, run_until_signalled

    state = Path(args.state_dir) if args.state_dir else data_dir(None, f"agent-{args.name}")
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
            quant=args.quant,
        )
    except (EngineUnavailable, ValueError) as exc:  # a backend or device this machine cannot run; a bad profile
        print(f"error: {exc}", file=sys.stderr)
        return 2
    on = f" on {args.engine} ({args.device})" if args.engine else ""
    notes = "".join(f"; {n}" for n in agent.notes)
    emulated = " (emulated)" if args.emulate else ""
    print(f"agent {args.name}: {args.model} as {agent.config.profile}{emulated}{on}{notes}", flush=True)
    try:
        asyncio.run(run_until_signalled(agent))
    except EnrollmentRejected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def register(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--quant",
        choices=("source", "fp32", "int8", "int4"),  # models.runtime.QUANTS
        help="precision the model is served at without --engine: source (each tensor at its GGUF's own, "
        "on the int4/int8 CPU kernels), fp32, or int8/int4 re-quantized (default: the profile's quant, source)",
    )
    p.set_defaults(func=cmd_agent_run)
