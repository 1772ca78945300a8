"""`tandem hub up|token create|apikey create` end to end: the command writes what the hub reads.

`make run` drives exactly these commands; each key and token printed here must work against a hub
started on the same data directory.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tandem import Client
from tandem.errors import Unauthenticated
from tandem_cli.main import main as cli
from tests.hubkit import ROOT


def _printed(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert cli(argv) == 0
    return capsys.readouterr().out.strip()


def test_hub_up_serves_the_keys_its_commands_made(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "hub"
    key = _printed(capsys, ["hub", "apikey", "create", "--data-dir", str(data), "--name", "ops"])
    token = _printed(capsys, ["hub", "token", "create", "--data-dir", str(data), "--ttl", "60"])
    assert token != key and min(len(token), len(key)) > 20  # secrets, printed once
    key_file = tmp_path / "keys" / "hub-key"
    hub = subprocess.Popen(
        [sys.executable, "-m", "tandem_cli", "hub", "up", "--data-dir", str(data), "--listen", "127.0.0.1:0",
         "--mqtt", "none", "--api-key-file", str(key_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env={**os.environ},
    )  # fmt: skip
    try:
        first = hub.stdout.readline()  # type: ignore[union-attr]
        ready = re.search(r"hub ready on (\S+)", first)
        assert ready, first + hub.stdout.read(4000)  # type: ignore[union-attr]
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        for k in (key, key_file.read_text()):
            with Client(ready.group(1), api_key=k, timeout=10) as client:
                assert client.devices() == []  # authenticated: an empty fleet, not an error
        with Client(ready.group(1), api_key=key + "x", timeout=10) as client, pytest.raises(Unauthenticated):
            client.devices()
    finally:
        hub.send_signal(signal.SIGTERM)
        rest = hub.communicate(timeout=30)[0]
    assert hub.returncode == 0 and "hub stopped" in rest, rest
