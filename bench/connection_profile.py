"""What one idle websocket costs a web worker, and where it goes (issue 16; bench/PROFILE.md).

    .venv/bin/python -m bench.connection_profile [--clients 2000] [--commit main]

One web worker (`gunicorn -c gunicorn.conf.py`, run from this tree or from
`--commit`'s exported tree) on a Redis of its own; no listener (idle clients
need none). The gunicorn config is wrapped to start `bench/connection_probe.py`
in the worker (tracemalloc from the worker's start). 50 clients connect first
(one-time costs), the probe marks, `--clients` more connect and subscribe
(bench/peers/loadgen.js), and the probe reports what the worker allocated
since the mark, by allocation site and by type, and what one connection's
own objects measure (`sys.getsizeof`). Printed per connection, beside the
worker's RSS growth per connection.
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.load import Generators
from bench.systems import ensure_node_modules, export
from tests.support import ROOT, VENV_BIN, Proc, RedisServer, Stack, wait_for

TOPIC = "public.bench.idle"
PROBE = ROOT / "bench" / "connection_probe.py"

CONFIG = """\
# Written by bench.connection_profile: the tree's gunicorn.conf.py, plus the probe.
import runpy as _runpy

globals().update(
    {{k: v for k, v in _runpy.run_path("gunicorn.conf.py").items() if not k.startswith("__")}}
)


def post_worker_init(worker):
    import importlib.util

    spec = importlib.util.spec_from_file_location("connection_probe", {probe!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.start(worker, {directory!r})
"""


class ProbedStack(Stack):
    """A Stack whose one web worker runs the probe; from `source` (another tree) if given."""

    def __init__(self, server: RedisServer, directory: Path, source: Path, **env: str) -> None:
        super().__init__(server, directory, **env)
        self.source = source
        self.probe_dir = directory / "probe"
        self.probe_dir.mkdir()

    def start_web(self, wait: bool = True, **env: str) -> Proc:
        """Start gunicorn with the wrapped config, in the source tree."""
        config = self.directory / "profile.conf.py"
        config.write_text(CONFIG.format(probe=str(PROBE), directory=str(self.probe_dir)))
        gunicorn = shlex.quote(str(VENV_BIN / "gunicorn"))
        command = (
            f"cd {shlex.quote(str(self.source))} && exec {gunicorn} -c {shlex.quote(str(config))}"
        )
        log = self.directory / "web.log"
        self.web = Proc("web", ["sh", "-c", command], {**self.env, **env}, log)
        if wait:
            wait_for(self.serves, timeout=30)
        return self.web

    def ask(self, name: str, timeout: float = 120) -> dict[str, Any]:
        """Have the probe `mark` or `report`; return its answer."""
        answer = self.probe_dir / f"{name}.json"
        answer.unlink(missing_ok=True)
        (self.probe_dir / "request").write_text(name)
        wait_for(answer.exists, timeout=timeout)
        found = json.loads(answer.read_text())
        if "error" in found:
            raise RuntimeError(f"probe: {found['error']}")
        return found


def profile(clients: int, commit: str | None, workdir: Path) -> dict[str, Any]:
    """Connect `clients` idle websockets to one probed worker; return the probe's report."""
    source = ROOT if commit is None else export(commit, workdir / "src")
    server = RedisServer(workdir / "redis")
    server.start()
    stack = ProbedStack(
        server,
        workdir,
        source,
        TIDINGS_MAX_CONNECTIONS_PER_IP="1000000",
        TIDINGS_WORKER_CONNECTIONS=str(clients + 1000),
    )
    warm = gens = None
    try:
        stack.start_web()
        assert stack.web is not None
        worker = wait_for(lambda: psutil.Process(stack.web.pid).children(), timeout=30)[0]
        warm = Generators(stack.url, 50, processes=1, topics=[TOPIC], workdir=workdir / "warm")
        warm.wait_ready()
        stack.ask("mark")
        rss = worker.memory_info().rss
        cpu = sum(worker.cpu_times()[:2])
        started = time.monotonic()
        gens = Generators(stack.url, clients, processes=2, topics=[TOPIC], workdir=workdir / "g")
        _, failed, errors = gens.wait_ready()
        seconds = time.monotonic() - started
        if failed:
            raise RuntimeError(f"{failed} clients failed: {errors[:3]}")
        grown = worker.memory_info().rss - rss
        used = sum(worker.cpu_times()[:2]) - cpu
        report = stack.ask("report")
        report.update(
            clients=clients,
            rss_per_connection=grown / clients,
            cpu_ms_per_connection=used / clients * 1e3,
            connect_seconds=seconds,
            commit=commit or "this tree",
        )
        return report
    finally:
        for group in (gens, warm):
            if group is not None:
                group.close()
        stack.stop()
        server.stop()


def summary(report: dict[str, Any], top: int = 15) -> str:
    """The report per connection, as text."""
    n = report["clients"]
    traced = report["traced_bytes"] / n
    lines = [
        f"{report['commit']}: {n:,} idle websockets, RSS +{report['rss_per_connection'] / 1024:.2f}"
        f" KB each, traced +{traced / 1024:.2f} KB each (tracemalloc: Python allocations), "
        f"{report['cpu_ms_per_connection']:.2f} ms CPU each while tracing, "
        f"{report['connect_seconds']:.1f} s to connect",
        "",
        "bytes per connection by allocation site (innermost project or library frame):",
    ]
    lines += [f"  {size / n:8.0f}  {site}" for site, size in report["sites"][:top]]
    lines += ["", "objects per connection by type:"]
    lines += [f"  {count / n:8.2f}  {name}" for name, count in report["types"][:top]]
    lines += ["", "one connection's own objects (sys.getsizeof, bytes):"]
    lines += [f"  {size:8}  {name}" for name, size in report["held"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--commit", default=None, help="profile this commit's code instead")
    args = parser.parse_args()
    ensure_node_modules()
    workdir = Path(tempfile.mkdtemp(prefix="tidings-connprofile-"))
    report = profile(args.clients, args.commit, workdir)
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    print(summary(report))
    print(f"\n(raw report: {workdir / 'report.json'})")


if __name__ == "__main__":
    main()
