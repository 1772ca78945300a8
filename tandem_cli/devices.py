"""`tandem devices list` and `tandem devices update`: the fleet a hub knows, through the SDK only."""

from __future__ import annotations

import argparse
import os
import sys
import time

from tandem.errors import TandemError
from tandem_cli.common import hub_client


def cmd_devices_list(args: argparse.Namespace) -> int:
    try:
        with hub_client(args) as client:
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


def cmd_devices_update(args: argparse.Namespace) -> int:
    """Issue the update; with --wait, follow it in ListDevices until it is ok (0) or failed (1)."""
    try:
        with hub_client(args) as client:
            command = client.update_device(args.device, args.model, args.quant or "")
            print(command, flush=True)
            if not args.wait:
                return 0
            deadline = time.monotonic() + args.wait
            while time.monotonic() < deadline:
                update = next((d.update for d in client.devices() if d.device_id == args.device), "")
                if update.startswith(f"{command} ok") or update.startswith(f"{command} failed"):
                    print(update)
                    return 0 if update.startswith(f"{command} ok") else 1
                time.sleep(0.5)
    except TandemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"error: update {command} still pending after {args.wait:.0f} s", file=sys.stderr)
    return 1


def _hub_flags(p: argparse.ArgumentParser, timeout_s: float = 10.0) -> None:
    p.add_argument("--hub", default=os.environ.get("TANDEM_HUB", "127.0.0.1:50051"))
    p.add_argument("--api-key", help="default: $TANDEM_API_KEY")
    p.add_argument("--timeout", type=float, default=timeout_s, help=f"seconds a call may take (default {timeout_s:g})")
    p.add_argument("--tls-ca", help="the deployment's ca.pem, for a hub serving TLS")


def register(sub: argparse._SubParsersAction) -> None:
    devices = sub.add_parser("devices", help="the fleet").add_subparsers(dest="devices_command", required=True)
    p = devices.add_parser("list", help="devices registered with a hub")
    _hub_flags(p)
    p.set_defaults(func=cmd_devices_list)
    p = devices.add_parser("update", help="serve another model on a device, over the air (prints the command id)")
    p.add_argument("device", help="device id (tandem devices list)")
    p.add_argument("--model", required=True, help="zoo model to serve (the hub builds its bundle)")
    p.add_argument("--quant", choices=("fp32", "int8", "int4"), help="precision (default: the device profile's)")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for the outcome: exit 0 if ok, 1 if failed or still pending")  # fmt: skip
    _hub_flags(p, timeout_s=600.0)  # the hub builds the bundle before it answers: minutes for a large model
    p.set_defaults(func=cmd_devices_update)
