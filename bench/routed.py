"""Issue 13's workloads: many topics with one subscriber each, and many web workers.

- own-topics: every client on a topic of its own, one recipient per
  publication, published durably to Tidings (`XADD tidings:ingest`) and on
  pub/sub to the sharded Node peer (it has no durable path): a paced rate
  (latency, CPU per publication), a burst (loss), then rising rates until
  p99 reaches 200 ms or something is lost (the ceiling);
- fast-burst: 100,000 pub/sub publications as fast as the publisher
  pipelines them, on one topic and over 1,000 topics (loss);
- scale-out: Tidings with 1, 2, 4 and 8 web workers, clients on disjoint
  topics: CPU per delivery against the number of workers, and what each
  worker received (interest routing: only its own clients' topics).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable

from bench.load import Generators, Publisher
from bench.systems import System, Tidings, stop_all
from bench.workloads import (
    Context,
    Measurement,
    Row,
    _connect,
    _measure,
    _probe,
    aggregate,
    interleaved,
)
from tidings import stats

# The ceiling: the highest rate whose p99 stays under this, with nothing lost.
CEILING_P99_MS = 200.0


def _own_topics(prefix: str, clients: int) -> list[str]:
    """The topics of `clients` clients holding one topic each (loadgen.js names them so)."""
    return [f"{prefix}{k}" for k in range(clients)]


def _label(system: System, durable: bool) -> str:
    return system.name + (" (ingest)" if durable else "")


# -- own-topics ------------------------------------------------------------------------------


class Held:
    """One system's own-topic clients, connected once for every phase of the workload."""

    def __init__(self, ctx: Context, system: System, durable: bool) -> None:
        self.system = system
        self.name = _label(system, durable)
        self.prefix = f"public.bench.own.{secrets.token_hex(3)}."
        self.clients = ctx.sizes.own_clients
        self.topics = _own_topics(self.prefix, self.clients)
        self.publisher = Publisher(system.redis_url, durable=durable)
        self.gens: Generators | None = None
        self.connect_s = 0.0
        # Set when a phase failed: the system sits out the rest.
        self.failed = False

    def connect(self, ctx: Context) -> None:
        """Connect and subscribe every client, and prove each topic's path with one publication."""
        self.gens, self.connect_s = _connect(
            ctx, self.system, self.clients, [], own_prefix=self.prefix, name="own-topics"
        )
        prober = Publisher(self.system.redis_url)
        try:
            _probe(ctx, self.gens, prober, self.topics, want=self.clients)
        finally:
            prober.close()

    def paced(self, rate: float, seconds: float) -> None:
        """Publish round robin over the own topics at `rate` for `seconds`."""
        topics = self.topics
        self.publisher.paced([(rate, lambda k: topics[k % len(topics)])], seconds)

    def measure(self, ctx: Context, publish: Callable[[Held], None]) -> Measurement:
        """Publish, wait for every delivery, and forget what was received for the next phase."""
        assert self.gens is not None
        try:
            return _measure(
                ctx,
                self.system,
                self.gens,
                self.publisher,
                lambda: publish(self),
                lambda expected: sum(expected.values()),
            )
        finally:
            self.gens.reset()
            self.publisher.restart()

    def close(self) -> None:
        """Close the clients and the publisher."""
        if self.gens is not None:
            self.gens.close()
        self.publisher.close()


def past_ceiling(row: Row) -> bool:
    """Tell whether a paced row is past the ceiling: p99 at 200 ms or more, or anything lost."""
    return (
        row.p99_ms is None
        or row.p99_ms >= CEILING_P99_MS
        or row.lost > 0
        or row.delivered < row.expected
    )


def _phase(
    ctx: Context,
    items: list[Held],
    workload: str,
    rate: float | None,
    publish: Callable[[Held], None],
) -> list[Row]:
    """One measurement on each of `items`, in turn; a failed one takes its system out."""
    rows = []
    for item in items:
        ctx.log(f"{workload}: {item.name}")
        try:
            run = item.measure(ctx, publish)
            row = aggregate(workload, item.name, item.clients, [run], item.connect_s)
        except Exception as exc:
            ctx.log(f"  failed: {exc}")
            row = Row(workload=workload, system=item.name, clients=item.clients)
            row.notes.append(f"failed run: {str(exc)[:300]}")
            item.failed = True
        row.rate = rate
        rows.append(row)
    return rows


