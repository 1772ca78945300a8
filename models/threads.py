"""Intra-op threads that give way to other processes on the same cores.

Our kernels share each matrix product out to OpenMP threads that meet at barriers, five a decoder
layer. When another process keeps a core busy, the scheduler deschedules one of our threads and the
rest wait at the next barrier for its time slice to come round. On this 2-core host, with a neighbour
process using ~75% of one core, an agent's start-up calibration (edge_agent.profiler.quick_samples,
SmolLM2 at source precision) took 114 s at two threads and 9.7 s at one; 3.7 s idle at two.

So a serving thread runs on the cores other processes leave free, shared with the other threads of
this process computing at the same time (an agent and the hub in one process): `Governor` samples how
much CPU the rest of the machine took on our CPUs (/proc/stat's busy and steal time, less this
process's own: `cpu_seconds`) at most every SAMPLE_S, when a computing thread fits itself (no
thread of its own: a hub forks its broker, and a thread caught mid-read by a fork is a hazard), over
the windows in which we computed too (processes that take turns with us, as a hub and its agents on
one host do, never slow us down), smoothed; `apply()` sets the calling thread's torch (and so our kernels', which read
torch.get_num_threads()) intra-op threads to `threads_for` that share and this process's computing
threads (`computing_here`: ServedModel.stream once it holds its model, each split stage's step).
Threads are per OS thread in OpenMP, so it runs in the thread about to compute: `fitted` wraps a
stream's factory for models.streaming.iterate_in_thread and fits it again at every item (a token), so
a neighbour that starts or stops mid-answer is followed within a step. With the machine to itself a
thread keeps every core; the recommendation never feeds back on itself, since only others' CPU counts.

TANDEM_THREADS=N fixes N threads (0 or unset: adaptive, up to torch's default).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

SAMPLE_S = 0.25
"""How often `apply` reads /proc/stat at most (a computing thread applies at every token)."""
SMOOTHING = 0.5
"""Weight of the newest sample in the foreign share's moving average (~1 s of memory at SAMPLE_S)."""
FIRST_S = 0.2
"""The first look at the machine, before the first request computes."""
MIN_OURS = 0.25
"""Cores this process must have used over a sample's window for the window to count (`sample`)."""


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity; every CPU where the platform has none)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return sorted(affinity(0)) if affinity is not None else list(range(os.cpu_count() or 1))


def cpu_seconds(cpus: Sequence[int] | None = None) -> tuple[float, float]:
    """(CPU seconds every process and the hypervisor's steal used so far, on `cpus` (None: the whole
    machine), this process's own): /proc/stat's busy columns and os.times(); (0, own) where /proc/stat
    is missing or unreadable (macOS: then nothing counts as foreign)."""
    own = os.times()
    mine = own.user + own.system
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        wanted = {"cpu"} if cpus is None else {f"cpu{c}" for c in cpus}
        busy = 0.0
        for line in lines:
            fields = line.split()
            if not fields or fields[0] not in wanted:
                continue
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in (fields[1:] + ["0"] * 8)[:8])
            busy += user + nice + system + irq + softirq + steal
    except (OSError, ValueError):
        return 0.0, mine
    return busy / os.sysconf("SC_CLK_TCK"), mine


def threads_for(max_threads: int, cores: int, foreign: float, computing: int = 1) -> int:
    """Intra-op threads for one of `computing` threads of this process when other processes take
    `foreign` (0..1) of all `cores`: its share of the cores they leave free, rounded (2 cores, one
    computing: 2 below a quarter of the machine, half a core; else 1), at least 1 and at most
    `max_threads`."""
    free = cores * (1.0 - min(1.0, max(0.0, foreign))) / max(1, computing)
    return max(1, min(max_threads, int(free + 0.5)))


