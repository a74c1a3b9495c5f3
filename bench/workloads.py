"""The five workloads of issue 7, each measured the same way on every system.

(Issue 13's own-topics, fast-burst and scale-out are in bench/routed.py.)

A measurement: the clients connect and subscribe (timed), one probe
publication per shared topic proves the path end to end and warms it up, then
the server processes' CPU time is read, the publications go out, the harness
waits until every expected delivery arrived (or none arrived for a while),
and CPU is read again. Resident memory is sampled every 100 ms meanwhile.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.load import Delivery, Generators, Publisher, now_ms
from bench.measure import PeakSampler, cpu_seconds, rss_bytes
from bench.systems import System, Tidings

MB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    """Every knob of the workloads; FULL is issue 7's, QUICK a smoke-sized copy."""

    burst_clients: int = 100
    burst_publications: int = 2000
    burst_reps: int = 3
    sustained_clients: int = 1000
    sustained_rate: float = 20
    sustained_seconds: float = 30
    sustained_reps: int = 1
    light_clients: int = 100
    light_rate: float = 200
    light_seconds: float = 8
    light_reps: int = 3
    many_clients: int = 1000
    many_shared_rate: float = 10  # publications/s on the shared topic (to every client)
    many_own_rate: float = 1000  # publications/s over the own topics (round robin)
    many_seconds: float = 10
    many_reps: int = 1
    connections: int = 10000
    connections_hold: float = 60
    connections_processes: int = 4
    # The systems' clients come from 127.0.0.<this>, <this + 1>, ...: about
    # 28,000 ports each, which TIME_WAIT holds for a minute after a run (pick
    # others for runs in quick succession, or beside another benchmark).
    connections_first_address: int = 10
    # The same two over SSE streams (`GET /sse`) instead of websockets, Tidings with one web worker.
    sse_sustained_clients: int = 1000
    sse_connections: int = 10000
    # Issue 13 (bench/routed.py): every client on a topic of its own.
    own_clients: int = 1000
    own_rate: float = 2000  # durable publications/s over the own topics, round robin
    own_seconds: float = 10
    own_burst: int = 20000
    ceiling_rates: str = "10000,20000"  # fixed points, each run on every system
    ceiling_bisect: int = 2  # then midpoints between the highest good and the first bad rate
    ceiling_seconds: float = 5
    fast_burst: int = 100000  # pub/sub publications per fast burst
    fast_burst_clients: int = 5  # on the one topic
    fast_burst_topics: int = 1000  # one client each
    scale_workers: str = "1,2,4,8"
    scale_clients: int = 400
    scale_rate: float = 1600
    scale_seconds: float = 6
    scale_reps: int = 2
    generator_processes: int = 2
    settle: float = 5.0  # seconds without a delivery before the rest counts as lost


FULL = Sizes()
QUICK = Sizes(
    burst_clients=20,
    burst_publications=200,
    burst_reps=1,
    sustained_clients=100,
    sustained_seconds=2,
    light_clients=20,
    light_seconds=1.5,
    light_reps=1,
    many_clients=100,
    many_own_rate=100,
    many_seconds=1.5,
    connections=500,
    connections_hold=1,
    connections_processes=2,
    sse_sustained_clients=100,
    sse_connections=500,
    own_clients=100,
    own_rate=400,
    own_seconds=1.5,
    own_burst=2000,
    ceiling_rates="1000,2000",
    ceiling_seconds=1,
    fast_burst=5000,
    fast_burst_clients=2,
    fast_burst_topics=100,
    scale_workers="1,2",
    scale_clients=40,
    scale_rate=200,
    scale_seconds=1.5,
    scale_reps=1,
    settle=2.0,
)


