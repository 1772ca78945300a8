"""`tandem`: build the parser from the command groups and run the chosen command.

Errors of the models' Tandem family print one line and exit with status 2; commands that reach a
hub map the SDK's errors the same way themselves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from models.errors import TandemModelError
from tandem_cli import agent, devices, experts, generate, hub, optimize, partition, profile
from tandem_cli import models as zoo_commands

# Each group's `register(subparsers)` adds its sub-commands; this order is the order of `--help`.
GROUPS = (zoo_commands, optimize, profile, partition, hub, agent, devices, generate, experts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem edge-cloud inference")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
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
