"""Resident memory and open files of named processes over a long run: samples, growth, a chart.

The soak (`bench/soak.py`) names the processes (`discover`), a thread reads
each one's RSS and open file descriptors with psutil every few seconds and
appends them to a CSV, and at the end each process's growth after the
warm-up is judged and drawn.
"""

from __future__ import annotations

import csv
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

# Roles: the system under test is judged; the load (generators, the harness) only shown.
SYSTEM = "system"
LOAD = "load"

# (group, role, pid): "web worker", SYSTEM, 1234. A group's processes are numbered
# in the order they first appear, so a restarted one shows as a new process.
Discovered = tuple[str, str, int]


@dataclass(frozen=True)
class Sample:
    """One reading of one process."""

    t: float  # seconds since sampling started
    group: str
    role: str
    pid: int
    rss: int  # bytes
    fds: int


class Sampler:
    """Reads RSS and open files of what `discover()` names every `interval` seconds, in a thread."""

    def __init__(
        self,
        discover: Callable[[], list[Discovered]],
        csv_path: Path,
        interval: float,
        after_sample: Callable[[float], None] | None = None,
    ) -> None:
        self.discover = discover
        self.csv_path = csv_path
        self.interval = interval
        # Runs in the sampling thread after each round (the soak reads latencies there).
        self.after_sample = after_sample or (lambda t: None)
        self.samples: list[Sample] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._processes: dict[int, psutil.Process] = {}
        self.started = 0.0

    def start(self) -> None:
        """Take the first sample now and the next ones every `interval` seconds."""
        self.started = time.monotonic()
        with open(self.csv_path, "w", newline="") as out:
            csv.writer(out).writerow(["t", "group", "role", "pid", "rss", "fds"])
        self._thread.start()

    def sample(self) -> list[Sample]:
        """Read every named process once (and append the readings to the CSV)."""
        t = time.monotonic() - self.started
        taken = []
        for group, role, pid in self.discover():
            process = self._processes.get(pid)
            try:
                if process is None:
                    process = self._processes[pid] = psutil.Process(pid)
                # One /proc read for both; num_fds counts every descriptor (sockets too).
                with process.oneshot():
                    taken.append(
                        Sample(t, group, role, pid, process.memory_info().rss, process.num_fds())
                    )
            except psutil.NoSuchProcess:
                continue
        with open(self.csv_path, "a", newline="") as out:
            writer = csv.writer(out)
            for s in taken:
                writer.writerow([f"{s.t:.1f}", s.group, s.role, s.pid, s.rss, s.fds])
        self.samples += taken
        return taken

    def _run(self) -> None:
        try:
            next_at = self.started
            while not self._stop.is_set():
                t = time.monotonic() - self.started
                self.sample()
                self.after_sample(t)
                next_at += self.interval
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> list[Sample]:
        """Stop sampling (after one last round) and return every sample."""
        self._stop.set()
        self._thread.join(timeout=60)
        if self.error is not None:
            raise RuntimeError(f"sampling failed: {self.error!r}") from self.error
        return self.samples


def read_samples(csv_path: Path) -> list[Sample]:
    """Read back the samples a `Sampler` wrote (to draw a run's chart again)."""
    with open(csv_path, newline="") as source:
        return [
            Sample(
                float(r["t"]), r["group"], r["role"], int(r["pid"]), int(r["rss"]), int(r["fds"])
            )
            for r in csv.DictReader(source)
        ]


def named(samples: list[Sample]) -> dict[str, list[Sample]]:
    """Group samples by process: its group's name, numbered when the group had several."""
    pids: dict[str, list[int]] = {}
    for s in samples:
        seen = pids.setdefault(s.group, [])
        if s.pid not in seen:
            seen.append(s.pid)
    out: dict[str, list[Sample]] = {}
    for s in samples:
        group = pids[s.group]
        name = s.group if len(group) == 1 else f"{s.group} {group.index(s.pid) + 1}"
        out.setdefault(name, []).append(s)
    return out


@dataclass
class Growth:
    """One process from the end of the warm-up to the end of the run."""

    name: str
    role: str
    pid: int
    samples: int  # after the warm-up
    rss_start: float  # median of the first 3 samples after the warm-up
    rss_end: float  # median of the last 3
    fds_start: float
    fds_end: float
    # Least-squares slope of RSS after the warm-up, bytes per hour: a steady
    # leak shows here even when it is too slow to pass the 10% within one run.
    rss_slope: float = 0.0
    # Why the process cannot be judged as one whole run (it came or went).
    problem: str = ""

    @property
    def rss_growth(self) -> float:
        """Relative RSS growth after the warm-up."""
        return self.rss_end / self.rss_start - 1 if self.rss_start else 0.0

    @property
    def fds_growth(self) -> float:
        """Relative open-files growth after the warm-up."""
        return self.fds_end / self.fds_start - 1 if self.fds_start else 0.0

    def met(self, limit: float, fd_slack: int) -> bool:
        """RSS grew by at most `limit`, open files by at most `limit` or `fd_slack` files."""
        fds_ok = self.fds_end <= max(self.fds_start * (1 + limit), self.fds_start + fd_slack)
        return not self.problem and self.rss_growth <= limit and fds_ok


