#!/usr/bin/env python3
"""Tandem's installer on the device: copied to R/bin/device_side.py by a flash and run there with the
device's own python3. Standard library only (Python >= 3.9); nothing of Tandem is imported.

Layout under the install root R:

    R/wheelhouse/             wheels and requirements-<lock digest>.lock (copied by the flash)
    R/agents/, R/bundles/     the agent wheels and model bundles (copied by the flash)
    R/deps/<lock digest>/     a venv with the dependencies, one per lock; `.ready` is written last
    R/slots/{a,b}/            site/ (the agent wheel, --no-deps --target), deps -> ../../deps/<digest>,
                              bundle/ (hard links into R/bundles), agent.json, VERSION
    R/current -> slots/X      switched atomically (a new link, then rename over the old)
    R/previous -> slots/Y
    R/state/                  the agent's credential, certs and spool, kept across slots (0700)
    R/log/agent.log           the agent's (and the supervisor's) output
    R/run/                    supervise mode: supervisor.pid, supervisor.json

Each subcommand prints one JSON object on stdout; a failure prints {"error": ...} and exits 1.

The agent runs under systemd when systemd is the init system (R/tandem-agent.service, see
flashing/unit.py), else under this script's own `supervise` mode, started detached: it restarts
the agent on failure with backoff and gives up on a crash loop (more than --max-restarts
failures within --window seconds). In supervise mode the agent runs as the user who started it
unless `start --user NAME` names another (dropping privileges needs root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import device_service as service
from device_util import SLOTS, Fail, link_atomic, other, read_json, run, slot_of, slot_version, write_atomic


def prepare_deps(root: Path, digest: str) -> dict:
    """The venv R/deps/<digest> with every pinned dependency, made once per lock, offline."""
    house, venv = root / "wheelhouse", root / "deps" / digest
    lock = house / f"requirements-{digest}.lock"
    if (venv / ".ready").is_file():
        return {"deps": str(venv), "reused": True}
    if not lock.is_file():
        raise Fail(f"missing lock {lock}: the wheelhouse was not copied (or for another lock)")
    uv_wheels = sorted(house.glob("uv-*.whl"))
    if not uv_wheels:
        raise Fail(f"no uv wheel in {house}: the wheelhouse is incomplete")
    started = time.monotonic()
    shutil.rmtree(venv, ignore_errors=True)  # no .ready: a half-made venv from an interrupted try
    venv.parent.mkdir(parents=True, exist_ok=True)
    # --without-pip: Debian's python3 lacks ensurepip unless python3-venv is installed; uv needs no pip.
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], "python3 -m venv")
    uv = install_uv(uv_wheels[-1], venv / "bin")
    env = {**os.environ, "UV_OFFLINE": "1", "UV_NO_CACHE": "1", "PIP_NO_INDEX": "1"}
    argv = [str(uv), "pip", "install", "--python", str(venv / "bin/python"), "--offline", "--no-index"]
    argv += ["--link-mode", "copy", "--find-links", str(house), "-r", str(lock)]
    run(argv, "installing the dependencies", env)
    seconds = round(time.monotonic() - started, 1)
    write_atomic(venv / ".ready", json.dumps({"lock": digest, "seconds": seconds}))  # last: the venv is whole
    return {"deps": str(venv), "reused": False, "seconds": seconds}


def install_uv(wheel: Path, bindir: Path) -> Path:
    """uv's binary, taken out of its wheel (`<name>.data/scripts/uv`): what `pip install uv` would
    put in bin/, without needing pip on the device."""
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(".data/scripts/uv")), None)
        if member is None:
            raise Fail(f"{wheel}: no uv binary inside")
        dest = bindir / "uv"
        with zf.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    os.chmod(dest, 0o755)
    return dest


def resolve_in(root: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


def stage(root: Path, slot: str, wheel: str, lock: str, bundle: str | None, config: str | None) -> dict:
    """Build slot `slot` afresh from the agent wheel, the deps venv, a bundle and a config. The
    slot must not be the current one; it is built beside and renamed into place."""
    if slot == slot_of(root / "current"):
        raise Fail(f"slot {slot} is the current one: stage into the free slot ({other(slot)})")
    wheel_path, deps = resolve_in(root, wheel), root / "deps" / lock
    if not wheel_path.is_file():
        raise Fail(f"no agent wheel at {wheel_path}: copy it first")
    if not (deps / ".ready").is_file():
        raise Fail(f"the dependencies for lock {lock} are not ready: run prepare-deps --lock-digest {lock}")
    new = root / "slots" / f".{slot}.new"
    shutil.rmtree(new, ignore_errors=True)
    (new / "site").mkdir(parents=True)
    argv = [str(deps / "bin/uv"), "pip", "install", "--python", str(deps / "bin/python"), "--offline"]
    argv += ["--no-index", "--no-deps", "--link-mode", "copy", "--target", str(new / "site"), str(wheel_path)]
    run(argv, "installing the agent wheel", {**os.environ, "UV_NO_CACHE": "1"})
    os.symlink(f"../../deps/{lock}", new / "deps")
    if bundle:
        link_tree(resolve_in(root, bundle), new / "bundle")
    version = wheel_path.name.split("-")[1]
    if config:
        conf = read_json(resolve_in(root, config))
        if not conf:
            raise Fail(f"{config}: not a readable JSON config")
        version = conf.get("agent_version") or version
        write_atomic(new / "agent.json", json.dumps(conf, indent=1), 0o600)
    (new / "VERSION").write_text(version + "\n")
    final = root / "slots" / slot
    if slot_of(root / "previous") == slot:
        (root / "previous").unlink()  # it no longer holds the previous version
    shutil.rmtree(final, ignore_errors=True)
    os.replace(new, final)
    return {"slot": slot, "version": version}


def link_tree(src: Path, dest: Path) -> None:
    """Hard-link every file of `src` into `dest` (a copy across file systems): the slot owns its
    bundle, yet an unchanged bundle takes no new space and is never copied over the network again."""
    if not (src / "manifest.json").is_file():
        raise Fail(f"no bundle at {src}: copy it first")
    dest.mkdir()
    for path in sorted(src.rglob("*")):  # the bundle's routers/ and kvpred/ too
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(exist_ok=True)
            continue
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def activate(root: Path, slot: str) -> dict:
    """current -> slots/<slot>, previous -> the old current."""
    if slot_version(root, slot) is None or not (root / "slots" / slot / "site").is_dir():
        raise Fail(f"slot {slot} is empty: stage it before activating it")
    old = slot_of(root / "current")
    if old == slot:
        return {"current": slot, "previous": slot_of(root / "previous"), "changed": False}
    link_atomic(root / "current", f"slots/{slot}")
    if old is not None:
        link_atomic(root / "previous", f"slots/{old}")
    return {"current": slot, "previous": old, "changed": True}


def rollback(root: Path) -> dict:
    """Swap current and previous."""
    prev, cur = slot_of(root / "previous"), slot_of(root / "current")
    if prev is None or slot_version(root, prev) is None:
        raise Fail("no previous slot to roll back to")
    link_atomic(root / "current", f"slots/{prev}")
    if cur is not None:
        link_atomic(root / "previous", f"slots/{cur}")
    return {"current": prev, "previous": cur}


def parser() -> argparse.ArgumentParser:
    """The subcommands, each with its handler as `func(root, args) -> dict`."""
    p = argparse.ArgumentParser(description="Tandem's installer on the device (see the module docstring)")
    p.add_argument("--root", required=True, help="the install root R")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("prepare-deps", help="make the venv of a lock's dependencies, offline")
    d.add_argument("--lock-digest", required=True)
    d.set_defaults(func=lambda root, a: prepare_deps(root, a.lock_digest))
    s = sub.add_parser("stage", help="install an agent wheel, bundle and config into a slot")
    s.add_argument("--slot", required=True, choices=SLOTS)
    s.add_argument("--wheel", required=True, help="the agent wheel (under R, or absolute)")
    s.add_argument("--lock-digest", required=True, help="the deps venv the slot runs on")
    s.add_argument("--bundle", help="the model bundle's folder (under R, or absolute)")
    s.add_argument("--config", help="the agent's config JSON (under R, or absolute)")
    s.set_defaults(func=lambda root, a: stage(root, a.slot, a.wheel, a.lock_digest, a.bundle, a.config))
    act = sub.add_parser("activate", help="current -> the slot, previous -> the old current")
    act.add_argument("--slot", required=True, choices=SLOTS)
    act.set_defaults(func=lambda root, a: activate(root, a.slot))
    simple = {
        "rollback": rollback,
        "stop": service.stop,
        "status": service.status,
        "free-slot": lambda root: {"slot": other(slot_of(root / "current"))},
    }
    for name, handler in simple.items():
        sub.add_parser(name).set_defaults(func=lambda root, _a, h=handler: h(root))
    running = {
        "start": service.start,
        "restart": lambda root, a: {"stopped": service.stop(root), **service.start(root, a)},
        "supervise": service.supervise,
    }
    for name, handler in running.items():
        r = sub.add_parser(name)
        r.add_argument("--max-restarts", type=int, default=5, help="failures in --window before giving up")
        r.add_argument("--window", type=float, default=300.0, help="seconds over which failures are counted")
        r.add_argument("--backoff", type=float, default=1.0, help="first restart delay; doubles, at most 60 s")
        r.add_argument("--user", help="supervise mode: run the agent as this user (needs root)")
        r.set_defaults(func=handler)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    root = Path(args.root).resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        result = args.func(root, args)
    except Fail as exc:
        result = {"error": str(exc)}
    except PermissionError as exc:
        result = {"error": f"permission denied: {exc.filename or exc}: run as a user who may write {root}"}
    except OSError as exc:
        result = {"error": f"{exc.filename or ''}: {exc.strerror or exc}"}
    print(json.dumps(result), flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