def own_topics(ctx: Context, variants: list[tuple[System, bool]]) -> list[Row]:
    """Own-topic clients on every variant: paced, burst, then the ceiling, phase by phase.

    Each phase runs on every system in turn before the next, so a noisy
    moment of the machine lands on all of them. A system leaves the ceiling
    search at its first rate whose p99 reaches 200 ms or that loses anything;
    then up to `ceiling_bisect` midpoints narrow the bracket.
    """
    s = ctx.sizes
    held = [Held(ctx, system, durable) for system, durable in variants]
    rows: list[Row] = []
    try:
        for item in held:
            ctx.log(f"own-topics: connecting {item.clients} clients to {item.name}")
            try:
                item.connect(ctx)
            except Exception as exc:
                ctx.log(f"  failed: {exc}")
                item.failed = True
                row = Row(workload="own-topics", system=item.name, clients=item.clients)
                row.notes.append(f"failed to connect: {str(exc)[:300]}")
                rows.append(row)

        def live() -> list[Held]:
            return [item for item in held if not item.failed]

        base = _phase(
            ctx,
            live(),
            f"own-topics {s.own_rate:,.0f}/s",
            s.own_rate,
            lambda item: item.paced(s.own_rate, s.own_seconds),
        )
        burst = _phase(
            ctx,
            live(),
            "own-topics burst",
            None,
            lambda item: item.publisher.burst_over(item.topics, s.own_burst),
        )
        for row in burst:
            row.notes.insert(0, f"{s.own_burst:,} publications over {s.own_clients} topics")
        order = [item.name for item in held]
        # The ceiling's rows by rate: its midpoints run last.
        steps = sorted(
            _ceiling(ctx, live(), base), key=lambda r: (r.rate or 0, order.index(r.system))
        )
        rows += base + burst + steps
    finally:
        for item in held:
            item.close()
    return rows


def own_rows(rows: Iterable[Row], system: str) -> list[Row]:
    """A system's paced own-topics rows (the main rate and the ceiling's), by rate."""
    paced = ("own-topics ", "ceiling ")
    mine = [r for r in rows if r.system == system and r.workload.startswith(paced)]
    return sorted((r for r in mine if r.rate is not None), key=lambda r: r.rate or 0)


def ceiling(rows: Iterable[Row], system: str) -> tuple[float | None, Row | None]:
    """The highest paced own-topics rate with p99 < 200 ms and nothing lost, and the first above.

    Rates are taken in increasing order; the first that fails ends the search.
    """
    good: float | None = None
    for row in own_rows(rows, system):
        if past_ceiling(row):
            return good, row
        good = row.rate
    return good, None


def _ceiling(ctx: Context, held: list[Held], base: list[Row]) -> list[Row]:
    """Every fixed rate on every system, then midpoints of each system's bracket."""
    s = ctx.sizes
    rows: list[Row] = []

    def step(rate: float, items: list[Held]) -> None:
        rows.extend(
            _phase(
                ctx,
                items,
                f"ceiling {rate:,.0f}/s",
                rate,
                lambda item: item.paced(rate, s.ceiling_seconds),
            )
        )

    for rate in sorted(float(r) for r in s.ceiling_rates.split(",") if r.strip()):
        step(rate, [item for item in held if not item.failed])
    for _ in range(s.ceiling_bisect):
        for item in held:
            good, bad = ceiling(base + rows, item.name)
            if item.failed or bad is None or bad.rate is None:
                continue
            middle = round(((good or 0) + bad.rate) / 2, -2)
            if (good or 0) < middle < bad.rate:
                step(middle, [item])
    return rows


# -- fast-burst ------------------------------------------------------------------------------


def fast_burst_once(ctx: Context, system: System, *, spread: bool) -> tuple[Measurement, float]:
    """`fast_burst` pub/sub publications, pipelined: to one topic, or spread over own topics."""
    s = ctx.sizes
    if spread:
        prefix = f"public.bench.fast.{secrets.token_hex(3)}."
        clients = s.fast_burst_topics
        topics = _own_topics(prefix, clients)
        gens, connect = _connect(ctx, system, clients, [], own_prefix=prefix, name="fast-burst")
    else:
        clients = s.fast_burst_clients
        topics = ["public.bench.fast"]
        gens, connect = _connect(ctx, system, clients, topics, name="fast-burst")
    publisher = Publisher(system.redis_url)
    try:
        _probe(ctx, gens, publisher, topics, want=clients)
        run = _measure(
            ctx,
            system,
            gens,
            publisher,
            lambda: publisher.burst_over(topics, s.fast_burst),
            lambda expected: sum(expected.values()) * (1 if spread else clients),
        )
    finally:
        gens.close()
        publisher.close()
    return run, connect


