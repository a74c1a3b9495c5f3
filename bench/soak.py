"""A soak: half an hour of mixed load on a real stack; does any process grow, is anything lost?

    .venv/bin/python -m bench.soak [--minutes 30] [--warmup-minutes 5] [--out-png bench/soak.png]

The system: `gunicorn -c gunicorn.conf.py` with two web workers, `celery -A
tasks worker`, a redis-server of its own. The load, all of it for the whole run:

- sustained: 1,000 Node clients (bench/peers/loadgen.js) on one topic, 20
  durable publications/s;
- own topics: 200 Node clients, each on a topic of its own, 200 publications/s
  over them, half durable (`XADD tidings:ingest`) and half fast (`PUBLISH
  tidings:topic:<t>`);
- churn: 10 raw Socket.IO clients that connect, subscribe, unsubscribe and
  disconnect in a loop; each connection also subscribes a fresh topic and
  publishes one durable publication to it, which must arrive;
- a stalling client: every 2 minutes (but not just before the samples the
  verdict compares) one checking client stops reading while a topic of its
  own is flooded, until the server cuts it as a slow client; it reconnects
  and recovers with `since`;
- checking clients: 4 `TidingsClient`s on the sustained topic and a few own
  topics, counting every publication by its sequence number (the chaos
  harness's `Watcher`).

Before the load every fixed topic's history is filled (TIDINGS_HISTORY_SIZE
publications), and the history of a topic nobody publishes to any more
expires after a minute (TIDINGS_HISTORY_TTL; shipped: a day): history filling
up is growth by design, and this way Redis is in its steady state within the
warm-up. Everything else is as shipped.

Every 10 s the RSS and open files of every process (gunicorn master and
workers, Celery main process and pool, redis-server; the load generators and
this harness apart, unjudged) go to samples.csv in the run's folder. The
verdict: after the warm-up no process of the system grows by more than 10%
(median of the last 3 samples over the median of the first 3 after the
warm-up), nor do its open files, and every durable publication reached every
checking client exactly once. Exit status 1 when a target is missed. Writes a
chart (--out-png) and a line in bench/RESULTS.md (--no-record: the chart only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import socket
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import websocket

from bench import report, sampling, systems
from bench.load import (
    INGEST_STREAM,
    PUBLICATIONS,
    TOPIC_PREFIX,
    Delivery,
    Generators,
    Publisher,
    RawClient,
    RawClientError,
    now_ms,
)
from tests.chaos.harness import Watcher, complete, tally
from tests.support import ROOT
from tidings.client import TidingsClient
from tidings.keys import history_key

SUSTAINED = "public.soak.sustained"
OWN_DURABLE = "public.soak.own.d."
OWN_FAST = "public.soak.own.f."
# Fresh topics: one per churning connection, one per stall.
EPHEMERAL = "public.soak.eph."
HEAVY = "public.soak.heavy."
# A flood the stalled client's socket buffers cannot hide for long (800 KB/s),
# so the server's queue bound (TIDINGS_CLIENT_QUEUE_BYTES) is what cuts it; in
# publications small enough that the flooded topic's history (which Redis keeps
# for a minute) holds 2 MB at the most, not a stall's whole flood.
HEAVY_PAYLOAD = "h" * 2000
HEAVY_BATCH = 40  # every 0.1 s
HISTORY_TTL = 60
GROWTH_LIMIT = 0.10


@dataclass
class Options:
    """What one soak run does (the command line's options; floats written as floats)."""

    minutes: float = 30.0
    warmup_minutes: float = 5.0
    sample_seconds: float = 10.0
    sustained_clients: int = 1000
    sustained_rate: float = 20.0
    own_topics: int = 200
    own_rate: float = 200.0
    churners: int = 10
    checkers: int = 4
    stall_every: float = 120.0
    history: int = 1000
    generator_processes: int = 2


# -- the checking clients ----------------------------------------------------------------------


@dataclass
class Checker(Watcher):
    """A checking client: the chaos harness's Watcher, plus the gaps it was told about."""

    # Per topic, how many publications it had delivered when told `recovered: false`.
    told: dict[str, list[int]] = field(default_factory=dict)
    stray: int = 0

    def on_publication(self, pub: dict[str, Any]) -> None:
        """Record a numbered publication; heavy floods and anything unnumbered are not counted."""
        data = pub.get("data")
        if pub.get("topic", "").startswith(HEAVY):
            return
        if not isinstance(data, dict) or "n" not in data:
            self.stray += 1
            return
        super().on_publication(pub)

    def on_gap(self, topic: str) -> None:
        """Note where history no longer covered what this client missed."""
        self.told.setdefault(topic, []).append(len(self.delivered.get(topic, [])))

    def told_losses(self, topic: str, sent: int) -> int:
        """Count the publications of `topic` missing inside gaps the client was told about."""
        got = self.delivered.get(topic, [])
        gone = set(range(sent)) - set(got)
        lost = 0
        for at in self.told.get(topic, []):
            low = got[at - 1] if at > 0 else -1
            high = got[at] if at < len(got) else sent
            lost += sum(1 for n in gone if low < n < high)
        return lost


def own_durable(k: int) -> str:
    """The k-th durable own topic."""
    return f"{OWN_DURABLE}{k}"


def own_fast(k: int) -> str:
    """The k-th fast own topic."""
    return f"{OWN_FAST}{k}"


def is_durable(topic: str) -> bool:
    """Tell whether the soak publishes `topic` durably (the guarantee covers it)."""
    return topic == SUSTAINED or topic.startswith(OWN_DURABLE)


def is_fast(topic: str) -> bool:
    """Tell whether the soak publishes `topic` fast (at most once)."""
    return topic.startswith(OWN_FAST)


def connect_checkers(url: str, count: int, own: int) -> list[Checker]:
    """Connect `count` checking clients, each on the sustained topic and three own topics."""
    checkers = []
    for i in range(count):
        topics = [SUSTAINED, own_durable(i % own), own_durable((i + own // 2) % own), own_fast(i)]
        checker = Checker(i, list(dict.fromkeys(topics)))
        # The stalling one (0) reads through a small buffer: it fills up fast.
        options = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)] if i == 0 else []
        checker.client = TidingsClient(
            url,
            on_publication=checker.on_publication,
            on_raw=checker.on_raw,
            on_gap=checker.on_gap,
            websocket_extra_options={"sockopt": options},
        )
        checker.client.connect()
        for topic in checker.topics:
            ack = checker.client.subscribe(topic)
            if not ack.get("ok"):
                raise RuntimeError(f"checking client {i}: subscribe {topic} refused: {ack}")
        checkers.append(checker)
    return checkers


# -- churn ----------------------------------------------------------------------------------------


class Churner(threading.Thread):
    """A raw Socket.IO client that connects, subscribes, unsubscribes and disconnects in a loop."""

    def __init__(
        self, index: int, url: str, redis_url: str, own: int, stop: threading.Event
    ) -> None:
        super().__init__(name=f"churner-{index}", daemon=True)
        self.index = index
        self.url = url
        self.redis = redis.Redis.from_url(redis_url)
        self.own = own
        self.stop = stop
        self.rng = random.Random(index)
        self.connections = 0
        self.subscribes = 0
        self.unsubscribes = 0
        self.fresh_sent = 0
        self.fresh_received = 0
        self.errors: list[str] = []
        self._waiting_for: str | None = None
        self._arrived = False

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.cycle()
            except (
                OSError,
                ValueError,  # a frame that is not the JSON it should be
                websocket.WebSocketException,
                RawClientError,
                redis.RedisError,
            ) as exc:
                self.errors.append(f"connection {self.connections}: {exc!r}")
                self.stop.wait(1)
        self.redis.close()

    def cycle(self) -> None:
        """One connection: subscribe, publish to a fresh topic, swap a topic, disconnect."""
        self.connections += 1
        client = RawClient(self.url)
        client.on_frame = self._watch
        try:
            pool = [SUSTAINED] + [own_durable(k) for k in range(self.own)]
            pool += [own_fast(k) for k in range(self.own)]
            topics = self.rng.sample(pool, 2)
            fresh = f"{EPHEMERAL}{self.index}.{self.connections}"
            for topic in [*topics, fresh]:
                self._call(client, "subscribe", topic)
            # Subscribed (acked), so this durable publication must arrive.
            self._waiting_for, self._arrived = f'{fresh}"', False
            self.redis.xadd(INGEST_STREAM, {"topic": fresh, "data": '{"n":0}'})
            self.fresh_sent += 1
            self._pump(client, self.rng.uniform(1, 4))
            if not self._arrived:
                self._pump(client, 10, until_arrived=True)
            if self._arrived:
                self.fresh_received += 1
            else:
                self.errors.append(f"connection {self.connections}: {fresh} never arrived")
            self._waiting_for = None
            self._call(client, "unsubscribe", self.rng.choice([*topics, fresh]))
            self._call(client, "subscribe", self.rng.choice(pool))
            self._pump(client, self.rng.uniform(0.5, 2))
            # Leave every way a browser does: politely, by closing, or by vanishing.
            how = self.connections % 3
            if how == 0:
                client.ws.send("41")
            if how in (0, 1):
                client.ws.close()
        finally:
            client.close()

    def _watch(self, frame: str) -> None:
        if self._waiting_for and frame.startswith(PUBLICATIONS) and self._waiting_for in frame:
            self._arrived = True

    def _call(self, client: RawClient, event: str, topic: str) -> None:
        client.call(event, topic)
        if event == "subscribe":
            self.subscribes += 1
        else:
            self.unsubscribes += 1

    def _pump(self, client: RawClient, seconds: float, until_arrived: bool = False) -> None:
        for _ in client.frames(seconds):
            if until_arrived and self._arrived:
                return


# -- the stalling client ----------------------------------------------------------------------


class Staller(threading.Thread):
    """Every `every` seconds a checking client stops reading until the server cuts it."""

    def __init__(
        self,
        checker: Checker,
        redis_url: str,
        web_log: Path,
        every: float,
        stop: threading.Event,
        quiet: list[tuple[float, float]],
    ) -> None:
        super().__init__(name="staller", daemon=True)
        self.checker = checker
        self.redis = redis.Redis.from_url(redis_url)
        self.web_log = web_log
        self.every = every
        self.stop = stop
        # Seconds into the run in which no stall starts (see `quiet_windows`).
        self.quiet = quiet
        self.stalls = 0
        self.skipped = 0
        self.cuts: list[float] = []  # seconds from the stall to the cut
        self.recoveries: list[float] = []  # seconds from the cut to live again
        self.errors: list[str] = []

    def run(self) -> None:
        started = time.monotonic()
        while not self.stop.wait(self.every):
            at = time.monotonic() - started
            if any(low <= at < high for low, high in self.quiet):
                self.skipped += 1
                continue
            try:
                self.stall_once()
            except Exception as exc:  # reported with the results; the soak goes on
                self.errors.append(f"stall {self.stalls}: {exc!r}")
        self.redis.close()

    def stall_once(self) -> None:
        """Stall, flood a topic of its own until the server cuts it, release, wait until live."""
        client = self.checker.client
        assert client is not None
        deadline = time.monotonic() + 30
        while not client.sio.connected:  # reconnecting on its own (its read thread was late)
            if time.monotonic() > deadline:
                raise RuntimeError("not connected for 30s")
            time.sleep(0.05)
        self.stalls += 1
        heavy = f"{HEAVY}{self.stalls}"
        if not client.subscribe(heavy).get("ok"):
            raise RuntimeError(f"subscribe {heavy} refused")
        eio = client.sio.eio
        ws, sid, connects = eio.ws, eio.sid, client.connects
        release = threading.Event()
        original = ws.recv

        def stalled() -> Any:
            release.wait()
            return original()

        ws.recv = stalled
        start = time.monotonic()
        logged = self.web_log.stat().st_size
        cut = False
        try:
            with open(self.web_log, errors="replace") as log:
                log.seek(logged)
                seen = ""
                while time.monotonic() < start + 60 and not self.stop.is_set():
                    pipe = self.redis.pipeline(transaction=False)
                    for _ in range(HEAVY_BATCH):
                        pipe.publish(TOPIC_PREFIX + heavy, HEAVY_PAYLOAD)
                    pipe.execute()
                    seen += log.read()
                    if f"slow client cut: sid={sid}" in seen:
                        cut = True
                        break
                    time.sleep(0.1)  # the flood's pace
        finally:
            # The application forgets the flooded topic before it comes back.
            with client._lock:
                client._topics.pop(heavy, None)
            release.set()
        if not cut:
            if self.stop.is_set():  # the run ended first: not a stall
                self.stalls -= 1
            else:
                self.errors.append(f"stall {self.stalls}: not cut within 60s")
            return
        cut_at = time.monotonic()
        self.cuts.append(cut_at - start)
        delivered = len(self.checker.delivered.get(SUSTAINED, []))
        deadline = cut_at + 60
        # Live again: reconnected, and the sustained topic delivers once more.
        while (
            client.connects == connects
            or len(self.checker.delivered.get(SUSTAINED, [])) <= delivered
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("not live again within 60s of the cut")
            time.sleep(0.05)
        self.recoveries.append(time.monotonic() - cut_at)


def quiet_windows(options: Options) -> list[tuple[float, float]]:
    """When no stall may start: shortly before and during the samples the verdict compares.

    A stall's flood passes through Redis (buffers, and a minute of the flooded
    topic's history) and leaves again: Redis's RSS swings by a quarter with
    it. The verdict compares the first 3 samples after the warm-up with the
    last 3; with no flood in or just before either, both see the same phase
    of the load, and the comparison measures growth, not the flood.
    """
    settle = min(60.0, options.stall_every / 2)
    span = 3 * options.sample_seconds
    warmup, end = options.warmup_minutes * 60, options.minutes * 60
    return [(warmup - settle, warmup + span), (end - span - settle, end)]


# -- the run ----------------------------------------------------------------------------------


STARTED = time.monotonic()


def log(message: str) -> None:
    """Print a progress line with the time since the soak started."""
    print(f"[{time.monotonic() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def prefill(client: redis.Redis, topics: list[str], count: int, timeout: float = 600) -> None:
    """Fill every topic's history (durable path) and wait until the listener forwarded it all.

    Each publication is the size of a live one (`{"t": <ms>, "n": <seq>}`), only
    unnumbered (`p`, which no client counts): smaller ones would be replaced by
    bigger ones as the load goes on, and an own topic (1/s) takes 1,000 s to
    turn its whole history over: Redis would grow for 17 minutes after the
    warm-up, by design of the harness.
    """
    for first in range(0, count, 100):
        pipe = client.pipeline(transaction=False)
        for topic in topics:
            for i in range(first, min(count, first + 100)):
                data = f'{{"t":{now_ms():.3f},"p":{i}}}'
                pipe.xadd(INGEST_STREAM, {"topic": topic, "data": data})
        pipe.execute()
    deadline = time.monotonic() + timeout
    while True:
        pipe = client.pipeline(transaction=False)
        for topic in topics:
            pipe.xlen(history_key(topic))
        if min(pipe.execute()) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"history not filled within {timeout}s")
        time.sleep(0.2)


class Publishing(threading.Thread):
    """Runs `Publisher.paced` in a thread; keeps the error that ended it, if one did."""

    def __init__(self, publisher: Publisher, streams: list, seconds: float) -> None:
        super().__init__(name="publisher", daemon=True)
        self.publisher = publisher
        self.streams = streams
        self.seconds = seconds
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.publisher.paced(self.streams, self.seconds)
        except BaseException as exc:  # reported by the run
            self.error = exc


def connect_generators(
    url: str, clients: int, processes: int, topics: list[str], own: str | None, workdir: Path
) -> Generators:
    """Start loadgen processes and wait until all their clients are subscribed."""
    gens = Generators(
        url, clients, processes=processes, topics=topics, own_prefix=own, workdir=workdir
    )
    seconds, failed, errors = gens.wait_ready()
    if failed:
        gens.close()
        raise RuntimeError(f"{failed} of {clients} load clients failed: {errors[:3]}")
    log(f"{clients} load clients ({workdir.name}) subscribed in {seconds:.1f}s")
    return gens


@dataclass
class Outcome:
    """Everything a run measured, for the verdict, the JSON and the RESULTS line."""

    options: Options
    growth: list[sampling.Growth]
    durable: dict[str, int]
    fast: dict[str, int]
    loads: dict[str, dict[str, Any]]
    churn: dict[str, Any]
    stalls: dict[str, Any]
    latency: dict[str, float | None]
    missing: list[str]
    problems: list[str]

    @property
    def fd_slack(self) -> int:
        """Open files a process may gain: the churning clients' come and go."""
        return self.options.churners + 4

    def lost(self) -> list[str]:
        """What was lost or duplicated that the guarantee covers."""
        out = []
        d = self.durable
        for key in ("lost_untold", "duplicated", "out_of_order"):
            if d[key]:
                out.append(f"checking clients: {key.replace('_', ' ')} {d[key]}")
        for name, load in self.loads.items():
            if name != "own fast" and (load["lost"] or load["duplicated"]):
                out.append(
                    f"loadgen {name}: lost {load['lost']:,}, duplicated {load['duplicated']:,}"
                    f" ({load['unexpected_closes']:,} connections closed by the server)"
                )
        missed = self.churn["fresh_sent"] - self.churn["fresh_received"]
        if missed:
            out.append(f"churn: {missed} fresh-topic publications never arrived")
        return out

    def grown(self) -> list[sampling.Growth]:
        """The processes of the system that missed the growth target."""
        return [
            g
            for g in self.growth
            if g.role == sampling.SYSTEM and not g.met(GROWTH_LIMIT, self.fd_slack)
        ]

    def met(self) -> bool:
        """Tell whether every target was met."""
        return not self.lost() and not self.grown() and not self.problems


class Soak:
    """One run: the system, its load and its measurements; `close()` ends them all."""

    def __init__(self, options: Options, workdir: Path) -> None:
        self.o = options
        self.workdir = workdir
        self.own = max(1, options.own_topics // 2)
        self.system = systems.Tidings(
            workdir / "tidings",
            workers=2,
            env={
                "TIDINGS_HISTORY_SIZE": str(options.history),
                "TIDINGS_HISTORY_TTL": str(HISTORY_TTL),
            },
        )
        self.stop = threading.Event()
        self.generators: dict[str, Generators] = {}
        self.checkers: list[Checker] = []
        self.publishers: list[Publisher] = []
        self.problems: list[str] = []
        self.data: redis.Redis | None = None

    def start(self) -> None:
        """Start the system, fill history, connect every client (no publication yet)."""
        o, system = self.o, self.system
        system.start()
        system.wait_ready()
        log(f"system ready: {system.url}, logs in {system.directory}")
        fixed = [SUSTAINED] + [own_durable(k) for k in range(self.own)]
        fixed += [own_fast(k) for k in range(self.own)]
        self.data = system.redis()
        prefill(self.data, fixed, o.history)
        log(f"history filled: {len(fixed)} topics x {o.history}")
        for name, clients, processes, topics, prefix in (
            ("sustained", o.sustained_clients, o.generator_processes, [SUSTAINED], None),
            ("own durable", self.own, 1, [], OWN_DURABLE),
            ("own fast", self.own, 1, [], OWN_FAST),
        ):
            self.generators[name] = connect_generators(
                system.url,
                clients,
                processes,
                topics,
                prefix,
                self.workdir / name.replace(" ", "-"),
            )
        self.checkers = connect_checkers(system.url, o.checkers, self.own)
        log(f"{len(self.checkers)} checking clients subscribed")

    def load(self) -> list[sampling.Sample]:
        """Run the whole load for `minutes`, sampling; return the samples."""
        o, own, system = self.o, self.own, self.system
        assert self.data is not None, "start() first"
        durable = Publisher(system.redis_url, durable=True)
        fast = Publisher(system.redis_url)
        self.publishers = [durable, fast]
        seconds = o.minutes * 60
        publishing = [
            Publishing(
                durable,
                [
                    (o.sustained_rate, lambda _: SUSTAINED),
                    (o.own_rate / 2, lambda k: own_durable(k % own)),
                ],
                seconds,
            ),
            Publishing(fast, [(o.own_rate / 2, lambda k: own_fast(k % own))], seconds),
        ]
        self.timeline = Timeline(
            self.workdir / "timeline.csv", self.generators, self.data, self.checkers
        )
        sampler = sampling.Sampler(
            lambda: discover(system, self.generators),
            self.workdir / "samples.csv",
            o.sample_seconds,
            after_sample=self.timeline.record,
        )
        self.churners = [
            Churner(i, system.url, system.redis_url, own, self.stop) for i in range(o.churners)
        ]
        self.staller = Staller(
            self.checkers[0],
            system.redis_url,
            system.directory / "web.log",
            o.stall_every,
            self.stop,
            quiet_windows(o),
        )
        sampler.start()
        threads = [*publishing, *self.churners, self.staller]
        for thread in threads:
            thread.start()
        log(f"load running for {o.minutes:g} min (warm-up {o.warmup_minutes:g} min)")
        for thread in publishing:
            thread.join()
            if thread.error is not None:
                self.problems.append(f"publisher failed: {thread.error!r}")
        self.stop.set()
        samples = sampler.stop()
        for thread in threads:
            thread.join(timeout=90)
            if thread.is_alive():
                self.problems.append(f"{thread.name} did not stop")
        return samples

    def count(self, samples: list[sampling.Sample]) -> Outcome:
        """Wait for the last deliveries, then count everything against what was published."""
        log("load over; draining")
        sent = {**self.publishers[0].expected(), **self.publishers[1].expected()}
        checkers = self.checkers
        deadline = time.monotonic() + 60
        while not complete(checkers, sent, lambda t: is_durable(t) or is_fast(t)):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        counts = tally(checkers, sent, is_durable)
        told = sum(c.told_losses(t, sent.get(t, 0)) for c in checkers for t in c.topics)
        fast = tally(checkers, sent, is_fast)
        churners, staller = self.churners, self.staller
        return Outcome(
            options=self.o,
            growth=sampling.growth(samples, self.o.warmup_minutes * 60),
            durable={
                "published": sum(n for t, n in sent.items() if is_durable(t)),
                "expected": counts.published,
                "delivered": counts.delivered,
                "lost_untold": counts.lost - told,
                "lost_told": told,
                "duplicated": counts.duplicated,
                "out_of_order": counts.out_of_order,
                "wire_copies": sum(n - 1 for c in checkers for n in c.raw.values()),
                "stray": sum(c.stray for c in checkers),
                "told_gaps": sum(len(g) for c in checkers for g in c.told.values()),
                "reconnects": sum(c.client.connects - 1 for c in checkers if c.client),
            },
            fast={
                "published": sum(n for t, n in sent.items() if is_fast(t)),
                "expected": fast.published,
                "delivered": fast.delivered,
                "lost": fast.lost,
            },
            loads={name: self._load_report(name, sent) for name in self.generators},
            churn={
                "clients": len(churners),
                "connections": sum(c.connections for c in churners),
                "subscribes": sum(c.subscribes for c in churners),
                "unsubscribes": sum(c.unsubscribes for c in churners),
                "fresh_sent": sum(c.fresh_sent for c in churners),
                "fresh_received": sum(c.fresh_received for c in churners),
                "errors": [e for c in churners for e in c.errors][:20],
            },
            stalls={
                "stalls": staller.stalls,
                "skipped": staller.skipped,
                "cut": len(staller.cuts),
                "cut_s_median": statistics.median(staller.cuts) if staller.cuts else None,
                "live_again_s_max": max(staller.recoveries, default=None),
                "errors": staller.errors,
            },
            latency=self.timeline.summary(),
            missing=counts.missing[:20],
            problems=self.problems,
        )

    def _load_report(self, name: str, sent: dict[str, int]) -> dict[str, Any]:
        """What one group of load clients received, once it received all it will."""
        gens = self.generators[name]
        if name == "sustained":
            expected = {SUSTAINED: sent.get(SUSTAINED, 0)}
            total = gens.clients * expected[SUSTAINED]
        else:
            prefix = OWN_FAST if name == "own fast" else OWN_DURABLE
            expected = {t: n for t, n in sent.items() if t.startswith(prefix)}
            total = sum(expected.values())
        gens.wait_received(total, idle=10, deadline=time.monotonic() + 60)
        delivery = gens.report(expected)
        return {
            "clients": gens.clients,
            "expected": total,
            "delivered": delivery.delivered,
            "lost": delivery.lost,
            "duplicated": delivery.duplicated,
            "unexpected": delivery.unexpected,
            "unexpected_closes": delivery.unexpected_closes,
        }

    def close(self) -> None:
        """Stop every client, thread and process of the run."""
        self.stop.set()
        for checker in self.checkers:
            if checker.client is not None:
                checker.client.disconnect()
        for gens in self.generators.values():
            gens.close()
        for publisher in self.publishers:
            publisher.close()
        if self.data is not None:
            self.data.close()
        self.system.stop()


def run(options: Options, workdir: Path) -> tuple[Outcome, list[sampling.Sample]]:
    """Start the system, load it for `options.minutes`, drain, and count."""
    soak = Soak(options, workdir)
    try:
        soak.start()
        samples = soak.load()
        return soak.count(samples), samples
    finally:
        soak.close()


def discover(system: systems.Tidings, generators: dict[str, Generators]) -> list[Any]:
    """Name every process to sample: the system's, then the load's."""
    web, worker = system.procs
    found: list[sampling.Discovered] = [("gunicorn master", sampling.SYSTEM, web.pid)]
    found += [("web worker", sampling.SYSTEM, pid) for pid in systems._children(web.pid)]
    found.append(("celery main", sampling.SYSTEM, worker.pid))
    found += [("celery pool", sampling.SYSTEM, pid) for pid in systems._children(worker.pid)]
    if system.redis_server.process is not None:
        found.append(("redis-server", sampling.SYSTEM, system.redis_server.process.pid))
    for name, gens in generators.items():
        found += [(f"loadgen {name}", sampling.LOAD, proc.pid) for proc in gens.procs]
    found.append(("soak harness", sampling.LOAD, os.getpid()))
    return found


class Timeline:
    """What else is read at every sample: delivery latency, Redis memory, checked deliveries."""

    def __init__(
        self,
        path: Path,
        generators: dict[str, Generators],
        data: redis.Redis,
        checkers: list[Checker],
    ) -> None:
        self.path = path
        self.generators = generators
        self.data = data
        self.checkers = checkers
        self.p99: list[float] = []
        self.p50: list[float] = []
        self.worst = 0.0
        self.machine: list[float] = []
        path.write_text(
            "t,sustained_p50_ms,sustained_p99_ms,sustained_max_ms,redis_used_memory,checked,"
            "load_open,load_closed,load_closed_by_eio,checker_reconnects,load_average_1m,"
            "redis_keys,redis_dataset_bytes,redis_clients_bytes\n"
        )

    def record(self, t: float) -> None:
        """Read and forget the load clients' latencies since the last sample; append one row."""
        windows = {name: Delivery(latencies=g.window()) for name, g in self.generators.items()}
        sustained = windows["sustained"]
        p50, p99 = sustained.percentile(0.5), sustained.percentile(0.99)
        top = max(sustained.latencies, default=None)
        if p50 is not None and p99 is not None and top is not None:
            self.p50.append(p50)
            self.p99.append(p99)
            self.worst = max(self.worst, top)
        memory = self.data.info("memory").get("used_memory", 0)
        # What Redis's memory is made of: data (history, ingest) or client buffers.
        parts = self.data.memory_stats()
        redis_parts = [parts.get(k, 0) for k in ("keys.count", "dataset.bytes", "clients.normal")]
        checked = sum(len(ns) for c in self.checkers for ns in c.delivered.values())
        # Load clients the server dropped so far, and how many of them it told why
        # (an engine.io CLOSE: a PONG it did not see in time).
        stats = [g.stat() for g in self.generators.values()]
        load = [sum(int(s[key]) for s in stats) for key in ("open", "unexpected_closes")]
        load.append(sum(int(s["server_closes"]) for s in stats))
        load.append(sum(c.client.connects - 1 for c in self.checkers if c.client is not None))
        # The machine is shared: its load says what else competed for the cores.
        machine = os.getloadavg()[0]
        self.machine.append(machine)

        def cell(value: float | None) -> str:
            return "" if value is None else f"{value:.2f}"

        with open(self.path, "a") as out:
            out.write(f"{t:.1f},{cell(p50)},{cell(p99)},{cell(top)},{memory},{checked},")
            out.write(",".join(map(str, load)) + f",{machine:.2f},")
            out.write(",".join(map(str, redis_parts)) + "\n")

    def summary(self) -> dict[str, float | None]:
        """The sustained topic's latency (window medians, worst) and the machine's load."""
        return {
            "p50_ms": statistics.median(self.p50) if self.p50 else None,
            "p99_ms": statistics.median(self.p99) if self.p99 else None,
            "worst_p99_ms": max(self.p99, default=None),
            "max_ms": self.worst or None,
            "machine_load_median": statistics.median(self.machine) if self.machine else None,
            "machine_load_max": max(self.machine, default=None),
        }


# -- output ---------------------------------------------------------------------------------------


def summary_lines(outcome: Outcome) -> list[str]:
    """The run's results besides the growth table, for the terminal."""
    d, f, c, s = outcome.durable, outcome.fast, outcome.churn, outcome.stalls
    lines = [
        f"durable, checking clients: {d['expected']:,} expected, {d['delivered']:,} delivered,"
        f" lost {d['lost_untold']} (+{d['lost_told']} in {d['told_gaps']} gaps they were told"
        f" about), duplicated {d['duplicated']}, out of order {d['out_of_order']}"
        f" ({d['wire_copies']:,} wire copies dropped by offset; {d['reconnects']} reconnects)",
        f"fast, checking clients: {f['expected']:,} expected, lost {f['lost']}",
    ]
    for name, load in outcome.loads.items():
        lines.append(
            f"loadgen {name}: {load['clients']} clients, {load['expected']:,} expected,"
            f" {load['delivered']:,} delivered, lost {load['lost']}, duplicated"
            f" {load['duplicated']}, unexpected {load['unexpected']},"
            f" connections closed by the server {load['unexpected_closes']}"
        )
    lines.append(
        f"churn: {c['clients']} clients, {c['connections']:,} connections,"
        f" {c['subscribes']:,} subscribes, {c['unsubscribes']:,} unsubscribes, fresh topics"
        f" {c['fresh_received']:,}/{c['fresh_sent']:,} delivered, {len(c['errors'])} errors"
    )
    lines += [f"  churn error: {e}" for e in c["errors"][:5]]
    lines.append(
        f"stalls: {s['stalls']} ({s['skipped']} skipped near the verdict's samples),"
        f" cut {s['cut']} (median {_num(s['cut_s_median'])} s after the"
        f" stall), live again within {_num(s['live_again_s_max'])} s"
    )
    lines += [f"  stall error: {e}" for e in s["errors"][:5]]
    lat = outcome.latency
    lines.append(
        f"sustained latency per {outcome.options.sample_seconds:g} s window: median p50"
        f" {_num(lat['p50_ms'])} ms, median p99 {_num(lat['p99_ms'])} ms, worst p99"
        f" {_num(lat['worst_p99_ms'])} ms, max {_num(lat['max_ms'])} ms"
    )
    lines.append(
        f"machine load average (1 min) during the run: median {_num(lat['machine_load_median'])},"
        f" max {_num(lat['machine_load_max'])}"
    )
    lines += [f"missing: {m}" for m in outcome.missing[:5]]
    lines += [f"problem: {p}" for p in outcome.problems]
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def result_line(outcome: Outcome, png: str) -> str:
    """The run in one line of bench/RESULTS.md."""
    o, d = outcome.options, outcome.durable
    judged = sorted(
        (g for g in outcome.growth if g.role == sampling.SYSTEM),
        key=lambda g: g.rss_growth,
        reverse=True,
    )
    growths = ", ".join(f"{g.name} {g.rss_growth:+.1%}" for g in judged)
    steepest = max(judged, key=lambda g: g.rss_slope, default=None)
    if steepest is not None:
        growths += f" (steepest trend: {steepest.name}, {steepest.rss_slope / 2**20:+.1f} MB/h)"
    fds = max((g.fds_end - g.fds_start for g in judged), default=0)
    verdict = (
        "**met**"
        if outcome.met()
        else "**missed**: "
        + "; ".join(
            [
                *outcome.lost(),
                *(f"{g.name} {g.problem or 'grew'}" for g in outcome.grown()),
                *outcome.problems,
            ]
        )
    )
    return (
        f"{o.minutes:g} min (warm-up {o.warmup_minutes:g}), 2 web workers; load:"
        f" {o.sustained_clients:,} clients x {o.sustained_rate:g}/s durable on one topic,"
        f" {o.own_topics} own-topic clients ({o.own_rate:g}/s, half durable, half fast),"
        f" {outcome.churn['connections']:,} churning connections"
        f" ({outcome.churn['subscribes']:,} subscribes), {outcome.stalls['cut']} slow-client"
        f" cuts recovered with `since`. RSS growth after warm-up: {growths}; open files at"
        f" most {fds:+.0f}. Durable to the checking clients: {d['delivered']:,} of"
        f" {d['expected']:,}, lost {d['lost_untold']}, duplicated {d['duplicated']}"
        f" ({d['told_gaps']} gaps told); sustained p99 {_num(outcome.latency['p99_ms'])} ms"
        f" (median of windows); machine load average (1 min) during the run: median"
        f" {_num(outcome.latency['machine_load_median'])}, max"
        f" {_num(outcome.latency['machine_load_max'])}."
        f" Target (<= 10%, nothing lost): {verdict}. [Chart]({png})"
    )


def parse(argv: list[str]) -> tuple[Options, argparse.Namespace]:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    defaults = Options()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(value), default=value, metavar=name.upper())
    parser.add_argument("--out-png", type=Path, default=ROOT / "bench" / "soak.png")
    parser.add_argument(
        "--workdir", type=Path, help="samples, logs (default bench/results/soak-<time>)"
    )
    parser.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS.md")
    args = parser.parse_args(argv)
    options = Options(**{name: getattr(args, name) for name in asdict(defaults)})
    return options, args


def main(argv: list[str] | None = None) -> int:
    """Run the soak; return 0 when every target is met, 1 otherwise."""
    argv = sys.argv[1:] if argv is None else argv
    options, args = parse(argv)
    workdir = args.workdir or ROOT / "bench" / "results" / time.strftime("soak-%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    systems.ensure_node_modules()
    outcome, samples = run(options, workdir)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(sampling.table(outcome.growth, GROWTH_LIMIT, outcome.fd_slack))
    print("\n".join(summary_lines(outcome)))
    sampling.chart(
        samples,
        options.warmup_minutes * 60,
        args.out_png,
        f"Tidings soak, {options.minutes:g} min, {time.strftime('%Y-%m-%d %H:%M')},"
        f" load average at the end {load}: RSS and open files per process"
        " (log scales; warm-up shaded)",
    )
    met = outcome.met()
    (workdir / "verdict.json").write_text(
        json.dumps(
            {
                "met": met,
                "lost": outcome.lost(),
                "grown": [g.name for g in outcome.grown()],
                "growth": [{**asdict(g), "rss_growth": g.rss_growth} for g in outcome.growth],
                **{k: v for k, v in asdict(outcome).items() if k != "growth"},
                "load_average": load,
            },
            indent=1,
        )
    )
    print(f"{'met' if met else 'MISSED'}; chart {args.out_png}, samples and logs in {workdir}")
    if not args.no_record:
        png = os.path.relpath(args.out_png, report.RESULTS.parent)
        command = shlex.join(["python", "-m", "bench.soak", *argv])
        report.record_separate(report.RESULTS, "soak", command, result_line(outcome, png))
        print(f"recorded in {report.RESULTS}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
