"""A web worker starved of CPU under sustained load: does gunicorn kill it for a missed heartbeat?

    .venv/bin/python -m bench.starved_worker [--share 0.1] [--seconds 60] [--clients 1000]

One web worker (`gunicorn -c gunicorn.conf.py`) and a Celery worker on a Redis
of their own; 1,000 loadgen clients on one topic, 20 durable publications/s.
Then the web worker is held to `--share` of a core for `--seconds` (SIGSTOP and
SIGCONT in turn, every 100 ms), as a noisy neighbour on a shared machine
would: it falls behind the message queue, and the delivery lag grows. What is
measured is whether it stays alive meanwhile: gunicorn's gevent worker proves
it lives by a greenlet that wakes every second; a worker whose heartbeat is
`timeout` (30 s) old is killed, and every client of it disconnected.

The soak (`bench/soak.py`) lost both web workers that way at a load average
of 9.6; here one worker, the same load, a fixed share. Prints the lag every
5 s and the verdict; the result goes to RESULTS.md's "Separate measurements"
(--no-record: printed only).
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.load import Generators, Publisher
from bench.report import separate_result
from bench.systems import Tidings

TOPIC = "public.starved"
RATE = 20.0


def throttle(worker: psutil.Process, share: float, stop: threading.Event) -> None:
    """Let `worker` run `share` of every 100 ms until `stop`; leave it running."""
    period = 0.1
    try:
        while not stop.is_set():
            worker.send_signal(signal.SIGCONT)
            time.sleep(period * share)
            worker.send_signal(signal.SIGSTOP)
            time.sleep(period * (1 - share))
        worker.send_signal(signal.SIGCONT)
    except psutil.NoSuchProcess:  # killed meanwhile: what is being measured
        return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=float, default=0.1, help="of a core, while starved")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="tidings-starved-"))
    system = Tidings(directory, workers=1)
    system.start()
    system.wait_ready()
    [worker] = psutil.Process(system.procs[0].pid).children()
    log = directory / "web.log"
    gens = Generators(system.url, args.clients, processes=2, topics=[TOPIC], workdir=directory)
    publisher = Publisher(system.redis_url, durable=True)
    stop = threading.Event()
    lags: list[float] = []
    killed_after: float | None = None
    dropped = 0
    try:
        gens.wait_ready()
        streams = [(RATE, lambda _: TOPIC)]
        threading.Thread(
            target=publisher.paced, args=(streams, args.seconds + 15), daemon=True
        ).start()
        time.sleep(5)  # unstarved first: the path works
        gens.window()
        started = time.monotonic()
        threading.Thread(target=throttle, args=(worker, args.share, stop), daemon=True).start()
        while time.monotonic() < started + args.seconds:
            time.sleep(5)
            window = gens.window()
            lag = max(window, default=0.0) / 1000
            lags.append(lag)
            if killed_after is None and "WORKER TIMEOUT" in log.read_text(errors="replace"):
                killed_after = time.monotonic() - started
            # Clients the server dropped while the worker was still alive: a PONG
            # it did not read for 20 s makes engine.io take the client for gone.
            if killed_after is None:
                dropped = int(gens.stat()["unexpected_closes"])
            print(
                f"{time.monotonic() - started:5.0f}s starved: {len(window):,} deliveries,"
                f" lag up to {lag:.1f}s, worker {'killed' if killed_after else 'alive'},"
                f" {dropped} clients dropped before",
                flush=True,
            )
    finally:
        stop.set()
        gens.close()
        publisher.close()
        system.stop()
    lag = max(lags, default=0.0)
    fate = (
        f"**killed by gunicorn (WORKER TIMEOUT) within {killed_after:.0f} s**, lag {lag:.0f} s"
        f" by then, {dropped:,} of its {args.clients:,} clients dropped before and the rest with it"
        if killed_after is not None
        else f"**alive** throughout, lag up to {lag:.0f} s, {dropped:,} clients dropped"
    )
    result = (
        f"one web worker, {args.clients:,} clients x {RATE:g}/s durable on one topic, then the"
        f" worker held to {args.share:.0%} of a core for {args.seconds:g} s: {fate}"
    )
    separate_result("starved_worker", result, record=not args.no_record)
    print(f"logs: {directory}")


if __name__ == "__main__":
    main()
