"""Intra-op threads that give way to other processes and to this process's other computing threads
(models.threads), against a fake /proc/stat."""

from __future__ import annotations

import threading

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


def test_apply_sets_the_calling_threads_torch_threads_and_fitted_counts_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stat = FakeStat()
    gov = Governor(max_threads=2, cores=2, read=lambda: (stat.busy, stat.own), clock=lambda: stat.now)
    gov._started = True  # no sampler thread: the fake clock moves only by hand
    monkeypatch.setattr(threads, "GOVERNOR", gov)
    seen: list[tuple[int, int]] = []

    def stream() -> list[int]:
        return [1, 2, 3]

    def consume(make: object, out: list) -> None:
        for _ in make():  # type: ignore[operator]
            out.append((gov.computing, torch.get_num_threads()))

    worker = threading.Thread(target=consume, args=(threads.fitted(stream), seen))
    worker.start()
    worker.join()
    assert seen == [(1, 2)] * 3 and gov.computing == 0  # alone and idle: both cores, and released after
    gov.enter()  # another stream of this process is computing meanwhile
    seen.clear()
    worker = threading.Thread(target=consume, args=(threads.fitted(stream), seen))
    worker.start()
    worker.join()
    gov.leave()
    assert seen == [(2, 1)] * 3 and gov.computing == 0


def test_a_fixed_thread_count_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_THREADS", "1")
    assert isinstance(threads._governor(), threads._Fixed) and threads._governor().n == 1
    monkeypatch.setenv("TANDEM_THREADS", "0")
    assert isinstance(threads._governor(), Governor)
    monkeypatch.setenv("TANDEM_THREADS", "two")
    with pytest.raises(ValueError, match="TANDEM_THREADS must be a whole number"):
        threads._governor()