@dataclass
class Row:
    """One line of the results table."""

    workload: str
    system: str
    clients: int
    publications: int = 0
    expected: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    deliveries_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    peak_rss_mb: float | None = None
    cpu_us_per_delivery: float | None = None
    generator_us_per_delivery: float | None = None
    connect_s: float | None = None
    kb_per_connection: float | None = None
    # Server CPU (every server process) per connection while the clients connected.
    connect_cpu_ms: float | None = None
    # Publications per second offered, for paced rows of issue 13.
    rate: float | None = None
    # Per web worker (Tidings' stats hashes): pid, and summed over the runs its
    # clients and the routed publications it received and delivered.
    workers: list[dict[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Measurement:
    """One measured run of publications against connected clients."""

    delivery: Delivery
    expected: int
    publications: int
    seconds: float
    server_cpu: float
    generator_cpu: float
    peak_rss: int
    subscribe_retries: int = 0
    # Per web worker pid: routed publications received and delivered in the window.
    workers: dict[int, dict[str, int]] | None = None
    # CPU seconds of each server process (with its children) and of Redis, in the window.
    cpu_parts: dict[str, float] = field(default_factory=dict)

    @property
    def deliveries_per_s(self) -> float:
        return self.delivery.delivered / self.seconds if self.seconds > 0 else 0.0

    def per_delivery_us(self, cpu: float) -> float | None:
        return cpu / self.delivery.delivered * 1e6 if self.delivery.delivered else None

    def summary(self) -> dict[str, Any]:
        d = self.delivery
        return {
            "delivered": d.delivered,
            "expected": self.expected,
            "lost": d.lost,
            "duplicated": d.duplicated,
            "deliveries_per_s": round(self.deliveries_per_s),
            "p50_ms": d.percentile(0.50),
            "p99_ms": d.percentile(0.99),
            "max_ms": max(d.latencies) if d.latencies else None,
            "cpu_us_per_delivery": self.per_delivery_us(self.server_cpu),
            "generator_us_per_delivery": self.per_delivery_us(self.generator_cpu),
            "events": d.events,
            "seconds": round(self.seconds, 3),
            "generator_cores": round(self.generator_cpu / self.seconds, 2)
            if self.seconds
            else None,
            "server_cores": round(self.server_cpu / self.seconds, 2) if self.seconds else None,
            "cores_by_process": {
                name: round(cpu / self.seconds, 2) for name, cpu in self.cpu_parts.items()
            }
            if self.seconds
            else {},
            "unexpected_closes": d.unexpected_closes,
            "unexpected": d.unexpected,
        }


class Context:
    """What every workload needs besides the system: sizes, a scratch folder."""

    def __init__(self, sizes: Sizes, workdir: Path, log: Callable[[str], None]) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.log = log


def _connect(
    ctx: Context,
    system: System,
    clients: int,
    topics: list[str],
    own_prefix: str | None = None,
    processes: int | None = None,
    name: str = "gen",
    local_address: str | None = None,
    transport: str = "websocket",
) -> tuple[Generators, float]:
    gens = Generators(
        system.url,
        clients,
        processes=processes or ctx.sizes.generator_processes,
        topics=topics,
        own_prefix=own_prefix,
        local_address=local_address,
        transport=transport,
        workdir=ctx.workdir / system.name / name,
    )
    try:
        seconds, failed, errors = gens.wait_ready()
    except Exception:
        gens.close()
        raise
    if failed:
        gens.close()
        raise RuntimeError(f"{system.name}: {failed} of {clients} clients failed: {errors[:3]}")
    return gens, seconds


def _probe(
    ctx: Context,
    gens: Generators,
    publisher: Publisher,
    topics: list[str],
    want: int | None = None,
) -> None:
    """One publication per topic must reach its clients (default: every client) before measuring."""
    publisher.send(topics)
    want = gens.clients * len(topics) if want is None else want
    got = gens.wait_received(want, idle=ctx.sizes.settle, deadline=time.monotonic() + 30)
    if got < want:
        raise RuntimeError(f"probe: {got} of {want} deliveries arrived")
    gens.reset()
    publisher.restart()


def _measure(
    ctx: Context,
    system: System,
    gens: Generators,
    publisher: Publisher,
    publish: Callable[[], None],
    expected_total: Callable[[dict[str, int]], int],
) -> Measurement:
    pids = system.server_pids()
    cpu_before = cpu_seconds(pids)
    parts_before = system.cpu_by_process()
    generator_before = gens.cpu()
    with PeakSampler(lambda: rss_bytes(pids)) as sampler:
        start = now_ms()
        publish()
        expected = expected_total(publisher.expected())
        gens.wait_received(
            expected, idle=ctx.sizes.settle, deadline=time.monotonic() + 120 + ctx.sizes.settle
        )
        server_cpu = cpu_seconds(pids) - cpu_before
        generator_cpu = gens.cpu() - generator_before
        parts = system.cpu_by_process()
    delivery = gens.report(publisher.expected())
    seconds = (delivery.last_ms - start) / 1000 if delivery.last_ms else 0.0
    return Measurement(
        delivery=delivery,
        expected=expected,
        publications=sum(publisher.expected().values()),
        seconds=seconds,
        server_cpu=server_cpu,
        generator_cpu=generator_cpu,
        peak_rss=sampler.peak,
        subscribe_retries=gens.subscribe_retries,
        cpu_parts={name: cpu - parts_before.get(name, 0.0) for name, cpu in parts.items()},
    )


def aggregate(
    workload: str, system: str, clients: int, runs: list[Measurement], connect: float
) -> Row:
    """Aggregate runs: sums of counts, medians of rates, latencies and CPU, max of max."""

    def median(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    summaries = [m.summary() for m in runs]
    row = Row(
        workload=workload,
        system=system,
        clients=clients,
        publications=sum(m.publications for m in runs),
        expected=sum(m.expected for m in runs),
        delivered=sum(m.delivery.delivered for m in runs),
        lost=sum(m.delivery.lost for m in runs),
        duplicated=sum(m.delivery.duplicated for m in runs),
        deliveries_per_s=median([m.deliveries_per_s for m in runs]),
        p50_ms=median([s["p50_ms"] for s in summaries]),
        p99_ms=median([s["p99_ms"] for s in summaries]),
        max_ms=max((s["max_ms"] for s in summaries if s["max_ms"] is not None), default=None),
        peak_rss_mb=max(m.peak_rss for m in runs) / MB,
        cpu_us_per_delivery=median([s["cpu_us_per_delivery"] for s in summaries]),
        generator_us_per_delivery=median([s["generator_us_per_delivery"] for s in summaries]),
        connect_s=connect,
        runs=summaries,
    )
    closes = sum(m.delivery.unexpected_closes for m in runs)
    if closes:
        row.notes.append(f"{closes} connections dropped by the server")
    retries = sum(m.subscribe_retries for m in runs)
    if retries:
        what = "streams answered 503" if workload.endswith("(sse)") else "subscribes answered"
        row.notes.append(f"{retries} {what} `unavailable` (retried)")
    unexpected = sum(m.delivery.unexpected for m in runs)
    if unexpected:
        row.notes.append(f"{unexpected} unexpected publications")
    if len(runs) > 1:
        rates = ", ".join(f"{m.deliveries_per_s / 1000:.0f}k" for m in runs)
        p99s = ", ".join(f"{s['p99_ms']:.1f}" for s in summaries if s["p99_ms"] is not None)
        row.notes.append(f"median of {len(runs)} runs ({rates} deliveries/s; p99 {p99s} ms)")
    for m in runs:
        for pid, counts in (m.workers or {}).items():
            mine = next((w for w in row.workers if w["pid"] == pid), None)
            if mine is None:
                row.workers.append({"pid": pid, "clients": 0, "received": 0, "delivered": 0})
                mine = row.workers[-1]
            mine["clients"] += counts["clients"]
            mine["received"] += counts["received"]
            mine["delivered"] += counts["delivered"]
    cores = [s["generator_cores"] for s in summaries if s["generator_cores"] is not None]
    busy = [s["server_cores"] for s in summaries if s["server_cores"] is not None]
    if cores and busy:
        by_process = [s["cores_by_process"] for s in summaries]
        names = list(dict.fromkeys(name for parts in by_process for name in parts))

        def busy_of(name: str) -> str:
            return f"{statistics.median(p.get(name, 0.0) for p in by_process):.2f}"

        split = ", ".join(f"{name} {busy_of(name)}" for name in names if name != "redis")
        row.notes.append(
            f"servers busy {statistics.median(busy):.2f} cores ({split}), "
            + (f"redis {busy_of('redis')}, " if "redis" in names else "")
            + f"generator {statistics.median(cores):.2f}"
        )
    return row


@dataclass(frozen=True)
class Variant:
    """One row's runs: `run(ctx)` measures `workload` once on the system named `name`."""

    workload: str
    name: str
    run: Callable[[Context], tuple[Measurement, float]]
    clients: int


def interleaved(
    ctx: Context,
    workload: str,
    variants: list[tuple[System, bool]],
    once: Callable[..., tuple[Measurement, float]],
    reps: int,
    clients: int,
) -> list[Row]:
    """Run `once` `reps` times on every (system, durable) variant, rotating the order each time."""
    return rotated(ctx, variants_of(workload, variants, once, clients), reps)


def variants_of(
    workload: str,
    variants: list[tuple[System, bool]],
    once: Callable[..., tuple[Measurement, float]],
    clients: int,
) -> list[Variant]:
    """One workload's `Variant`s: `once(ctx, system)`, or `once(ctx, system, durable=True)`."""

    def run(system: System, durable: bool) -> Callable[[Context], tuple[Measurement, float]]:
        if durable:
            return lambda ctx: once(ctx, system, durable=True)
        return lambda ctx: once(ctx, system)

    return [
        Variant(
            workload, system.name + (" (ingest)" if durable else ""), run(system, durable), clients
        )
        for system, durable in variants
    ]


def rotated(ctx: Context, variants: list[Variant], reps: int) -> list[Row]:
    """Run every variant `reps` times, rotating the order each time; a row per variant.

    Interleaving lets a noisy moment of the shared machine hit every system
    (and every workload measured side by side) alike; a failed run is
    recorded in its row, and the others go on.
    """
    runs: list[list[Measurement]] = [[] for _ in variants]
    connects: list[list[float]] = [[] for _ in variants]
    failures: list[list[str]] = [[] for _ in variants]
    order = list(range(len(variants)))
    for rep in range(reps):
        shift = rep % len(variants) if variants else 0
        for k in order[shift:] + order[:shift]:
            variant = variants[k]
            ctx.log(f"{variant.workload} run {rep + 1}/{reps}: {variant.name}")
            try:
                run, connect = variant.run(ctx)
            except Exception as exc:
                ctx.log(f"  failed: {exc}")
                failures[k].append(str(exc)[:300])
                continue
            runs[k].append(run)
            connects[k].append(connect)
    rows = []
    for k, variant in enumerate(variants):
        if runs[k]:
            row = aggregate(
                variant.workload, variant.name, variant.clients, runs[k], max(connects[k])
            )
        else:
            row = Row(workload=variant.workload, system=variant.name, clients=variant.clients)
        row.notes += [f"failed run: {failure}" for failure in failures[k]]
        rows.append(row)
    return rows


# -- 1. burst ------------------------------------------------------------------------


def burst_once(ctx: Context, system: System, *, durable: bool = False) -> tuple[Measurement, float]:
    """100 clients on one topic, 2,000 publications as fast as the publisher pipelines them."""
    sizes = ctx.sizes
    topic = "public.bench.burst"
    publisher = Publisher(system.redis_url, durable=durable)
    gens, connect = _connect(ctx, system, sizes.burst_clients, [topic], name="burst")
    prober = Publisher(system.redis_url)
    try:
        _probe(ctx, gens, prober, [topic])
        run = _measure(
            ctx,
            system,
            gens,
            publisher,
            lambda: publisher.burst(topic, sizes.burst_publications),
            lambda expected: sizes.burst_clients * expected.get(topic, 0),
        )
    finally:
        gens.close()
        publisher.close()
        prober.close()
    return run, connect


# -- 2. sustained, 3. light --------------------------------------------------------------


def paced_one_topic(
    ctx: Context,
    system: System,
    workload: str,
    clients: int,
    rate: float,
    seconds: float,
    transport: str = "websocket",
) -> tuple[Measurement, float]:
    """`clients` on one topic, `rate` publications per second for `seconds`."""
    topic = f"public.bench.{workload}"
    publisher = Publisher(system.redis_url)
    gens, connect = _connect(ctx, system, clients, [topic], name=workload, transport=transport)
    try:
        _probe(ctx, gens, publisher, [topic])
        run = _measure(
            ctx,
            system,
            gens,
            publisher,
            lambda: publisher.paced([(rate, lambda _: topic)], seconds),
            lambda expected: clients * expected.get(topic, 0),
        )
    finally:
        gens.close()
        publisher.close()
    return run, connect


def sustained_once(ctx: Context, system: System) -> tuple[Measurement, float]:
    """1,000 clients on one topic, 20 publications per second for 30 s."""
    s = ctx.sizes
    return paced_one_topic(
        ctx, system, "sustained", s.sustained_clients, s.sustained_rate, s.sustained_seconds
    )


def sustained_sse_once(ctx: Context, system: System) -> tuple[Measurement, float]:
    """The sustained workload over SSE streams (`GET /sse?topic=...`) instead of websockets."""
    s = ctx.sizes
    return paced_one_topic(
        ctx,
        system,
        "sustained.sse",
        s.sse_sustained_clients,
        s.sustained_rate,
        s.sustained_seconds,
        transport="sse",
    )


def light_once(ctx: Context, system: System) -> tuple[Measurement, float]:
    """100 clients on one topic, 200 publications per second: latency."""
    s = ctx.sizes
    return paced_one_topic(ctx, system, "light", s.light_clients, s.light_rate, s.light_seconds)


# -- 4. many topics --------------------------------------------------------------------------


def many_topics_once(ctx: Context, system: System) -> tuple[Measurement, float]:
    """Every client on a topic of its own plus one shared topic; both get traffic."""
    s = ctx.sizes
    shared = "public.bench.shared"
    prefix = "public.bench.own."
    publisher = Publisher(system.redis_url)
    gens, connect = _connect(ctx, system, s.many_clients, [shared], own_prefix=prefix, name="many")
    try:
        _probe(ctx, gens, publisher, [shared])
        streams = [
            (s.many_shared_rate, lambda _: shared),
            (s.many_own_rate, lambda k: f"{prefix}{k % s.many_clients}"),
        ]

        def expected_total(expected: dict[str, int]) -> int:
            own = sum(n for topic, n in expected.items() if topic.startswith(prefix))
            return s.many_clients * expected.get(shared, 0) + own

        run = _measure(
            ctx,
            system,
            gens,
            publisher,
            lambda: publisher.paced(streams, s.many_seconds),
            expected_total,
        )
    finally:
        gens.close()
        publisher.close()
    return run, connect


# -- 5. connections ---------------------------------------------------------------------------


class HeldConnections:
    """Idle clients held on one system: connect them (timed), keep them, check them."""

    def __init__(
        self,
        ctx: Context,
        system: System,
        local_address: str,
        *,
        clients: int,
        transport: str = "websocket",
    ) -> None:
        self.ctx = ctx
        self.local_address = local_address
        self.system = system
        self.clients = clients
        self.transport = transport
        self.workload = "connections" + (" (sse)" if transport == "sse" else "")
        self.topic = "public.bench.idle"
        self.baseline = system.web_rss()
        self.cpu_before = 0.0
        self.sampler = PeakSampler(system.web_rss, interval=0.5).__enter__()
        self.total_sampler = PeakSampler(lambda: rss_bytes(system.server_pids()), 0.5).__enter__()
        self.gens: Generators | None = None
        self.connect_s: float | None = None
        self.connect_cpu = 0.0
        self.held_since = 0.0
        self.error: str | None = None

    def connect(self) -> None:
        """Connect and subscribe every client; time it."""
        self.baseline = self.system.web_rss()
        self.cpu_before = cpu_seconds(self.system.server_pids())
        try:
            self.gens, self.connect_s = _connect(
                self.ctx,
                self.system,
                self.clients,
                [self.topic],
                processes=self.ctx.sizes.connections_processes,
                name=self.workload.replace(" (sse)", "-sse"),
                local_address=self.local_address,
                transport=self.transport,
            )
        except Exception as exc:
            self.error = str(exc)[:300]
        self.connect_cpu = cpu_seconds(self.system.server_pids()) - self.cpu_before
        self.held_since = time.monotonic()

    def finish(self) -> Row:
        """Check that every client is still there and gets a publication; close them."""
        self.sampler.__exit__()
        self.total_sampler.__exit__()
        sizes = self.ctx.sizes
        clients = self.clients
        row = Row(workload=self.workload, system=self.system.name, clients=clients)
        row.connect_s = self.connect_s
        row.peak_rss_mb = self.total_sampler.peak / MB
        if self.gens is None:
            row.notes.append(f"failed: {self.error}")
            row.lost = clients
            return row
        publisher = Publisher(self.system.redis_url)
        try:
            stat = self.gens.stat()
            held = time.monotonic() - self.held_since
            publisher.send([self.topic])
            self.gens.wait_received(clients, idle=sizes.settle, deadline=time.monotonic() + 60)
            delivery = self.gens.report(publisher.expected())
        finally:
            self.gens.close()
            publisher.close()
        row.publications = 1
        row.expected = clients
        row.delivered = delivery.delivered
        row.lost = delivery.lost
        row.duplicated = delivery.duplicated
        row.p50_ms = delivery.percentile(0.5)
        row.p99_ms = delivery.percentile(0.99)
        row.max_ms = max(delivery.latencies) if delivery.latencies else None
        row.kb_per_connection = (self.sampler.peak - self.baseline) / clients / 1024
        row.connect_cpu_ms = self.connect_cpu / clients * 1e3
        keepalives = f", {stat['keepalives']:,.0f} keep-alives" if self.transport == "sse" else ""
        row.notes.append(
            f"held {held:.0f}s, {stat['open']:.0f} open at the end{keepalives}; "
            f"server CPU {self.connect_cpu / clients * 1e3:.2f} ms/connection; "
            f"web process RSS {self.baseline / MB:.0f} -> {self.sampler.peak / MB:.0f} MB"
        )
        if delivery.unexpected_closes:
            row.notes.append(f"{delivery.unexpected_closes} connections dropped by the server")
        if self.gens.subscribe_retries:
            what = "streams answered 503" if self.transport == "sse" else "subscribes answered"
            row.notes.append(f"{self.gens.subscribe_retries} {what} `unavailable` (retried)")
        return row


def connections(ctx: Context, systems: list[System], *, sse: bool = False) -> list[Row]:
    """10,000 idle clients on one web worker of each system, held together for 60 s.

    The systems are connected one after the other (each connect is timed
    alone) and then held side by side, so the hold costs 60 s once. With
    `sse`, a Tidings with one web worker started for it holds
    `sse_connections` idle SSE streams among them: a worker of its own, since
    one that held websockets before would reuse their freed memory.
    """
    s = ctx.sizes
    # As many streams as connect at once (the generators' concurrency).
    warm_streams = 100 * s.connections_processes
    fresh = None
    if sse:
        fresh = Tidings(
            ctx.workdir / "connections-sse" / "tidings-1w",
            workers=1,
            # Room for the warm-up streams too: a full gevent pool stops accepting.
            env={"TIDINGS_WORKER_CONNECTIONS": str(max(10000, s.sse_connections + warm_streams))},
        )
        fresh.start()
    warm: Generators | None = None
    try:
        held = [
            HeldConnections(
                ctx,
                system,
                f"127.0.0.{s.connections_first_address + index}",
                clients=s.connections,
            )
            for index, system in enumerate(systems)
        ]
        for item in held:
            _hold(ctx, item)
        if fresh is not None:
            fresh.wait_ready()
            # Streams held on a topic of their own before the baseline: what a
            # worker's first streams allocate for good (a Redis connection per
            # history read in flight) is then not counted per stream, as it is
            # not in the websocket rows, whose worker ran other workloads first.
            warm, _ = _connect(
                ctx,
                fresh,
                warm_streams,
                ["public.bench.warm"],
                processes=s.connections_processes,
                name="warm-up",
                transport="sse",
            )
            item = HeldConnections(
                ctx,
                fresh,
                f"127.0.0.{s.connections_first_address + len(systems)}",
                clients=s.sse_connections,
                transport="sse",
            )
            _hold(ctx, item)
            held.append(item)
        rows = []
        for item in held:
            wait = item.held_since + s.connections_hold - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            rows.append(item.finish())
    finally:
        if warm is not None:
            warm.close()
        if fresh is not None:
            # Its rows are done: a graceful stop would wait out gunicorn's
            # grace period (5 s) on streams whose clients have gone.
            fresh.kill()
    if fresh is not None:
        rows[-1].notes.insert(
            0, f"a Tidings of its own, {warm_streams} streams held on another topic meanwhile"
        )
    return rows


def _hold(ctx: Context, item: HeldConnections) -> None:
    """Connect one system's idle clients, and say how long it took."""
    ctx.log(f"  {item.workload}: connecting {item.clients} clients to {item.system.name}")
    item.connect()
    ctx.log(f"    {item.system.name}: connected in {item.connect_s or 0:.1f}s")
