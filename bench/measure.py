"""CPU seconds and resident memory of a system's server processes, read with psutil."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable

import psutil


def _tree(pids: Iterable[int]) -> list[psutil.Process]:
    """Return the processes `pids` and all their descendants (each once)."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            found[root.pid] = root
            for child in root.children(recursive=True):
                found[child.pid] = child
    return list(found.values())


def cpu_seconds(pids: Iterable[int]) -> float:
    """Return user + system CPU seconds of the processes and their descendants."""
    total = 0.0
    for process in _tree(pids):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def rss_bytes(pids: Iterable[int]) -> int:
    """Return the summed resident set size of the processes and their descendants."""
    total = 0
    for process in _tree(pids):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


def own_rss_bytes(pids: Iterable[int]) -> int:
    """Return the summed resident set size of exactly these processes."""
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_info().rss
    return total


class PeakSampler:
    """Samples a memory reading in a thread and keeps its maximum."""

    def __init__(self, read: Callable[[], int], interval: float = 0.1) -> None:
        self._read = read
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.peak = 0

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._read())
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())
