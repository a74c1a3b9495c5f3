"""Inside a web worker: what its idle connections hold, on request (bench.connection_profile).

Loaded by path from the gunicorn config that `bench.connection_profile` writes
(so it works with any commit's code): `start(worker, directory)` starts
tracemalloc and a greenlet that answers requests dropped as files in
`directory`: `mark` remembers the worker's allocations, live objects and
greenlets now; `report` compares them with the mark and writes
`report.json`. Standard library and gevent only.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import gevent

FRAMES = 12
# Allocation sites are named by their innermost frame in one of these (the
# interpreter's own files say little: `<frozen ...>`, `json/decoder.py`).
ROOTS = ("webapp", "tidings", "engineio", "socketio", "flask_socketio", "gevent", "geventwebsocket")


class Probe:
    """The worker's state at the mark, and the comparison with it."""

    def __init__(self, worker: Any, directory: Path) -> None:
        self.worker = worker
        self.directory = directory
        self.snapshot: tracemalloc.Snapshot | None = None
        self.types: collections.Counter[str] = collections.Counter()

    def run(self) -> None:
        """Answer requests until the worker exits."""
        request = self.directory / "request"
        while True:
            gevent.sleep(0.2)
            if not request.exists():
                continue
            name = request.read_text().strip()
            try:
                answer = self.mark() if name == "mark" else self.report()
            except Exception as exc:  # the harness shows it; the worker goes on
                answer = {"error": repr(exc)}
            (self.directory / f"{name}.json.tmp").write_text(json.dumps(answer, indent=1))
            os.replace(self.directory / f"{name}.json.tmp", self.directory / f"{name}.json")
            request.unlink()

    def mark(self) -> dict[str, Any]:
        gc.collect()
        self.snapshot = tracemalloc.take_snapshot()
        self.types = _type_counts()
        return {"traced": tracemalloc.get_traced_memory()[0]}

    def report(self) -> dict[str, Any]:
        gc.collect()
        assert self.snapshot is not None, "mark first"
        now = tracemalloc.take_snapshot()
        types = _type_counts()
        sites: collections.Counter[str] = collections.Counter()
        for stat in now.compare_to(self.snapshot, "traceback"):
            sites[_site(stat.traceback)] += stat.size_diff
        added = {k: types[k] - self.types.get(k, 0) for k in types}
        return {
            "traced_bytes": sum(sites.values()),
            "sites": sites.most_common(40),
            "types": sorted(((k, v) for k, v in added.items() if v), key=lambda kv: -abs(kv[1]))[
                :40
            ],
            "held": held_by_one_connection(self.worker),
        }


def _type_counts() -> collections.Counter[str]:
    return collections.Counter(
        f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()
    )


def _site(traceback: tracemalloc.Traceback) -> str:
    """The innermost frame of a project or library file, else the innermost frame."""
    for frame in reversed(traceback):  # tracemalloc keeps the most recent frame last
        parts = Path(frame.filename).parts
        for root in ROOTS:
            if root in parts:
                index = len(parts) - 1 - parts[::-1].index(root)
                return f"{'/'.join(parts[index:])}:{frame.lineno}"
    frame = traceback[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


def _size(obj: Any, seen: set[int]) -> int:
    """sys.getsizeof of `obj` and what it alone refers to (strings, ints, dicts, lists)."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(_size(k, seen) + _size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
        size += sum(_size(v, seen) for v in obj)
    return size


def _shallow(obj: Any) -> int:
    size = sys.getsizeof(obj)
    if hasattr(obj, "__dict__"):
        size += sys.getsizeof(obj.__dict__)
    return size


def held_by_one_connection(worker: Any) -> dict[str, int]:
    """Bytes of the objects one idle websocket connection owns, by owner (a median connection)."""
    app = getattr(worker, "wsgi", None)
    flask_app = getattr(app, "flask_app", app)
    sio = flask_app.extensions["socketio"].server
    eio = sio.eio
    sockets = list(eio.sockets.values())
    if not sockets:
        return {}
    sock = sockets[len(sockets) // 2]
    held: dict[str, int] = {}
    seen: set[int] = {id(eio), id(sio), id(flask_app)}
    held["engine.io Socket (object, __dict__, sid)"] = _shallow(sock) + _size(sock.sid, seen)
    seen.update((id(sock), id(sock.__dict__)))
    queue = sock.queue
    if type(queue).__name__ == "EngineWebSocket":
        held["transport (EngineWebSocket, slots)"] = sys.getsizeof(queue)
        held["frame reader"] = sys.getsizeof(queue.frames)
        held["socket object"] = sys.getsizeof(queue.sock)
        held["read watcher (gevent loop.io)"] = sys.getsizeof(queue.reader)
        seen.update(map(id, (queue, queue.frames, queue.sock, queue.reader)))
    else:
        held["engine.io queue"] = _size(queue, seen) + _shallow(queue)
    environ = sio.environ.get(sock.sid)
    if environ is not None:
        held["WSGI environ kept by python-socketio"] = _size(environ, seen)
    sids = [s for s, e in sio.manager.rooms.get("/", {}).get(None, {}).items() if e == sock.sid]
    connections = flask_app.extensions.get("tidings.connections")
    if connections is not None:
        for sid in sids:
            record = connections.by_sid.get(sid)
            if record is not None:
                held["Tidings connection record (grant, subscriptions)"] = _deep(record, seen)
    greenlets = sum(1 for o in gc.get_objects() if type(o).__name__ == "Greenlet")
    held["greenlets alive in the worker (all connections)"] = greenlets
    return held


def _deep(obj: Any, seen: set[int]) -> int:
    """An object with its attributes (a dataclass or slotted record), one level of records down."""
    size = _shallow(obj)
    seen.add(id(obj))
    values = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    for slot in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, slot):
            values.append(getattr(obj, slot))
    for value in values:
        record = hasattr(value, "__dict__") or hasattr(type(value), "__slots__")
        if record and not isinstance(value, str | bytes | int | float) and id(value) not in seen:
            size += _deep(value, seen)
            continue
        size += _size(value, seen)
    return size


def start(worker: Any, directory: str) -> None:
    """Trace allocations from now on and answer the harness's requests (post_worker_init)."""
    tracemalloc.start(FRAMES)
    gevent.spawn(Probe(worker, Path(directory)).run)