def growth(samples: list[Sample], warmup: float) -> list[Growth]:
    """Growth of every process after `warmup` seconds: a process must last the whole run."""
    end = max((s.t for s in samples), default=0.0)
    out = []
    for name, mine in named(samples).items():
        after = [s for s in mine if s.t >= warmup]
        problem = ""
        if mine[0].t >= warmup:
            problem = f"started during the run (at {mine[0].t:.0f}s)"
        elif mine[-1].t < end:
            problem = f"gone during the run (after {mine[-1].t:.0f}s)"
        elif len(after) < 6:
            problem = f"only {len(after)} samples after the warm-up"
        head, tail = after[:3] or mine[-3:], after[-3:] or mine[-3:]
        slope = 0.0
        if len(after) >= 2 and after[0].t != after[-1].t:
            fit = statistics.linear_regression([s.t for s in after], [s.rss for s in after])
            slope = fit.slope * 3600
        out.append(
            Growth(
                name=name,
                role=mine[0].role,
                pid=mine[0].pid,
                samples=len(after),
                rss_start=statistics.median(s.rss for s in head),
                rss_end=statistics.median(s.rss for s in tail),
                fds_start=statistics.median(s.fds for s in head),
                fds_end=statistics.median(s.fds for s in tail),
                rss_slope=slope,
                problem=problem,
            )
        )
    return out


def table(rows: list[Growth], limit: float, fd_slack: int) -> str:
    """The growth of every process, judged ones first, as a fixed-width table."""
    header = ["process", "pid", "RSS MB", "->", "growth", "MB/h", "files", "->", "verdict"]
    body = []
    for g in sorted(rows, key=lambda g: (g.role != SYSTEM, g.name)):
        verdict = "(load)"
        if g.role == SYSTEM:
            verdict = "met" if g.met(limit, fd_slack) else "MISSED"
        body.append(
            [
                g.name,
                str(g.pid),
                f"{g.rss_start / 2**20:.1f}",
                f"{g.rss_end / 2**20:.1f}",
                f"{g.rss_growth:+.1%}",
                f"{g.rss_slope / 2**20:+.1f}",
                f"{g.fds_start:.0f}",
                f"{g.fds_end:.0f}",
                verdict + (f" ({g.problem})" if g.problem else ""),
            ]
        )
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 8) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def chart(samples: list[Sample], warmup: float, path: Path, title: str) -> None:
    """Draw RSS and open files of every process over time, the warm-up shaded, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (rss_ax, fds_ax) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    for name, mine in sorted(named(samples).items(), key=lambda item: item[1][0].role != SYSTEM):
        minutes = [s.t / 60 for s in mine]
        style = {"linewidth": 1.6} if mine[0].role == SYSTEM else {"linewidth": 1, "ls": ":"}
        label = name if mine[0].role == SYSTEM else f"{name} (load)"
        rss_ax.plot(minutes, [s.rss / 2**20 for s in mine], label=label, **style)
        fds_ax.plot(minutes, [s.fds for s in mine], label=label, **style)
    for ax in (rss_ax, fds_ax):
        ax.axvspan(0, warmup / 60, color="grey", alpha=0.15, lw=0)
        ax.grid(alpha=0.3, which="both")
        # Log scales: a growth of 10% is as tall for a small process as for a big one.
        ax.set_yscale("log")
        for axis, labels in (
            (ax.yaxis.set_major_formatter, True),
            (ax.yaxis.set_minor_formatter, ax is rss_ax),
        ):
            formatter = ScalarFormatter()
            formatter.set_scientific(False)
            # Open files span decades: their minor ticks unlabelled, or the labels overlap.
            axis(formatter if labels else NullFormatter())
    rss_ax.text(
        warmup / 120, 0.97, "warm-up", transform=rss_ax.get_xaxis_transform(), va="top", ha="center"
    )
    rss_ax.set_ylabel("RSS (MiB)")
    fds_ax.set_ylabel("open files")
    fds_ax.set_xlabel("minutes")
    rss_ax.set_title(title, fontsize=10)
    rss_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
