"""`tandem models list|pull`: the model zoo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models import zoo
from tandem_cli.common import progress_bar


def cmd_models_list(args: argparse.Namespace) -> int:
    root = Path(args.cache_dir) if args.cache_dir else None
    print(f"{'NAME':<24} {'PULLED':<7} DESCRIPTION")
    for src, pulled in zoo.list_models(root):
        print(f"{src.name:<24} {'yes' if pulled else 'no':<7} {src.description}")
    print(f"cache: {(root or zoo.cache_dir()) / 'models'}")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    root = Path(args.cache_dir) if args.cache_dir else None
    for name in args.names:
        print(f"pulling {name} …", file=sys.stderr)
        path = zoo.pull(name, root, progress=progress_bar(f"verify {name}"), force=args.force)
        print(f"{name}: {path} (sha256 verified)")
        if args.prepare:
            # Lazy: models.runtime imports torch (about 2 s), which `list` and a plain `pull` never need.
            from models.runtime import load

            load(name)  # dequantizes once into the prepared cache, so later loads take about a second
            print(f"{name}: prepared")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
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
