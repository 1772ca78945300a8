"""`tandem devices list`: the fleet a hub knows, through the SDK only."""

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


def register(sub: argparse._SubParsersAction) -> None:
    devices = sub.add_parser("devices", help="the fleet").add_subparsers(dest="devices_command", required=True)
    p = devices.add_parser("list", help="devices registered with a hub")
    p.add_argument("--hub", default=os.environ.get("TANDEM_HUB", "127.0.0.1:50051"))
    p.add_argument("--api-key", help="default: $TANDEM_API_KEY")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--tls-ca", help="the deployment's ca.pem, for a hub serving TLS")
    p.set_defaults(func=cmd_devices_list)