def fast_bursts(ctx: Context, systems: list[System]) -> list[Row]:
    """The fast-path burst on one topic and over `fast_burst_topics` topics, every system."""
    s = ctx.sizes
    variants = [(system, False) for system in systems]
    one = interleaved(
        ctx,
        "fast-burst 1 topic",
        variants,
        lambda c, system: fast_burst_once(c, system, spread=False),
        1,
        s.fast_burst_clients,
    )
    spread = interleaved(
        ctx,
        f"fast-burst {s.fast_burst_topics:,} topics",
        variants,
        lambda c, system: fast_burst_once(c, system, spread=True),
        1,
        s.fast_burst_topics,
    )
    for row in one + spread:
        row.notes.insert(0, f"{s.fast_burst:,} PUBLISH, pipelined by 100")
    return one + spread


# -- scale-out -------------------------------------------------------------------------------


def _routed_counts(system: Tidings, after_ms: float, timeout: float = 10) -> dict[int, dict]:
    """Every web worker's stats hash, once each was refreshed after `after_ms` (epoch ms).

    The workers rewrite their hash about once a second with their counters
    since they started; a refresh after the last delivery holds all of it.
    """
    client = system.redis()
    deadline = time.monotonic() + timeout
    try:
        while True:
            webs = stats.read_webs(client)
            fresh = [w for w in webs if int(w.get("updated_ms", 0)) > after_ms]
            if len(fresh) >= system.workers or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        client.close()
    if len(fresh) < system.workers:
        raise RuntimeError(f"{len(fresh)} of {system.workers} web workers refreshed their stats")
    return {
        int(w["worker"].rsplit(":", 1)[1]): {
            "clients": int(w.get("clients", 0)),
            "received": int(w.get("routed_received", 0)),
            "delivered": int(w.get("routed_delivered", 0)),
        }
        for w in fresh
    }


def scale_once(ctx: Context, system: System, *, durable: bool = True) -> tuple[Measurement, float]:
    """Clients on disjoint topics, a durable paced rate over them; each worker's routed counts."""
    assert isinstance(system, Tidings)
    s = ctx.sizes
    # Topics of their own per run: an earlier run's channels may still linger.
    prefix = f"public.bench.scale.{secrets.token_hex(3)}."
    topics = _own_topics(prefix, s.scale_clients)
    gens, connect = _connect(ctx, system, s.scale_clients, [], own_prefix=prefix, name="scale-out")
    prober = Publisher(system.redis_url)
    publisher = Publisher(system.redis_url, durable=durable)
    try:
        _probe(ctx, gens, prober, topics, want=s.scale_clients)
        before = _routed_counts(system, time.time() * 1000 + 20)
        run = _measure(
            ctx,
            system,
            gens,
            publisher,
            lambda: publisher.paced(
                [(s.scale_rate, lambda k: topics[k % len(topics)])], s.scale_seconds
            ),
            lambda expected: sum(expected.values()),
        )
        after = _routed_counts(system, time.time() * 1000 + 20)
    finally:
        gens.close()
        prober.close()
        publisher.close()
    run.workers = {
        pid: {
            "clients": counts["clients"],
            "received": counts["received"] - before.get(pid, {}).get("received", 0),
            "delivered": counts["delivered"] - before.get(pid, {}).get("delivered", 0),
        }
        for pid, counts in after.items()
    }
    return run, connect


def scale_workers(ctx: Context) -> list[int]:
    """The numbers of web workers scale-out compares."""
    return [int(n) for n in ctx.sizes.scale_workers.split(",") if n.strip()]


def scale_out(ctx: Context) -> list[Row]:
    """Tidings with each number of web workers, started side by side for this workload only."""
    s = ctx.sizes
    started = [
        Tidings(ctx.workdir / "scale-out" / f"tidings-{n}w", workers=n) for n in scale_workers(ctx)
    ]
    try:
        for system in started:
            system.start()
        for system in started:
            system.wait_ready()
        ctx.log("scale-out: ready: " + ", ".join(system.name for system in started))
        rows = interleaved(
            ctx,
            "scale-out",
            [(system, True) for system in started],
            scale_once,
            s.scale_reps,
            s.scale_clients,
        )
    finally:
        stop_all(started)
    for row in rows:
        row.rate = s.scale_rate
        if row.workers:
            shares = ", ".join(
                f"{w['clients']}/{w['received']:,}/{w['delivered']:,}"
                for w in sorted(row.workers, key=lambda w: -w["clients"])
            )
            row.notes.insert(0, f"per worker, clients/received/delivered over the runs: {shares}")
    return rows
