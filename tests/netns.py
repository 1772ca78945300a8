"""A network namespace joined to this one by a veth pair: a second machine for tests, on one host.

    with veth_namespace() as ns:       # pytest.skip (with the reason) when not root or unsupported
        ns.host_ip                     # this side's address, e.g. 10.231.57.1 (listen here)
        await ns.mqtt_probe({...})     # a paho client run inside the namespace; its JSON verdict
        ns.shape(40, 20)               # tc netem on both ends: 40 ms round trip, 20 Mbit/s each way

Linux only, root only. Names and the /24 are drawn from the pid, so tests running at once on one
host do not collide; everything is removed on exit, failures included. Benchmarks use `namespace()`,
which raises NamespaceRefused instead of skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run inside the namespace: connect (TLS when "ca" is given), optionally publish once, report.
MQTT_PROBE = """
import json, sys, time
import paho.mqtt.client as mqtt
a = json.loads(sys.argv[1])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
c.username_pw_set(a["user"], a["password"])
if a.get("ca"):
    c.tls_set(a["ca"], a.get("cert"), a.get("key"))
out = {}
c.on_connect = lambda cl, u, f, rc, p: out.setdefault("connack", str(rc))
c.on_disconnect = lambda cl, u, f, rc, p: out.setdefault("disconnected", str(rc))
try:
    c.connect(a["host"], a["port"], 5)
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "detail": str(exc)}))
    sys.exit(0)
c.loop_start()
deadline = time.time() + 5
while "connack" not in out and "disconnected" not in out and time.time() < deadline:
    time.sleep(0.02)
if out.get("connack") == "Success" and a.get("topic"):
    info = c.publish(a["topic"], a["payload"], qos=1, retain=a.get("retain", False))
    info.wait_for_publish(3)
    out["published"] = info.is_published()
c.on_disconnect = None  # our own disconnect below is no verdict
c.disconnect()
c.loop_stop()
print(json.dumps(out or {"error": "no CONNACK"}))
"""


class NamespaceRefused(RuntimeError):
    """This host cannot make the namespace, its veth link, or shape it; the message says why."""


@dataclass(frozen=True)
class Namespace:
    name: str
    host_ip: str
    """This side of the veth pair (the default namespace)."""
    ns_ip: str
    """The namespace's side."""
    host_if: str = ""
    ns_if: str = ""

    def exec_argv(self, *argv: str) -> list[str]:
        """argv run inside the namespace (for subprocess.Popen)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def shape(self, rtt_ms: float, rate_mbps: float) -> None:
        """tc netem on both ends of the veth pair: half the round trip of delay and `rate_mbps` each
        way (replacing any earlier shaping). Raises NamespaceRefused with tc's reason where the kernel
        has no sch_netem."""
        netem = ["netem", "delay", f"{rtt_ms / 2:g}ms", "rate", f"{rate_mbps:g}mbit", "limit", "100000"]
        for prefix, dev in ((["tc"], self.host_if), (self.exec_argv("tc"), self.ns_if)):
            try:
                done = subprocess.run([*prefix, "qdisc", "replace", "dev", dev, "root", *netem],
                                      capture_output=True, text=True, timeout=10)  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as exc:  # no tc (iproute2) at all, or it hangs
                raise NamespaceRefused(f"tc cannot shape the link: {exc}") from None
            if done.returncode != 0:
                raise NamespaceRefused(f"the kernel refuses netem ({done.stderr.strip() or done.returncode})")

    async def run(self, *argv: str, timeout: float = 20.0) -> str:
        """stdout of argv run inside the namespace (asynchronously: a hub in this loop keeps serving)."""
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.name, *argv, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{argv[0]} in {self.name} exited {proc.returncode}: {err.decode()[-2000:]}")
        return out.decode()

    async def mqtt_probe(self, args: dict) -> dict:
        """MQTT_PROBE's verdict: {"connack": reason, "published": bool}, {"disconnected": reason} (the
        broker dropped it before its CONNACK) or {"error": exception name} (no connection at all)."""
        return json.loads(await self.run(sys.executable, "-c", MQTT_PROBE, json.dumps(args)))


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def namespace() -> Iterator[Namespace]:
    """A namespace with one veth link to this one and loopback up. Raises NamespaceRefused (saying
    why) when this is not root or the kernel refuses namespaces or veth links."""
    if os.geteuid() != 0:
        raise NamespaceRefused("network namespaces need root")
    if shutil.which("ip") is None:
        raise NamespaceRefused("the ip command (iproute2) is not installed")
    tag = os.getpid() % 100_000
    subnet = 20 + os.getpid() % 200
    name, host_if, ns_if = f"tdm{tag}", f"tdm{tag}h", f"tdm{tag}n"
    ns = Namespace(name, f"10.231.{subnet}.1", f"10.231.{subnet}.2", host_if, ns_if)
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        raise NamespaceRefused(
            f"cannot create a network namespace here: {getattr(exc, 'stderr', b'') or exc}"
        ) from None
    try:
        try:
            _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        except subprocess.CalledProcessError as exc:
            raise NamespaceRefused(f"cannot create a veth pair here: {exc.stderr.decode().strip()}") from None
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", f"{ns.host_ip}/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{ns.ns_ip}/24", "dev", ns_if)
        _ip("netns", "exec", name, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield ns
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            _ip("link", "del", host_if)  # takes its peer with it
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            _ip("netns", "del", name)


@contextlib.contextmanager
def veth_namespace() -> Iterator[Namespace]:
    """`namespace()` for tests: skips the test, saying why, where the host refuses it."""
    with contextlib.ExitStack() as stack:
        try:
            ns = stack.enter_context(namespace())
        except NamespaceRefused as exc:
            pytest.skip(str(exc))
        yield ns
