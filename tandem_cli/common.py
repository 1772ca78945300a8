"""Helpers the command groups share: default data directories, an SDK client, a progress bar."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from tandem import Client


def data_dir(value: str | None, leaf: str) -> Path:
    """`value` if given, else `<XDG data home>/tandem/<leaf>`."""
    if value:
        return Path(value)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tandem" / leaf


def hub_client(args: argparse.Namespace) -> Client:
    """An SDK client for `args.hub`, with `args.api_key` (default: $TANDEM_API_KEY), `args.timeout`
    and `args.tls_ca`."""
    key = args.api_key or os.environ.get("TANDEM_API_KEY")
    return Client(args.hub, api_key=key, timeout=args.timeout, tls_ca=args.tls_ca)


def progress_bar(desc: str) -> Callable[[int, int], None]:
    """A `progress(done, total)` callback drawing a byte-count bar on stderr; it closes at `total`."""
    bar: tqdm | None = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update
