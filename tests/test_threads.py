"""Intra-op threads that give way to other processes and to this process's other computing threads
(models.threads), against a fake /proc/stat."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models import threads
from models.threads import Governor, threads_for


@pytest.mark.parametrize(
    ("max_threads", "cores", "foreign", "computing", "want"),
    [
        (2, 2, 0.0, 1, 2),  # the machine to itself
        (2, 2, 0.2, 1, 2),  # others take 0.4 of a core: 1.6 cores free round to 2
        (2, 2, 0.3, 1, 1),  # 0.6 of a core: one thread
        (2, 2, 1.0, 1, 1),  # never fewer than one
        (2, 2, 0.0, 2, 1),  # two streams of this process share the cores
        (16, 16, 0.5, 2, 4),
        (4, 16, 0.0, 1, 4),  # at most max_threads
        (2, 2, -0.5, 1, 2),  # a clock step backwards never adds cores
    ],
)
def test_threads_for_is_the_share_of_the_free_cores(
    max_threads: int, cores: int, foreign: float, computing: int, want: int
) -> None:
    assert threads_for(max_threads, cores, foreign, computing) == want


class FakeStat:
    """/proc/stat's busy seconds and this process's own, advanced by hand."""

    def __init__(self) -> None:
        self.now = self.busy = self.own = 0.0

    def tick(self, seconds: float, others: float, ours: float = 0.0) -> None:
        """`seconds` pass; other processes use `others` cores meanwhile, this one `ours`."""
        self.now += seconds
        self.busy += seconds * (others + ours)
        self.own += seconds * ours


def test_the_governor_follows_a_neighbour_that_comes_and_goes() -> None:
    stat = FakeStat()
    gov = Governor(max_threads=2, cores=2, read=lambda: (stat.busy, stat.own), clock=lambda: stat.now)
    gov.sample()
    for _ in range(4):  # we compute on both cores: our own use never counts against us
        stat.tick(0.25, others=0.0, ours=2.0)
        gov.sample()
    assert gov.foreign == 0.0 and gov.threads() == 2
    for _ in range(4):  # a neighbour keeps one core busy
        stat.tick(0.25, others=1.0, ours=1.0)
        gov.sample()
    assert gov.foreign == pytest.approx(0.5, abs=0.05) and gov.threads() == 1
    for _ in range(4):  # it stops: within a second both cores are ours again
        stat.tick(0.25, others=0.0, ours=2.0)
        gov.sample()
    assert gov.foreign < 0.05 and gov.threads() == 2
    for _ in range(8):  # another process computes while we are idle (a hub and its agent take turns):
        stat.tick(0.25, others=2.0)  # it says nothing of when we compute, and does not count
        gov.sample()
    assert gov.foreign < 0.05 and gov.threads() == 2


def test_a_computing_thread_gets_its_share_and_a_stream_is_refitted_at_every_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stat = FakeStat()
    gov = Governor(max_threads=2, cores=2, read=lambda: (stat.busy, stat.own), clock=lambda: stat.now)
    gov._started = True  # no sampler thread: the fake clock moves only by hand
    monkeypatch.setattr(threads, "GOVERNOR", gov)
    seen: list[tuple[int, int]] = []

    def stream() -> Iterator[int]:  # as ServedModel.stream: counted once it holds its model
        with gov.computing_here():
            for i in range(3):
                seen.append((gov.computing, torch.get_num_threads()))
                yield i

    def consume() -> None:
        for _ in threads.fitted(stream)():
            pass

    def run_in_a_thread() -> None:
        worker = threading.Thread(target=consume)
        worker.start()
        worker.join()

    run_in_a_thread()
    assert seen == [(1, 2)] * 3 and gov.computing == 0  # alone and idle: both cores, released after
    seen.clear()
    with gov.computing_here():  # another thread of this process computes meanwhile
        run_in_a_thread()
    assert seen == [(2, 1)] * 3 and gov.computing == 0
    seen.clear()
    for _ in range(4):  # a neighbour keeps a core busy while we compute: one thread
        stat.tick(0.25, others=1.0, ours=1.0)
        gov.sample()
    run_in_a_thread()
    assert seen == [(1, 1)] * 3


def test_busy_time_is_read_for_our_own_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cpuset's neighbours, not the whole host's: /proc/stat's cpuN lines of the CPUs we may use."""
    tick = threads.os.sysconf("SC_CLK_TCK")
    stat = "".join(f"{name} {n} 0 {n} 0 0 0 0 0 0 0\n" for name, n in [("cpu ", 900), ("cpu0", 100), ("cpu1", 300),
                                                                      ("cpu2", 500)])  # fmt: skip
    real_path = threads.Path

    def fake_path(name: str) -> Path:
        if name == "/proc/stat":
            (tmp_path / "stat").write_text(stat)
            return tmp_path / "stat"
        return real_path(name)

    monkeypatch.setattr(threads, "Path", fake_path)
    assert threads.cpu_seconds()[0] == pytest.approx(1800 / tick)
    assert threads.cpu_seconds([0, 1])[0] == pytest.approx(800 / tick)
    stat = "cpu0 garbage\n"
    assert threads.cpu_seconds([0])[0] == 0.0  # unreadable: nothing counts as foreign


def test_a_fixed_thread_count_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_THREADS", "1")
    assert threads._governor().fixed == 1 and threads._governor().threads() == 1
    monkeypatch.setenv("TANDEM_THREADS", "0")
    assert threads._governor().fixed is None
    monkeypatch.setenv("TANDEM_THREADS", "two")
    with pytest.raises(ValueError, match="TANDEM_THREADS must be a whole number"):
        threads._governor()


def test_a_computing_thread_samples_the_machine_itself_at_most_every_sample_s() -> None:
    """No sampler thread (a forking hub must not be caught mid-read): apply() reads /proc/stat when
    SAMPLE_S has passed since the last reading, and not before."""
    stat = FakeStat()
    gov = Governor(max_threads=2, cores=2, read=lambda: (stat.busy, stat.own), clock=lambda: stat.now)
    gov._started = True
    assert gov.apply() == 2 and gov._last == (0.0, 0.0, 0.0)  # the first reading
    stat.tick(threads.SAMPLE_S / 2, others=1.0, ours=1.0)
    gov.apply()
    assert gov._last == (0.0, 0.0, 0.0) and gov.foreign == 0.0  # too soon: not read
    stat.tick(threads.SAMPLE_S, others=1.0, ours=1.0)
    gov.apply()
    assert gov._last[0] == stat.now and gov.foreign > 0.2  # read: a neighbour on the other core
    stat.tick(threads.SAMPLE_S, others=1.0, ours=1.0)
    assert gov.apply() == 1  # and as it stays, one thread
