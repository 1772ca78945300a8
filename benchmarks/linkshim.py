"""A shaped link in-process: what `tc netem delay … rate …` does, for kernels without sch_netem.

`LinkShim` is a TCP relay between an agent and the hub. Each direction's bytes are serialized at
`rate_mbps` (a chunk leaves when the link is free and its bits are through) and delivered half a
round trip later, in order. Threads, not the test's event loop: the hub's loop must not shape its
own link's timing.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time


class LinkShim:
    def __init__(self, target_port: int, rtt_ms: float, rate_mbps: float, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.rtt_ms, self.rate_mbps = rtt_ms, rate_mbps
        self._free = {"up": 0.0, "down": 0.0}  # when each direction's link is next free (monotonic s)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.server = socket.create_server((host, 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, rtt_ms: float, rate_mbps: float) -> None:
        """New link settings, for what is sent from now on."""
        with self._lock:
            self.rtt_ms, self.rate_mbps = rtt_ms, rate_mbps

    def close(self) -> None:
        for s in [self.server, *self._sockets]:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while True:
            try:
                agent, _ = self.server.accept()
            except OSError:
                return
            hub = socket.create_connection(self.target)
            for s in (agent, hub):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [agent, hub]
            self._pipe(agent, hub, "up")
            self._pipe(hub, agent, "down")

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        pending: queue.Queue = queue.Queue()

        def read() -> None:
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    pending.put(None)
                    return
                with self._lock:
                    now = time.monotonic()
                    done = max(now, self._free[direction]) + len(data) * 8 / (self.rate_mbps * 1e6)
                    self._free[direction] = done
                    pending.put((done + self.rtt_ms / 2000, data))

        def write() -> None:
            while (item := pending.get()) is not None:
                at, data = item
                time.sleep(max(0.0, at - time.monotonic()))
                try:
                    dst.sendall(data)
                except OSError:
                    return
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()
