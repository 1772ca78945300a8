"""`tandem agent flash`: install the agent and its model onto a device (flashing.flash).

    tandem agent flash --profile jetson-orin-nano --model smollm2-135m-instruct --hub HUB:50051 \\
        --target ssh://user@host[:port][/root] [--identity KEY] [--dry-run | --rollback]

Each step prints a line as it starts; copies draw a byte bar on stderr. Exit status 0 when the
agent is online and answered its health request, 1 when the flash failed (and said where; a
failure after the switch has rolled back), 2 for bad options.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from tandem_cli.common import progress_bar


def _request(args: argparse.Namespace):  # -> flashing.flash.FlashRequest
    from flashing.flash import FlashRequest, default_name

    key = args.api_key or os.environ.get("TANDEM_API_KEY") or ""
    if not key and not args.dry_run:
        raise ValueError("the hub's API key is needed (--api-key or $TANDEM_API_KEY): it makes the enrollment token")
    return FlashRequest(
        target=args.target,
        hub=args.hub,
        api_key=key,
        profile=args.profile,
        model=args.model,
        quant=args.quant,
        name=args.name or default_name(args.target),
        identity=args.identity,
        known_hosts=args.known_hosts,
        tls_ca=Path(args.tls_ca) if args.tls_ca else None,
        wheel=Path(args.wheel) if args.wheel else None,
        dry_run=args.dry_run,
        health_timeout_s=args.health_timeout,
    )


def _progress():
    bars: dict[str, object] = {}

    def report(name: str, done: int, total: int) -> None:
        if total <= 0:  # a step starting
            print(f"[{name}]", file=sys.stderr, flush=True)
            return
        bar = bars.setdefault(name, progress_bar(name))
        bar(done, total)  # type: ignore[operator]

    return report


def cmd_agent_flash(args: argparse.Namespace) -> int:
    from flashing.flash import FlashError, flash, rollback  # lazy: builds payloads with models/torch

    try:
        request = _request(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.rollback:
            result = asyncio.run(rollback(request, _progress()))
        else:
            result = asyncio.run(flash(request, _progress()))
    except FlashError as exc:
        print(f"error: flash failed at {exc}", file=sys.stderr)
        return 1
    print(result.report)
    for line in result.plan:
        print(line)
    if request.dry_run:
        return 0
    what = "rolled back to" if result.rolled_back else "flashed"
    print(
        f"{what} slot {result.slot}: device {result.device_id} online at agent {result.agent_version}; "
        f"{result.bytes_sent / 1e6:.1f} MB copied, {result.files_skipped} files already there"
    )
    return 0


def register(agent: argparse._SubParsersAction) -> None:
    """Add `flash` to the `tandem agent` group."""
    p = agent.add_parser("flash", help="install the agent and its model onto a device over SSH (or into a directory)")
    p.add_argument("--target", required=True, help="ssh://user@host[:port][/root] or dir:/root")
    p.add_argument("--hub", required=True, help="host:port of the hub, as the device will reach it")
    p.add_argument("--profile", required=True, help="the device's profile (device_profiles/)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quant", choices=("source", "fp32", "int8", "int4"), help="precision (default: the profile's own)")
    p.add_argument("--name", help="the device's name at the hub (default: the target's host)")
    p.add_argument("--identity", help="SSH private key (default: the user's keys and ssh-agent)")
    p.add_argument("--known-hosts", help="known_hosts file to check the device's host key (default ~/.ssh/known_hosts)")
    p.add_argument("--api-key", help="the hub's API key (default: $TANDEM_API_KEY)")
    p.add_argument("--tls-ca", help="the deployment's ca.pem, when the hub serves TLS")
    p.add_argument("--wheel", help="ship this agent wheel instead of building one from this checkout")
    p.add_argument("--dry-run", action="store_true", help="print the pre-flight report and the plan; copy nothing")
    p.add_argument("--rollback", action="store_true", help="switch the device back to its previous slot")
    p.add_argument("--health-timeout", type=float, default=180.0, help="seconds the new agent has to come online")
    p.set_defaults(func=cmd_agent_flash)