class Governor:
    """The foreign share of the CPU, sampled in the background; `apply()` fits a thread to it."""

    def __init__(
        self,
        max_threads: int | None = None,
        cores: int | None = None,
        read: Callable[[], tuple[float, float]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        fixed: int | None = None,
    ) -> None:
        """`fixed`: every thread computes with that many threads, and nothing is sampled."""
        cpus = usable_cpus()
        self.cores = cores or len(cpus)
        self.max_threads = max(1, min(max_threads or torch.get_num_threads(), self.cores))
        """torch's own default (OMP_NUM_THREADS, physical cores), within the CPUs we may use."""
        self.read = read or (lambda: cpu_seconds(cpus))  # busy time on our own CPUs: a cpuset's neighbours only
        self.clock = clock
        self.fixed = fixed
        self.foreign = 0.0
        """Moving average of the share of all cores other processes (and steal) took."""
        self.computing = 0
        """Threads of this process computing now (`computing_here`)."""
        self._last: tuple[float, float, float] | None = None  # (time, busy, own) of the last sample
        self._started = False
        self._lock = threading.Lock()

    def sample(self, always: bool = False) -> float:
        """Fold the CPU use since the last sample into `foreign`; returns it. Only a window in which
        this process computed (at least MIN_OURS of a core) counts, unless `always`: what others do
        while we are idle says nothing of whether they compute when we do (a hub and its agents on one
        host take turns), and a neighbour that keeps a core busy shows in our own windows too."""
        now, (busy, own) = self.clock(), self.read()
        with self._lock:
            if self._last is not None:
                t0, busy0, own0 = self._last
                wall = now - t0
                if wall > 0 and (always or (own - own0) / wall >= MIN_OURS):
                    share = max(0.0, (busy - busy0) - (own - own0)) / (wall * self.cores)
                    self.foreign = (1 - SMOOTHING) * self.foreign + SMOOTHING * min(1.0, share)
            self._last = (now, busy, own)
            return self.foreign

    def threads(self) -> int:
        """The threads a computing thread should use now."""
        if self.fixed is not None:
            return self.fixed
        return threads_for(self.max_threads, self.cores, self.foreign, self.computing)

    @contextlib.contextmanager
    def computing_here(self) -> Iterator[int]:
        """Count the calling thread as computing meanwhile, its threads fitted first (yields them).
        For the stretch a thread holds a model and computes: one that waits for a model's lock or
        for its next input must not count."""
        with self._lock:
            self.computing += 1
        try:
            yield self.apply()
        finally:
            with self._lock:
                self.computing -= 1

    def apply(self) -> int:
        """Set the calling thread's intra-op threads to `threads()` (the first look at the machine on
        first use; a new sample when SAMPLE_S has passed since the last); returns them."""
        self.start()
        last = self._last
        if self.fixed is None and (last is None or self.clock() - last[0] >= SAMPLE_S):
            self.sample()
        n = self.threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n

    def start(self) -> None:
        """The first look at the machine, once: FIRST_S measured before it returns, so the first
        request (or a start-up calibration) already sees a busy machine."""
        with self._lock:
            if self._started or self.fixed is not None:
                return
            self._started = True
        self.sample()
        time.sleep(FIRST_S)
        self.sample(always=True)
        self.foreign /= SMOOTHING  # the first share whole, not averaged with the 0 it started from


def _governor() -> Governor:
    """TANDEM_THREADS=N (N > 0): N threads, fixed; else adaptive."""
    fixed = os.environ.get("TANDEM_THREADS", "").strip()
    if fixed and fixed != "0":
        if not fixed.isdigit():
            raise ValueError(f"TANDEM_THREADS must be a whole number of threads (0: adaptive), got {fixed!r}")
        return Governor(fixed=int(fixed))
    return Governor()


GOVERNOR = _governor()
"""The process's governor (module docstring)."""


def fitted(make: Callable[[], Iterator[T]]) -> Callable[[], Iterator[T]]:
    """`make`'s items, with the calling thread's intra-op threads fitted to the cores free (GOVERNOR)
    before the first and again after each one: for a stream's factory that
    models.streaming.iterate_in_thread calls in its own thread. Whoever computes in it counts itself
    (`computing_here`: ServedModel.stream, once it holds its model)."""

    def run() -> Iterator[T]:
        GOVERNOR.apply()
        for item in make():
            yield item
            GOVERNOR.apply()

    return run
