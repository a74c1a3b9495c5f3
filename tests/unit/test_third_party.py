"""The private parts of third-party libraries that Tidings relies on, checked in one place.

Tidings reaches past the public APIs of gevent, gevent-websocket,
python-engineio, python-socketio, Flask-SocketIO, redis-py, hiredis,
prometheus_client and gunicorn (and of Python's http.client) where their
public paths cost too much per connection or per message. None of that is
promised by those libraries: a version bump can rename a method, change its
arguments, or keep the name and change what it does. This module checks
each reliance on the real objects (an engine.io socket, a gevent-websocket
WebSocket over a socket pair, a redis-py connection to the test Redis) and,
where it matters, the behaviour, so that a bump in requirements.lock fails
here, naming the Tidings file and function that would break, instead of in
production.

After a bump: run this module first. A failure names the reliance, the code
that depends on it and what would break; read that library's change and
adapt the Tidings code (or this check, if the library only moved
something). Then record the new version in CHECKED_AGAINST.
"""

from __future__ import annotations

import _socket
import ast
import contextlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import io
import json
import logging
import os
import re
import select
import selectors
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import engineio
import engineio.socket
import flask
import flask_socketio
import gevent
import gevent.event
import gevent.queue
import gevent.socket
import greenlet
import pytest
import redis
import socketio
from engineio import packet as eio_packet
from socketio import packet as sio_packet

from tests.support import ChunkedServer, RedisServer
from webapp import fanout, realtime

ROOT = Path(__file__).resolve().parents[2]

# The versions these checks were last read and run against. requirements.lock
# pinning another one fails `test_the_lock_pins_the_checked_version`: re-run
# this module, re-read the library's change log for the reliances it names,
# then update the version here.
CHECKED_AGAINST = {
    "gevent": "26.9.0",
    "gevent-websocket": "0.10.1",
    "python-engineio": "4.15.1",
    "python-socketio": "5.18.1",
    "flask-socketio": "5.7.0",
    "redis": "8.1.0",
    "hiredis": "3.5.0",
    "prometheus-client": "0.26.0",
    "gunicorn": "27.0.1",
    "websocket-client": "1.9.2",
    "requests": "2.34.2",
    "urllib3": "2.8.0",
}

_UNSET = object()


def require(ok: object, what: str, *, by: str, breaks: str, found: object = _UNSET) -> None:
    """Fail, without a traceback, naming the reliance, who relies on it and what would break."""
    if ok:
        return
    lines = [what, f"  relied on by: {by}", f"  would break:  {breaks}"]
    if found is not _UNSET:
        lines.append(f"  found:        {found!r}")
    pytest.fail("\n".join(lines), pytrace=False)


def settle(condition: Callable[[], object], timeout: float = 5.0) -> bool:
    """Let other greenlets run until `condition` holds; False if it did not within `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.002)  # no monkeypatching here: the hub runs the others
    return True


def pristine(module_name: str) -> ModuleType:
    """Load a fresh copy of a library module, free of what Tidings patched into the loaded one.

    `webapp.pings.install` and `webapp.backpressure` replace methods of
    `engineio.socket.Socket` in this process once any test built the app;
    the library's own behaviour is checked on an unpatched copy.
    """
    spec = importlib.util.find_spec(module_name)
    assert spec is not None and spec.origin is not None
    copy = importlib.util.spec_from_file_location(module_name, spec.origin)
    assert copy is not None and copy.loader is not None
    module = importlib.util.module_from_spec(copy)
    copy.loader.exec_module(module)
    return module


# -- the pins -------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s\\;]+)", line)
        if match:
            pins[_canonical(match.group(1))] = match.group(2)
    return pins


@pytest.mark.parametrize("library", sorted(CHECKED_AGAINST))
def test_the_lock_pins_the_checked_version(library: str) -> None:
    locked = _locked_versions().get(library)
    checked = CHECKED_AGAINST[library]
    require(
        locked == checked,
        f"requirements.lock pins {library} {locked}; the checks in {Path(__file__).name} were "
        f"written against {checked}",
        by="the reliances on its private parts listed in this module",
        breaks=f"possibly any of them: you bumped {library} from {checked} to {locked}. Run "
        f"this module, read {library}'s changes for each reliance it names, adapt the code, "
        "then set CHECKED_AGAINST to the new version",
    )


@pytest.mark.parametrize("library", sorted(CHECKED_AGAINST))
def test_the_installed_version_is_the_locked_one(library: str) -> None:
    locked = _locked_versions().get(library)
    installed = importlib.metadata.version(library)
    require(
        installed == locked,
        f"{library} {installed} is installed, requirements.lock pins {locked}",
        by="every check below (they run against what is installed)",
        breaks="nothing yet, but these checks vouch for the wrong version: `make install`",
    )


# -- signatures: private callables still take what Tidings passes them -----------------------


def _resolve(path: str) -> Any:
    """Import `a.b.C.d`: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj: Any = (
                pristine(name) if name == "engineio.socket" else importlib.import_module(name)
            )
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = inspect.getattr_static(obj, attribute)
            if isinstance(obj, staticmethod | classmethod):
                obj = obj.__func__
        return obj
    raise ImportError(path)


# (callable, its leading parameters, who relies on it, what would break). The
# parameters Tidings passes or overrides must come first, in this order; any
# parameter after them must have a default.
SIGNATURES = [
    (
        "socketio.Server._handle_event_internal",
        "self, server, sid, eio_sid, data, namespace, id",
        "webapp/realtime.py _run_after_replies (wraps it per server, passes *args on)",
        "after_reply actions (a subscribe's held publications) would run at the wrong time",
    ),
    (
        "socketio.Server._send_eio_packet",
        "self, eio_sid, eio_pkt",
        "webapp/fanout.py deliver (queues a prebuilt engine.io packet per recipient)",
        "every emit to a room through the fan-out",
    ),
    (
        "socketio.PubSubManager.__init__",
        "self, channel",
        "webapp/queue.py QueueManager.__init__ (super().__init__(channel=...))",
        "the web worker's message queue manager would not start",
    ),
    *(
        (
            f"socketio.PubSubManager.{name}",
            "self, message",
            "webapp/queue.py QueueManager._handle_control (calls it with the decoded message)",
            "queue messages of that kind (emit/disconnect/rooms/callbacks) from other workers",
        )
        for name in (
            "_handle_emit",
            "_handle_disconnect",
            "_handle_enter_room",
            "_handle_leave_room",
            "_handle_close_room",
            "_handle_callback",
        )
    ),
    (
        "socketio.PubSubManager._publish",
        "self, data",
        "webapp/queue.py QueueManager._publish (overrides it: one PUBLISH, no retry)",
        "emits to sids on other workers would go through python-socketio's path or fail",
    ),
    (
        "socketio.PubSubManager._thread",
        "self",
        "webapp/queue.py QueueManager._thread (overrides the listening loop)",
        "the per-topic channels and the join race handling of the web tier",
    ),
    (
        "socketio.PubSubManager.emit",
        "self, event, data, namespace, room, skip_sid, callback, to",
        "webapp/queue.py QueueManager.emit (overrides it and calls super().emit by keyword)",
        "every Socket.IO emit of the web tier",
    ),
    (
        "socketio.Manager.emit",
        "self, event, data, namespace, room, skip_sid",
        "webapp/queue.py QueueManager._emit_here (calls it for binary packets)",
        "binary emits from application code",
    ),
    (
        "socketio.Manager.basic_enter_room",
        "self, sid, namespace, room, eio_sid",
        "webapp/queue.py QueueManager.basic_enter_room (overrides it to subscribe channels)",
        "interest routing: a topic room entered would not subscribe its queue channel",
    ),
    (
        "socketio.Manager.basic_leave_room",
        "self, sid, namespace, room",
        "webapp/queue.py QueueManager.basic_leave_room (overrides it to start a linger)",
        "interest routing: channels of empty rooms would never be left",
    ),
    (
        "socketio.Manager.get_participants",
        "self, namespace, room",
        "webapp/queue.py QueueManager._emit_here and _catch_up",
        "the recipients of every direct emit",
    ),
    (
        "socketio.Client._engineio_client_class",
        "self",
        "tidings/client.py _InOrderClient (overrides it)",
        "the Python client would handle publications out of order and drop some",
    ),
    (
        "engineio.Client._trigger_event",
        "self, event",
        "tidings/client.py _InOrderEngineIO._trigger_event (overrides it, sets run_async)",
        "the Python client would handle publications out of order and drop some",
    ),
    (
        "engineio.socket.Socket._websocket_handler",
        "self, ws",
        "webapp/websockets.py install (replaces it on the class with _serve, which calls the "
        "original for a websocket it cannot take over)",
        "every websocket: served by two greenlets each again (memory), or not at all",
    ),
    (
        "engineio.socket.Socket.receive",
        "self, pkt",
        "webapp/websockets.py EngineWebSocket._receive (hands it every decoded packet)",
        "every packet a websocket client sends",
    ),
    (
        "engineio.Server.get_queue_empty_exception",
        "self",
        "webapp/websockets.py EngineWebSocket._adopt and get",
        "an upgrade from long-polling would not take over what was queued for polling",
    ),
    (
        "engineio.socket.Socket.schedule_ping",
        "self",
        "webapp/pings.py install (replaces it with _schedule_ping)",
        "one ping greenlet per connection again (memory), or no pings at all",
    ),
    (
        "engineio.socket.Socket.close",
        "self, wait, abort, reason",
        "webapp/backpressure.py abort_connection (close(wait=False, abort=True, reason=...))",
        "slow clients and gaps would no longer be cut",
    ),
    (
        "engineio.Server.send_packet",
        "self, sid, pkt",
        "webapp/backpressure.py install (replaces it per server with bounded_send_packet)",
        "the slow-client bounds",
    ),
    (
        "engineio.packet.Packet.__init__",
        "self, packet_type, data, encoded_packet",
        "webapp/websockets.py _receive and _upgrade_step (Packet(encoded_packet=...)); "
        "webapp/queue.py, webapp/pings.py",
        "every packet a websocket client sends; every packet the web tier builds",
    ),
    (
        "engineio.packet.Packet.encode",
        "self, b64",
        "webapp/websockets.py _frame (str: a text frame, bytes: a binary one); "
        "webapp/fanout.py deliver",
        "every packet written to a websocket",
    ),
    (
        "geventwebsocket.handler.WebSocketHandler.upgrade_connection",
        "self",
        "webapp/worker.py SmallBufferWebSocketHandler.upgrade_connection",
        "the deferred 101 answer; the 512-byte read buffer of other apps' websockets",
    ),
    *(
        (
            f"geventwebsocket.handler.WebSocketHandler.{name}",
            "self",
            "webapp/worker.py SmallBufferWebSocketHandler.run_application (re-implements "
            "gevent-websocket's, calling these)",
            "every websocket upgrade",
        )
        for name in ("run_application", "upgrade_websocket", "run_websocket")
    ),
    (
        "gevent.pywsgi.WSGIHandler.write",
        "self, data",
        "webapp/worker.py SmallBufferWebSocketHandler._answer and detach_websocket (write(b'') "
        "formats the 101 answer through self._sendall)",
        "the 101 answer of every websocket",
    ),
    (
        "gevent.pywsgi.WSGIHandler._sendall",
        "self, data",
        "webapp/worker.py SmallBufferWebSocketHandler.detach_websocket (an instance attribute "
        "keeps the 101 answer instead of sending it)",
        "the 101 answer and engine.io's OPEN packet in one send()",
    ),
    (
        "gevent.pool.Group._discard",
        "self, greenlet",
        "webapp/worker.py KeepingPool._discard (keeps a detached handler's slot)",
        "worker_connections would no longer bound a worker's websockets",
    ),
    (
        "gevent.pool.Pool.free_count",
        "self",
        "webapp/worker.py KeepingPool.free_count (gunicorn's GeventWorker.run waits on it)",
        "a stopping worker would not wait for its websockets; worker_connections unbounded",
    ),
    (
        "gevent.pywsgi.WSGIHandler.MessageClass",
        "self",
        "webapp/worker.py SmallBufferWebSocketHandler.MessageClass (called with rfile, 0)",
        "request header parsing without the email package",
    ),
    (
        "gevent._monitor.PeriodicMonitoringThread.monitor_blocking",
        "self, hub",
        "webapp/metrics.py CountingMonitor.monitor_blocking (overrides it)",
        "tidings_gevent_hub_blocked_total; a blocked loop would build gevent's full report",
    ),
    (
        "gevent._monitor.PeriodicMonitoringThread._show_blocking_report",
        "self, hub, report, active_greenlet",
        "webapp/metrics.py CountingMonitor.monitor_blocking",
        "blocked-loop reports",
    ),
    (
        "gevent.events.EventLoopBlocked.__init__",
        "self, greenlet, blocking_time, info",
        "webapp/metrics.py CountingMonitor.monitor_blocking (builds the event, hub=hub)",
        "tidings_gevent_hub_blocked_total",
    ),
    (
        "redis.connection.AbstractConnection.send_packed_command",
        "self, command, check_health",
        "tidings/pubsub.py PubSubConnection.send; tidings/forwarder.py Forwarder._run, wait",
        "(UN)SUBSCRIBE of the queue connections; every forward of the listener",
    ),
    (
        "redis.connection.AbstractConnection.pack_commands",
        "self, commands",
        "tidings/pubsub.py PubSubConnection.send",
        "(UN)SUBSCRIBE of the web tier's queue connection",
    ),
    (
        "redis.connection.AbstractConnection.pack_command",
        "self",
        "tidings/forwarder.py Forwarder._run and wait (without hiredis)",
        "every forward of the listener when hiredis is not installed",
    ),
    (
        "redis.connection.AbstractConnection.read_response",
        "self",
        "tidings/forwarder.py Forwarder._run and wait",
        "every forward of the listener",
    ),
    (
        "redis.connection.AbstractConnection.can_read",
        "self, timeout",
        "tidings/forwarder.py Forwarder._checked_out (can_read(timeout=0))",
        "a connection broken while idle would take a batch and lose whether it ran",
    ),
    (
        "redis.connection.ConnectionPool.get_connection",
        "self",
        "tidings/pubsub.py PubSubConnection; tidings/forwarder.py Forwarder._checked_out",
        "the queue connections and the listener's forwarding connection",
    ),
    (
        "redis.connection.ConnectionPool.disconnect",
        "self, inuse_connections",
        "tidings/connection.py _drop_connections (disconnect(inuse_connections=False))",
        "Sentinel failover: idle connections would stay on the demoted master",
    ),
    (
        "redis.sentinel.Sentinel.check_master_state",
        "self, state, service_name",
        "tidings/connection.py _EpochSentinel.discover_master",
        "Sentinel: no master would ever be found",
    ),
    (
        "redis.sentinel.Sentinel.discover_master",
        "self, service_name",
        "tidings/connection.py _EpochSentinel.discover_master (overrides it)",
        "Sentinel: the newest configuration epoch would not win during a failover",
    ),
    (
        "prometheus_client.utils.floatToGoString",
        "d",
        "webapp/metrics.py _listener_families (the listener's latency buckets)",
        "/metrics would fail to render the listener's histogram",
    ),
    (
        "prometheus_client.multiprocess.mark_process_dead",
        "pid",
        "gunicorn.conf.py child_exit",
        "a dead worker's live gauges would stay in /metrics",
    ),
]


@pytest.mark.parametrize(
    ("path", "leading", "by", "breaks"), SIGNATURES, ids=[row[0] for row in SIGNATURES]
)
def test_a_private_callable_still_takes_what_tidings_passes(
    path: str, leading: str, by: str, breaks: str
) -> None:
    try:
        target = _resolve(path)
    except (ImportError, AttributeError) as exc:
        gone: Exception | None = exc
    else:
        gone = None
    require(gone is None, f"{path} is gone", by=by, breaks=breaks, found=gone)
    expected = [name.strip() for name in leading.split(",")]
    parameters = list(inspect.signature(target).parameters.values())
    names = [p.name for p in parameters]
    rest = parameters[len(expected) :]
    require(
        names[: len(expected)] == expected
        and all(
            p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in rest
        ),
        f"{path}({leading}, <only optional after>) changed",
        by=by,
        breaks=breaks,
        found=str(inspect.signature(target)),
    )


# -- python-socketio and Flask-SocketIO ------------------------------------------------------


def _gevent_sio_server(**options: Any) -> socketio.Server:
    return socketio.Server(async_mode="gevent", logger=False, engineio_logger=False, **options)


def _connect(server: socketio.Server, eio_sid: str) -> tuple[str, Any]:
    """Register an engine.io socket and its Socket.IO connection to `/`, as a handshake would."""
    sock = engineio.socket.Socket(server.eio, eio_sid)
    server.eio.sockets[eio_sid] = sock
    return server.manager.connect(eio_sid, "/"), sock


@pytest.mark.parametrize("async_handlers", [False, True], ids=["inline", "async_handlers"])
def test_socketio_queues_the_ack_inside_handle_event_internal_with_no_switch(
    async_handlers: bool,
) -> None:
    server = _gevent_sio_server(async_handlers=async_handlers)
    _, sock = _connect(server, "eio-ack")
    realtime._run_after_replies(server)  # the real wrapper, on this server
    seen: dict[str, Any] = {}
    switches: list[str] = []

    def record_switch(event: str, args: Any) -> None:
        switches.append(event)

    def ask(sid: str, payload: Any) -> dict[str, Any]:
        def after() -> None:
            greenlet.settrace(seen.pop("tracer"))
            seen["queued"] = [item.data for item in list(sock.queue.queue)]
            seen["switches"] = list(switches)

        realtime.after_reply(after)
        # From here to the after-reply action: nothing may run in between.
        seen["tracer"] = greenlet.settrace(record_switch)
        return {"ok": True}

    server.on("ask", ask)
    try:
        server._handle_event("eio-ack", "/", 7, ["ask", {}])
        acted = settle(lambda: "queued" in seen)
    finally:
        if "tracer" in seen:  # the action never ran
            greenlet.settrace(seen.pop("tracer"))
    by = "webapp/realtime.py _run_after_replies and after_reply (Handlers.subscribe: finish_join)"
    require(
        acted,
        "python-socketio handles an event through server._handle_event_internal (looked up on "
        "the instance) and it returns",
        by=by,
        breaks="subscribes would never join their room (finish_join never runs)",
    )
    require(
        seen["queued"] == ['37[{"ok":true}]'],
        "python-socketio Server._handle_event_internal(server, sid, eio_sid, data, namespace, "
        "id) queues the ACK on the engine.io socket before it returns",
        by=by,
        breaks="a subscribe's held publications would reach the client before its ack",
        found=seen["queued"],
    )
    require(
        not seen["switches"],
        "python-socketio sends the ACK after the handler returns with no greenlet switch in "
        "between",
        by=by,
        breaks="a publication emitted by another greenlet could slip in between the ack and "
        "the held publications, out of order",
        found=seen["switches"],
    )


def test_socketio_sends_every_packet_through_the_engineio_servers_send_packet() -> None:
    server = _gevent_sio_server()
    sid, _ = _connect(server, "eio-send")
    sent: list[tuple[str, str]] = []
    server.eio.send_packet = lambda eio_sid, pkt: sent.append((eio_sid, pkt.encode()))
    server._send_eio_packet("eio-send", eio_packet.Packet(eio_packet.MESSAGE, "direct"))
    server.emit("event", {"a": 1}, to=sid)
    require(
        sent == [("eio-send", "4direct"), ("eio-send", '42["event",{"a":1}]')],
        "python-socketio's _send_eio_packet and its own emits call the engine.io server's "
        "send_packet (looked up on the instance)",
        by="webapp/backpressure.py install (bounded_send_packet replaces it per server); "
        "webapp/fanout.py deliver",
        breaks="the slow-client bounds would miss packets; fan-out would bypass them",
        found=sent,
    )


def test_socketio_initialises_its_client_manager_once_per_server() -> None:
    server = _gevent_sio_server()
    calls: list[str] = []
    server.manager.initialize = lambda: calls.append("initialize")
    require(
        server.manager_initialized is False,
        "python-socketio Server.manager_initialized starts False",
        by="webapp/__init__.py create_app (initialises the queue manager at start, sets it)",
        breaks="/readyz would report the queue only after a first client connected",
        found=getattr(server, "manager_initialized", _UNSET),
    )
    server.manager_initialized = True
    server._handle_eio_connect("eio-init", {})
    require(
        calls == [],
        "python-socketio does not initialise the manager again once manager_initialized is set",
        by="webapp/__init__.py create_app",
        breaks="a second queue reading loop per worker (every message handled twice)",
        found=calls,
    )


def test_socketio_every_room_change_goes_through_basic_enter_and_leave_room() -> None:
    changes: list[tuple[str, Any]] = []

    class Recording(socketio.PubSubManager):
        def basic_enter_room(
            self, sid: str, namespace: str, room: Any, eio_sid: Any = None
        ) -> None:
            changes.append(("enter", room))
            super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)

        def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
            changes.append(("leave", room))
            super().basic_leave_room(sid, namespace, room)

        def _publish(self, data: Any) -> None:
            pass

    server = _gevent_sio_server(client_manager=Recording())
    sid, _ = _connect(server, "eio-rooms")
    server.enter_room(sid, "t:a")
    server.manager._handle_enter_room({"sid": sid, "namespace": "/", "room": "t:b"})
    server.close_room("t:b")
    server.manager._handle_leave_room({"sid": sid, "namespace": "/", "room": "t:a"})
    server.enter_room(sid, "t:c")
    rooms = server.manager.rooms
    members = dict(rooms.get("/", {}).get("t:c", {}))
    participants = list(server.manager.get_participants("/", "t:c"))
    require(
        members == {sid: "eio-rooms"} and participants == [(sid, "eio-rooms")],
        "python-socketio's Manager.rooms[namespace][room] maps each member's sid to its "
        "engine.io sid, and get_participants yields those pairs",
        by="webapp/queue.py QueueManager._deliver_routed, recipients, _emit_here; "
        "webapp/metrics.py Sampler.sample",
        breaks="routed publications would reach nobody; the connection gauges would be wrong",
        found={"rooms": rooms, "participants": participants},
    )
    server.manager.disconnect(sid, "/", ignore_queue=True)
    expected = [
        ("enter", None),
        ("enter", sid),
        ("enter", "t:a"),
        ("enter", "t:b"),
        ("leave", "t:b"),
        ("leave", "t:a"),
        ("enter", "t:c"),
    ]
    require(
        changes[: len(expected)] == expected
        and set(changes[len(expected) :]) == {("leave", None), ("leave", sid), ("leave", "t:c")},
        "python-socketio's Manager changes rooms only through basic_enter_room and "
        "basic_leave_room (enter_room, queue messages, close_room, disconnect)",
        by="webapp/queue.py QueueManager.basic_enter_room / basic_leave_room",
        breaks="interest routing: topic channels subscribed or left at the wrong time "
        "(lost publications, or channels never left)",
        found=changes,
    )


def _method_names_compared(tree: ast.AST) -> set[str]:
    """String constants compared with `data['method']` or used as keys of a dispatch dict."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and "method" in ast.unparse(node.left):
            found |= {c.value for c in node.comparators if isinstance(c, ast.Constant)}
        elif isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
            if "emit" in keys:
                found |= set(keys)
    return found


def test_socketio_queue_methods_are_the_ones_queue_manager_dispatches() -> None:
    upstream_tree = ast.parse(textwrap.dedent(inspect.getsource(socketio.PubSubManager._thread)))
    upstream = _method_names_compared(upstream_tree)
    queue_source = (ROOT / "webapp" / "queue.py").read_text()
    tidings_tree = next(
        node
        for node in ast.walk(ast.parse(queue_source))
        if isinstance(node, ast.FunctionDef) and node.name == "_handle_control"
    )
    ours = _method_names_compared(tidings_tree)
    require(
        upstream == ours,
        "python-socketio PubSubManager._thread dispatches the queue message methods "
        "that webapp/queue.py re-implements",
        by="webapp/queue.py QueueManager._handle_control (replaces PubSubManager._thread)",
        breaks="messages of a new or renamed method from other workers would be ignored",
        found={"python-socketio": sorted(upstream), "webapp/queue.py": sorted(ours)},
    )


def test_socketio_pubsub_emit_handles_here_then_publishes_the_forwarders_shape() -> None:
    handled: list[dict[str, Any]] = []
    published: list[dict[str, Any]] = []

    class Recording(socketio.PubSubManager):
        def _handle_emit(self, message: dict[str, Any]) -> None:
            handled.append(message)

        def _publish(self, data: Any) -> None:
            published.append(data)

    manager = Recording(channel="tidings:socketio")
    server = _gevent_sio_server(client_manager=manager)
    require(
        manager.channel == "tidings:socketio"
        and isinstance(manager.host_id, str)
        and manager.json is server.packet_class.json
        and callable(manager.json.loads)
        and server.packet_class is sio_packet.Packet,
        "python-socketio's PubSubManager keeps channel, host_id and the server's json module; "
        "the server's packet_class is socketio.packet.Packet",
        by="webapp/queue.py QueueManager (_publish, _handle_control, _emit_here)",
        breaks="the web worker's queue: publishes to the wrong channel, own messages handled "
        "twice, packets encoded another way",
    )
    manager.emit("publications", [[1]], namespace="/", room="t:x")
    require(
        len(handled) == 1 and published == handled,
        "python-socketio PubSubManager.emit (no ignore_queue) hands the message to "
        "_handle_emit here and to _publish for the other workers",
        by="webapp/queue.py QueueManager.emit and _handle_emit",
        breaks="emits from application code would reach this worker's clients twice or not at all",
        found={"handled": handled, "published": published},
    )
    from tidings.forwarder import Forwarder

    head = Forwarder(None, history_size=1, history_ttl=1)._head  # type: ignore[arg-type]
    forwarded = json.loads(head + '"t:x","tidings":{},"data":[[1]]}')
    require(
        set(handled[0]) == set(forwarded) - {"tidings"},
        "the forwarder's queue message has the keys of python-socketio's own emit message",
        by="tidings/forwarder.py FORWARD_SCRIPT and Forwarder._head; webapp/queue.py split_message",
        breaks="publications forwarded by the listener would be ignored or misread by "
        "python-socketio's managers (other consumers of the channel)",
        found={"python-socketio": sorted(handled[0]), "forwarder": sorted(forwarded)},
    )


def test_socketio_pubsub_initialize_starts_the_thread_method() -> None:
    started: list[Any] = []

    class Recording(socketio.PubSubManager):
        def _thread(self) -> None:
            pass

    manager = Recording()
    server = SimpleNamespace(
        start_background_task=started.append,
        packet_class=sio_packet.Packet,
        logger=logging.getLogger("third_party_check"),
    )
    manager.set_server(server)
    manager.initialize()
    require(
        started == [manager._thread],
        "python-socketio PubSubManager.initialize starts self._thread as a background task",
        by="webapp/queue.py QueueManager.initialize and _thread",
        breaks="the web worker would never read its message queue",
        found=started,
    )


def test_socketio_encodes_events_and_acks_as_tidings_builds_and_recognises_them() -> None:
    listing = '[{"topic":"a.b","offset":"1-0","data":{"x":[1,"é"]}}]'
    event = sio_packet.Packet(
        sio_packet.EVENT, namespace="/", data=["publications", json.loads(listing)]
    ).encode()
    require(
        event.startswith('2["publications",')
        and json.loads(event[1:]) == json.loads('["publications",' + listing + "]"),
        'python-socketio encodes an EVENT to / as 2["publications",<JSON list>] (no '
        "namespace, no id)",
        by="webapp/queue.py _PACKET_HEAD and _deliver_routed (build that text by hand from "
        "the forwarded bytes)",
        breaks="routed publications would differ from what python-socketio sends (clients "
        "parse both)",
        found=event,
    )
    ack = sio_packet.Packet(sio_packet.ACK, namespace="/", id=3, data=[{"ok": True}]).encode()
    require(
        ack.startswith("3"),
        "python-socketio encodes an ACK with a leading '3'",
        by="webapp/websockets.py is_reply",
        breaks="a large subscribe recovery would be measured as live traffic and its client "
        "cut at every reconnect",
        found=ack,
    )


def test_flask_socketio_middleware_adds_only_flask_app_to_the_environ() -> None:
    app = flask.Flask("third_party_check")
    flask_socketio.SocketIO(app, async_mode="threading")
    require(
        type(app.wsgi_app) is flask_socketio._SocketIOMiddleware
        and getattr(app.wsgi_app, "flask_app", None) is app,
        "Flask-SocketIO's init_app installs _SocketIOMiddleware (with .flask_app) as app.wsgi_app",
        by="webapp/realtime.py init_app and _InPlaceMiddleware",
        breaks="nothing visible: the environ copy per connection (0.8 KB) would come back",
        found=type(app.wsgi_app),
    )
    passed: list[dict[str, Any]] = []

    def record(self: Any, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        passed.append(environ)
        return []

    original = socketio.WSGIApp.__call__
    socketio.WSGIApp.__call__ = record  # type: ignore[method-assign]
    try:
        theirs, ours = {"PATH_INFO": "/"}, {"PATH_INFO": "/"}
        flask_socketio._SocketIOMiddleware.__call__(app.wsgi_app, theirs, None)
        realtime._InPlaceMiddleware.__call__(app.wsgi_app, ours, None)  # type: ignore[arg-type]
    finally:
        socketio.WSGIApp.__call__ = original  # type: ignore[method-assign]
    require(
        passed[0] == passed[1] and passed[1] is ours,
        "Flask-SocketIO's _SocketIOMiddleware.__call__ only copies the environ and adds flask.app",
        by="webapp/realtime.py _InPlaceMiddleware.__call__ (does the same in place)",
        breaks="whatever else Flask-SocketIO adds would be missing from every request",
        found=passed,
    )


# -- python-engineio -------------------------------------------------------------------------


@pytest.fixture
def eio_socket_class() -> type:
    """engine.io's Socket class as released (what Tidings' patches wrap)."""
    return pristine("engineio.socket").Socket


@pytest.fixture
def gevent_eio() -> Iterator[engineio.Server]:
    """An engine.io server in gevent mode (gevent's queues and greenlets, no monkeypatching)."""
    server = engineio.Server(async_mode="gevent", monitor_clients=False, logger=False)
    yield server
    server.sockets.clear()


def test_engineio_gevent_mode_keeps_gevent_websockets_websocket_as_ws_sock(
    gevent_eio: engineio.Server,
) -> None:
    from engineio.async_drivers import gevent as driver
    from geventwebsocket.websocket import Stream, WebSocket

    require(
        gevent_eio._async["websocket"] is driver.WebSocketWSGI
        and driver.SimpleWebSocketWSGI is None,
        "python-engineio's gevent mode serves websockets through gevent-websocket",
        by="webapp/websockets.py _serve (finds gevent-websocket's handler through the ws)",
        breaks="every websocket would be served by engine.io's two greenlets again (memory)",
        found=gevent_eio._async["websocket"],
    )
    server_end, client_end = gevent.socket.socketpair()
    handler = SimpleNamespace(socket=server_end, rfile=server_end.makefile("rb"))
    websocket = WebSocket({}, Stream(handler), handler)
    wrapped: list[Any] = []
    driver.WebSocketWSGI(wrapped.append, gevent_eio)({"wsgi.websocket": websocket}, None)
    ws = wrapped[0]
    require(
        getattr(ws, "_sock", None) is websocket and websocket.handler is handler,
        "python-engineio's gevent WebSocketWSGI keeps environ['wsgi.websocket'] as ws._sock, "
        "whose .handler is gevent-websocket's handler of the connection",
        by="webapp/websockets.py _serve (ws._sock.handler.detach_websocket(); under TLS "
        "ws._sock.handler.socket for abort_connection)",
        breaks="silently, every websocket served by engine.io's two greenlets again (memory)",
        found=vars(ws) if hasattr(ws, "__dict__") else ws,
    )
    for end in (server_end, client_end):
        end.close()


def test_engineio_socket_takes_its_queue_from_the_servers_create_queue(
    gevent_eio: engineio.Server, eio_socket_class: type
) -> None:
    class Marked(type(gevent_eio.create_queue())):  # type: ignore[misc]
        pass

    server_missing = [
        name
        for name in (
            *("sockets", "ping_interval", "ping_timeout", "max_http_buffer_size", "logger"),
            *("create_event", "sleep", "start_background_task", "reason"),
        )
        if not hasattr(gevent_eio, name)
    ]
    require(
        not server_missing and gevent_eio.reason.SERVER_DISCONNECT,
        "python-engineio Server has sockets (by sid), ping_interval, ping_timeout, "
        "max_http_buffer_size, logger, create_event, sleep, start_background_task, "
        "reason.SERVER_DISCONNECT",
        by="webapp/fanout.py deliver; webapp/pings.py PingLoop; webapp/backpressure.py; "
        "webapp/websockets.py",
        breaks="fan-out, pings, slow-client cuts and every websocket",
        found=server_missing,
    )
    gevent_eio.create_queue = Marked
    sock = eio_socket_class(gevent_eio, "eio-attrs")
    missing = [
        name
        for name in (
            *("queue", "last_ping", "upgraded", "upgrading", "connected"),
            *("closing", "closed", "sid", "server"),
        )
        if not hasattr(sock, name)
    ]
    require(
        not missing,
        "python-engineio Socket has queue, last_ping, upgraded, upgrading, connected, "
        "closing, closed, sid, server",
        by="webapp/fanout.py deliver; webapp/pings.py ping and _schedule_ping; "
        "webapp/backpressure.py; webapp/websockets.py EngineWebSocket",
        breaks="fan-out, pings, slow-client cuts and every websocket",
        found=missing,
    )
    require(
        type(sock.queue) is Marked,
        "python-engineio Socket.__init__ makes its queue with server.create_queue() (an "
        "instance attribute set on the server is used)",
        by="webapp/backpressure.py install (eio.create_queue = MeteredQueue)",
        breaks="slow long-polling clients would be buffered forever",
        found=type(sock.queue),
    )


def test_engineio_websocket_handler_is_what_websockets_py_mirrors(
    gevent_eio: engineio.Server, eio_socket_class: type
) -> None:
    reasons: list[Any] = []
    gevent_eio.on("disconnect", lambda sid, reason: reasons.append(reason))
    by = "webapp/websockets.py EngineWebSocket (__init__, _upgrade_step, _adopt, _gone)"
    # An upgrade from long-polling: the probe, then UPGRADE.
    sock = eio_socket_class(gevent_eio, "eio-upgrade")
    gevent_eio.sockets["eio-upgrade"] = sock
    sock.connected = True  # as after a long-polling handshake
    inbox: gevent.queue.Queue[Any] = gevent.queue.Queue()
    sent: list[Any] = []
    ws = SimpleNamespace(send=sent.append, wait=inbox.get, close=lambda: None)
    task = gevent.spawn(sock._websocket_handler, ws)
    inbox.put("2probe")
    settle(lambda: sent)
    queued = [item.packet_type for item in list(sock.queue.queue)]
    require(
        sent == ["3probe"] and sock.upgrading and queued == [eio_packet.NOOP],
        "python-engineio answers an upgrade's PING probe with PONG probe, holds sends "
        "(upgrading) and queues a NOOP that ends the pending poll",
        by=by,
        breaks="upgrades from long-polling: clients would wait for an answer that differs",
        found={"sent": sent, "upgrading": sock.upgrading, "queued": queued},
    )
    inbox.put("5")
    upgraded = settle(lambda: sock.upgraded and not sock.upgrading)
    inbox.put(None)  # the client goes away
    task.join(5)
    require(
        upgraded and sent[1:] == ["6"] and sock.closed and reasons == ["transport close"],
        "python-engineio completes an upgrade on UPGRADE (upgraded, not upgrading), then "
        "writes what was queued (the NOOP), and closes the socket with reason TRANSPORT_CLOSE "
        "(abort) when the client goes",
        by=by,
        breaks="upgrades, or the disconnect reason the application sees",
        found={"sent": sent, "closed": sock.closed, "reasons": reasons},
    )
    # A websocket from the start.
    fresh = eio_socket_class(gevent_eio, "eio-fresh")
    gevent_eio.sockets["eio-fresh"] = fresh
    inbox = gevent.queue.Queue()
    ws = SimpleNamespace(send=sent.append, wait=inbox.get, close=lambda: None)
    task = gevent.spawn(fresh._websocket_handler, ws)
    settled = settle(lambda: fresh.upgraded)
    inbox.put(None)
    task.join(5)
    require(
        settled and fresh.connected,
        "python-engineio marks a socket that starts as a websocket connected and upgraded",
        by=by,
        breaks="packets to websockets would be held or refused as if polling",
        found={"connected": fresh.connected, "upgraded": fresh.upgraded},
    )


def test_engineio_socket_uses_its_queue_only_through_put_and_join(
    gevent_eio: engineio.Server, eio_socket_class: type
) -> None:
    calls: list[Any] = []

    class Recording:
        def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
            calls.append(("put", item and item.packet_type))

        def join(self) -> None:
            calls.append(("join",))

        def __getattr__(self, name: str) -> Any:
            calls.append(name)
            raise AttributeError(name)

    sock = eio_socket_class(gevent_eio, "eio-queue")
    sock.queue = Recording()
    sock.send(eio_packet.Packet(eio_packet.MESSAGE, "x"))
    sock.close(wait=True, abort=False)
    expected = [
        ("put", eio_packet.MESSAGE),
        ("put", eio_packet.CLOSE),
        ("put", None),
        ("join",),
    ]
    require(
        calls == expected,
        "python-engineio's Socket.send puts each packet on Socket.queue; close() puts a CLOSE, "
        "then None, then joins the queue (nothing else is used outside polling)",
        by="webapp/websockets.py EngineWebSocket (is the queue of a handed-over socket: put, "
        "join, task_done, qsize, empty)",
        breaks="packets to websockets would be lost, or a close would never reach the client",
        found=calls,
    )


def test_engineio_decodes_and_encodes_the_packets_websockets_py_recognises() -> None:
    decoded = [
        (p.packet_type, p.data)
        for p in (
            eio_packet.Packet(encoded_packet=text) for text in ("3", "2probe", "5", '42["a"]')
        )
    ]
    binary = eio_packet.Packet(eio_packet.MESSAGE, b"\x01\x02").encode()
    require(
        decoded
        == [
            (eio_packet.PONG, ""),
            (eio_packet.PING, "probe"),
            (eio_packet.UPGRADE, ""),
            (eio_packet.MESSAGE, '2["a"]'),
        ]
        and eio_packet.Packet(eio_packet.PONG, data="probe").encode() == "3probe"
        and binary == b"\x01\x02",
        "python-engineio's packets: '3' is a PONG, '2probe' the probe, '5' UPGRADE, '4...' a "
        "MESSAGE; PONG probe encodes as '3probe'; a binary MESSAGE encodes as its bytes",
        by="webapp/websockets.py EngineWebSocket._message (handles '3' and '42' from the hub), "
        "_upgrade_step, _PROBE_ANSWER, _frame",
        breaks="pongs, events, upgrades or binary messages of websocket clients",
        found={"decoded": decoded, "binary": binary},
    )


def test_socketio_keeps_each_connections_environ_in_server_environ() -> None:
    server = _gevent_sio_server()
    seen: list[Any] = []
    server.on("connect", lambda sid, environ, auth=None: seen.append(environ))
    environ = {"REMOTE_ADDR": "10.0.0.1", "QUERY_STRING": ""}
    server._handle_eio_connect("eio-env", environ)
    kept = server.environ.get("eio-env")
    server.environ["eio-env"] = slim = {"REMOTE_ADDR": "10.0.0.1"}
    sock = engineio.socket.Socket(server.eio, "eio-env")
    server.eio.sockets["eio-env"] = sock
    server._handle_eio_message("eio-env", "0")
    require(
        kept is environ
        and seen == [slim]
        and isinstance(server.async_handlers, bool)
        and server.eio.async_handlers is False,
        "python-socketio keeps each engine.io connection's WSGI environ in Server.environ "
        "(by engine.io sid) and hands that entry to the connect handler when Socket.IO "
        "connects; Server.async_handlers says whether events run in greenlets of their own",
        by="webapp/websockets.py Layer.slim_environ and EngineWebSocket._message",
        breaks="the whole environ (headers, input stream) kept for every connection's life "
        "(memory), or events run inside the hub",
        found={"kept": kept, "seen": seen},
    )
    server.eio.sockets.clear()


def test_engineio_schedules_pings_through_socket_schedule_ping(
    monkeypatch: pytest.MonkeyPatch, eio_socket_class: type
) -> None:
    scheduled: list[Any] = []

    def record(sock: Any) -> None:
        scheduled.append(sock)

    monkeypatch.setattr(engineio.socket.Socket, "schedule_ping", record)
    server = engineio.Server(async_mode="threading", monitor_clients=False, logger=False)
    environ = {
        "REQUEST_METHOD": "GET",
        "QUERY_STRING": "EIO=4&transport=polling",
        "PATH_INFO": "/engine.io/",
        "wsgi.input": io.BytesIO(),
    }
    server.handle_request(environ, lambda *args: None)
    sock = eio_socket_class(server, "eio-pong")
    sock.schedule_ping = lambda: scheduled.append("pong")
    sock.receive(eio_packet.Packet(eio_packet.PONG))
    server.sockets.clear()
    require(
        len(scheduled) == 2
        and isinstance(scheduled[0], engineio.socket.Socket)
        and scheduled[1] == "pong",
        "python-engineio calls Socket.schedule_ping at the handshake and on each PONG",
        by="webapp/pings.py install (replaces Socket.schedule_ping)",
        breaks="clients would never be pinged (engine.io clients drop the connection) or be "
        "pinged by a greenlet each",
        found=scheduled,
    )


def test_engineio_ping_scheduling_is_what_pings_py_mirrors(
    gevent_eio: engineio.Server, eio_socket_class: type
) -> None:
    started: list[Any] = []
    gevent_eio.start_background_task = lambda target, *a, **k: started.append(target)
    gevent_eio.sleep = lambda seconds=0: None
    sock = eio_socket_class(gevent_eio, "eio-ping")
    sock.schedule_ping()
    sock.schedule_ping()  # a second PONG before the next PING
    require(
        started == [sock._send_ping] and sock.last_ping is None,
        "python-engineio Socket.schedule_ping starts _send_ping once per answered PING "
        "(when last_ping is set) and clears last_ping",
        by="webapp/pings.py _schedule_ping (keeps that condition)",
        breaks="pings doubled by duplicate PONGs, or missing",
        found={"started": started, "last_ping": sock.last_ping},
    )
    before = time.time()
    sock._send_ping()
    queued = [item.encode() for item in list(sock.queue.queue)]
    require(
        queued == ["2"] and sock.last_ping is not None and sock.last_ping >= before,
        "python-engineio Socket._send_ping (after its sleep) sets last_ping = time.time() and "
        "sends a PING",
        by="webapp/pings.py ping (does the same without a greenlet per socket)",
        breaks="the ping timeout check (last_ping) and the client's liveness",
        found={"queued": queued, "last_ping": sock.last_ping},
    )


def test_engineio_send_closes_a_socket_past_its_ping_timeout(
    gevent_eio: engineio.Server, eio_socket_class: type
) -> None:
    sock = eio_socket_class(gevent_eio, "eio-late")
    sock.last_ping = time.time() - gevent_eio.ping_timeout - 1
    sock.send(eio_packet.Packet(eio_packet.MESSAGE, "late"))
    require(
        sock.closed,
        "python-engineio Socket.send closes a socket whose PING went unanswered past ping_timeout",
        by="webapp/fanout.py deliver (leaves such sockets to engine.io's send)",
        breaks="dead clients would be written to directly and kept open",
        found={"closing": sock.closing, "closed": sock.closed},
    )


# -- gevent-websocket ------------------------------------------------------------------------


def _read_exactly(sock: Any, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        received += sock.recv(size - len(received)) or pytest.fail("closed early")
    return bytes(received)


@pytest.mark.parametrize("size", [5, 300, 70_000], ids=["7-bit", "16-bit", "64-bit"])
def test_gevent_websocket_frames_text_as_fanout_does(size: int) -> None:
    from geventwebsocket.websocket import Stream, WebSocket

    server_end, client_end = gevent.socket.socketpair()
    handler = SimpleNamespace(socket=server_end, rfile=server_end.makefile("rb"))
    websocket = WebSocket({}, Stream(handler), handler)
    text = "4" + "é" * ((size - 1) // 2)
    expected = fanout.text_frame(text)
    sender = gevent.spawn(websocket.send, text)
    wire = _read_exactly(client_end, len(expected))
    sender.join(5)
    for end in (server_end, client_end):
        end.close()
    require(
        wire == expected,
        "gevent-websocket's WebSocket.send(text) writes one final unmasked text frame, "
        "the shortest length encoding",
        by="webapp/frames.py encode_frame (frames must be what gevent-websocket sends "
        "an app's own websocket and a TLS websocket)",
        breaks="a client would get frames from Tidings' writer that differ from engine.io's",
        found=wire[:16],
    )


def test_gevent_websocket_reads_and_writes_through_stream_raw_read_and_raw_write() -> None:
    from geventwebsocket.websocket import Stream, WebSocket

    server_end, client_end = gevent.socket.socketpair()
    handler = SimpleNamespace(socket=server_end, rfile=server_end.makefile("rb", 512))
    websocket = WebSocket({}, Stream(handler), handler)
    stream_read = websocket.stream.read
    read_source = inspect.getsource(WebSocket.read_frame)
    send_source = inspect.getsource(WebSocket.send_frame)
    require(
        getattr(stream_read, "__self__", None) is handler.rfile
        and websocket.handler is handler
        and hasattr(websocket, "closed")
        and {"stream", "raw_read", "raw_write"} <= set(WebSocket.__slots__)
        and "Header.decode_header(self.stream)" in read_source
        and "self.raw_read(" in read_source
        and "self.raw_write(" in send_source,
        "gevent-websocket's Stream binds handler.rfile.read when the WebSocket is made; the "
        "WebSocket reads frame headers through stream.read, payloads through raw_read, writes "
        "through raw_write, and keeps .handler and .closed",
        by="webapp/worker.py SmallBufferWebSocketHandler.upgrade_connection, _first_read, "
        "_first_write and detach_websocket",
        breaks="the deferred 101 answer of other apps' websockets, their 512-byte reader, or "
        "the hand-over of engine.io's",
        found=stream_read,
    )
    source = inspect.getsource(
        __import__("geventwebsocket.handler").handler.WebSocketHandler.upgrade_connection
    )
    run_source = inspect.getsource(
        __import__("geventwebsocket.handler").handler.WebSocketHandler.run_websocket
    )
    require(
        "WebSocket(self.environ, Stream(self), self)" in source
        and "if not self.websocket.closed" in run_source,
        "gevent-websocket's WebSocketHandler.upgrade_connection builds the WebSocket from the "
        "handler itself; run_websocket closes it only if it is not closed",
        by="webapp/worker.py SmallBufferWebSocketHandler.upgrade_connection and "
        "detach_websocket (marks the handed-over WebSocket closed)",
        breaks="a close frame sent on a connection given away",
    )
    for end in (server_end, client_end):
        end.close()


def test_gevent_websocket_worker_hands_its_handler_to_gunicorns_server() -> None:
    from geventwebsocket.gunicorn import workers
    from gunicorn.workers import ggevent

    run_source = inspect.getsource(ggevent.GeventWorker.run)
    require(
        issubclass(workers.GeventWebSocketWorker, ggevent.GeventPyWSGIWorker)
        and "handler_class=self.wsgi_handler" in run_source,
        "gevent-websocket's GeventWebSocketWorker is gunicorn's GeventPyWSGIWorker, whose "
        "server is built with handler_class=self.wsgi_handler",
        by="webapp/worker.py GeventWebSocketWorker (wsgi_handler = SmallBufferWebSocketHandler)",
        breaks="the small read buffer and the fast header parser would be silently unused",
    )


# -- gevent ----------------------------------------------------------------------------------


def test_gevent_loop_io_watchers_call_back_from_the_hub_until_stopped() -> None:
    sender, receiver = socket.socketpair()
    receiver.setblocking(False)
    loop = gevent.get_hub().loop
    calls: list[bytes] = []

    def readable() -> None:  # called with no arguments, as webapp/transport.py's are
        calls.append(receiver.recv(100))

    watcher = loop.io(receiver.fileno(), 1)  # READ
    watcher.start(readable)
    sender.send(b"ping")
    called = settle(lambda: calls)
    watcher.stop()
    sender.send(b"more")
    gevent.sleep(0.05)  # nothing to poll for: a stopped watcher must stay silent
    watcher.close()
    fired: list[Any] = []
    timer = loop.timer(0.01)
    timer.start(fired.append, timer)
    timed = settle(lambda: fired)
    timer.close()
    writable: list[bool] = []
    writer = loop.io(sender.fileno(), 2)  # WRITE
    writer.start(lambda: writable.append(True))
    wakes = settle(lambda: writable)
    writer.stop()
    writer.close()
    require(
        called and calls == [b"ping"] and timed and fired == [timer] and wakes,
        "gevent's loop.io(fd, 1 or 2).start(callback) calls callback() from the hub while the "
        "fd is readable or writable, and not after stop(); loop.timer(seconds).start(cb, arg) "
        "calls cb(arg) once",
        by="webapp/transport.py Transport (start_reading, _readable, write, _writable, close)",
        breaks="every handed-over websocket: nothing read, nothing written after a backlog, "
        "or a closing connection never finished",
        found={"calls": calls, "fired": fired, "writable": writable},
    )
    sender.close()
    receiver.close()


def test_gevent_socket_detach_keeps_the_fd_open_and_drops_its_watchers() -> None:
    server_end, client_end = gevent.socket.socketpair()
    fd = server_end.fileno()
    detached = server_end.detach()
    raw = _socket.socket(fileno=detached)
    client_end.sendall(b"still open")
    raw.settimeout(5)
    received = raw.recv(100)
    require(
        detached == fd
        and received == b"still open"
        and server_end._read_event is None
        and server_end._write_event is None,
        "a gevent socket's detach() returns its fd without closing it and drops its own "
        "read and write watchers",
        by="webapp/worker.py SmallBufferWebSocketHandler.detach_websocket; webapp/websockets.py "
        "_serve (_socket.socket(fileno=fd))",
        breaks="handed-over websockets closed at once, or two sets of watchers on one fd",
        found={"fd": (fd, detached), "received": received},
    )
    raw.close()
    client_end.close()


def test_gevent_pywsgi_handle_leaves_a_connection_whose_socket_was_taken() -> None:
    from gevent import pywsgi

    source = inspect.getsource(pywsgi.WSGIHandler.handle)
    write_source = inspect.getsource(pywsgi.WSGIHandler._write_with_headers)
    require(
        "while self.socket is not None" in source
        and "if self.socket is not None" in source
        and "self._sendall(towrite)" in write_source,
        "gevent's pywsgi WSGIHandler.handle stops and closes nothing once self.socket is None; "
        "the headers of an answer go out through self._sendall",
        by="webapp/worker.py SmallBufferWebSocketHandler.detach_websocket (sets self.socket "
        "to None; keeps the 101 answer by setting _sendall)",
        breaks="every handed-over websocket closed by the handler that gave it away, or its "
        "101 answer sent before engine.io's OPEN packet",
    )


def test_gevent_pool_slots_are_a_semaphore_released_in_discard() -> None:
    from gevent.pool import Group, Pool

    pool = Pool(2)
    gate = gevent.event.Event()
    task = pool.spawn(gate.wait)
    taken = pool.free_count()
    gate.set()
    task.join(5)
    settle(lambda: len(pool) == 0)
    source = inspect.getsource(Pool._discard)
    require(
        taken == 1
        and pool.free_count() == 2
        and "Group._discard(self, greenlet)" in source
        and "self._semaphore.release()" in source
        and hasattr(pool._semaphore, "release")
        and Group._discard is not Pool._discard,
        "gevent's Pool holds a slot per greenlet in _semaphore, released by Pool._discard "
        "after Group._discard when the greenlet ends; free_count() is size - len(pool)",
        by="webapp/worker.py KeepingPool (_discard keeps a detached handler's slot; "
        "release_kept releases it)",
        breaks="worker_connections would no longer bound a worker's websockets, or slots leak",
        found={"taken": taken, "free": pool.free_count()},
    )


def test_gunicorn_gevent_worker_builds_its_server_from_server_class_with_a_pool() -> None:
    from gunicorn.workers import ggevent

    run_source = inspect.getsource(ggevent.GeventWorker.run)
    require(
        "pool = Pool(self.worker_connections)" in run_source
        and "self.server_class(" in run_source
        and "spawn=pool" in run_source
        and "server.pool.free_count() != server.pool.size" in run_source,
        "gunicorn's GeventWorker.run builds self.server_class(..., spawn=Pool("
        "worker_connections)) and, stopping, waits while pool.free_count() != pool.size",
        by="webapp/worker.py WebSocketServer (swaps the Pool for a KeepingPool) and "
        "GeventWebSocketWorker.server_class",
        breaks="worker_connections unbounded for websockets; a stopping worker would not "
        "wait for them",
    )


def test_gevent_queue_calls_a_subclass_put_and_get_hooks() -> None:
    moved: list[tuple[str, Any]] = []

    class Counting(gevent.queue.JoinableQueue):  # engine.io's queue in gevent mode
        def _put(self, item: Any) -> None:
            moved.append(("put", item))
            super()._put(item)

        def _get(self) -> Any:
            item = super()._get()
            moved.append(("get", item))
            return item

    queue = Counting()
    queue.put("a")
    queue.get(False)
    queue.put("b")
    queue.get(True, 1)
    require(
        moved == [("put", "a"), ("get", "a"), ("put", "b"), ("get", "b")],
        "gevent's JoinableQueue.put and get go through the _put and _get of a Python subclass",
        by="webapp/backpressure.py MeteredQueue._put and _get (count bytes queued)",
        breaks="the byte bound of the slow-client cut would never trip (or never drain)",
        found=moved,
    )


def test_gevent_pywsgi_parses_request_headers_through_message_class() -> None:
    from gevent import pywsgi

    calls: list[tuple[Any, ...]] = []

    class Recording(pywsgi.WSGIHandler):
        def MessageClass(self, *args: Any) -> Any:
            calls.append(args)
            return super().MessageClass(*args)

    rfile = io.BytesIO(b"Host: example\r\nUpgrade: websocket\r\n\r\n")
    server = SimpleNamespace(application=None, environ={}, max_accept=1)
    handler = Recording(None, ("127.0.0.1", 1), server, rfile=rfile)
    handler.read_request("GET / HTTP/1.1\r\n")
    require(
        calls == [(rfile, 0)] and isinstance(handler.headers, pywsgi.OldMessage),
        "gevent's pywsgi WSGIHandler.read_request parses headers with self.MessageClass("
        "self.rfile, 0) into an OldMessage",
        by="webapp/worker.py SmallBufferWebSocketHandler.MessageClass and parse_request_headers",
        breaks="request headers would be parsed by the email package again (8% of a worker's "
        "CPU per connection), or not at all",
        found=calls,
    )
    require(
        "headers" in vars(pywsgi.WSGIHandler)
        and "rfile" in pywsgi.Input.__slots__
        and isinstance(pywsgi.OldMessage()._headers, list),
        "gevent's pywsgi has a class-level WSGIHandler.headers default, Input.rfile, and "
        "OldMessage._headers (a list)",
        by="webapp/worker.py SmallBufferWebSocketHandler.upgrade_connection and _plain_headers",
        breaks="upgraded connections: AttributeError after the headers are dropped, or the "
        "small reader not used by wsgi.input",
    )


def _gevent_monitor_class() -> type:
    """gevent's own PeriodicMonitoringThread (webapp/metrics.py may have swapped the name)."""
    from gevent import _monitor

    return next(
        c for c in _monitor.PeriodicMonitoringThread.__mro__ if c.__module__ == _monitor.__name__
    )


def test_gevent_monitor_reports_a_block_as_metrics_py_expects() -> None:
    from gevent import config, events
    from gevent._tracer import GreenletTracer

    monitor = _gevent_monitor_class()
    require(
        "_greenlet_tracer" in vars(monitor),
        "gevent's PeriodicMonitoringThread has _greenlet_tracer",
        by="webapp/metrics.py CountingMonitor.monitor_blocking",
        breaks="every blocked-loop check would raise in the monitor thread",
    )
    hub = gevent.get_hub()
    tracer = GreenletTracer()  # traces switches in this thread until killed

    def busy() -> Any:
        tracer.did_block_hub(hub)  # forgets the switch into this greenlet
        return tracer.did_block_hub(hub)  # no switch since: this greenlet blocked the loop

    try:
        running = greenlet.greenlet(busy)
        blocked = running.switch()
        idle = tracer.did_block_hub(hub)  # a switch (back here) happened since
    finally:
        tracer.kill()
    require(
        blocked == (True, running) and not idle,
        "gevent's GreenletTracer.did_block_hub(hub) returns (True, active greenlet) after a "
        "block, a false value otherwise",
        by="webapp/metrics.py CountingMonitor.monitor_blocking (did_block[1])",
        breaks="tidings_gevent_hub_blocked_total would miss blocks or fail",
        found=(blocked, idle),
    )
    require(
        isinstance(events.subscribers, list)
        and isinstance(config.print_blocking_reports, bool)
        and isinstance(config.max_blocking_time, float),
        "gevent.events.subscribers is a list; config has print_blocking_reports and "
        "max_blocking_time",
        by="webapp/metrics.py _subscribe_to_gevent and CountingMonitor",
        breaks="tidings_gevent_hub_blocked_total",
    )


def test_gevent_hub_starts_the_monitor_class_named_in_gevent_monitor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gevent import _monitor, config

    made: list[Any] = []

    class Fake:
        def __init__(self, hub: Any) -> None:
            made.append(hub)

        def install_monitor_memory_usage(self) -> None:
            pass

    monkeypatch.setattr(_monitor, "PeriodicMonitoringThread", Fake)
    monkeypatch.setattr(config, "monitor_thread", True)
    result: list[Any] = []

    def in_a_new_hub() -> None:
        hub = gevent.get_hub()
        try:
            result.append(hub.start_periodic_monitoring_thread())
        finally:
            hub.periodic_monitoring_thread = None
            hub.destroy(destroy_loop=True)

    thread = threading.Thread(target=in_a_new_hub)
    thread.start()
    thread.join(10)
    require(
        len(made) == 1 and isinstance(result[0], Fake),
        "gevent's Hub.start_periodic_monitoring_thread builds gevent._monitor."
        "PeriodicMonitoringThread, looked up when called, and keeps it as "
        "hub.periodic_monitoring_thread",
        by="webapp/metrics.py _count_blocks_without_reports (swaps that name)",
        breaks="gevent would build a full greenlet report per blocked loop again, itself "
        "blocking a busy worker",
        found=result,
    )


# -- redis-py --------------------------------------------------------------------------------


def test_redis_pool_connection_socket_is_the_raw_wire(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url(0), socket_timeout=3.0)
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        sock = getattr(connection, "_sock", None)
        require(
            isinstance(sock, socket.socket) and sock.gettimeout() == 3.0,
            "a redis-py pool connection, once handed out, is connected, its socket in _sock "
            "with the socket_timeout set",
            by="tidings/pubsub.py PubSubConnection (reads _sock directly); "
            "tidings/connection.py _drop_connections",
            breaks="the web tier's message queue and the listener's pub/sub reader; Sentinel "
            "failover of in-use connections",
            found=sock,
        )
        connection.send_packed_command(
            connection.pack_commands([("ECHO", "one"), ("ECHO", "two")]), check_health=False
        )
        expected = b"$3\r\none\r\n$3\r\ntwo\r\n"
        wire = _read_exactly(sock, len(expected))
        require(
            wire == expected,
            "redis-py sends pack_commands output as it is and reads nothing ahead of the caller",
            by="tidings/pubsub.py PubSubConnection.send and read",
            breaks="replies would be lost to redis-py's own parser",
            found=wire,
        )
        connection.send_packed_command(connection.pack_command("ECHO", "three"))
        require(
            connection.read_response() == b"three" and not connection.can_read(timeout=0),
            "redis-py Connection.pack_command, read_response and can_read(timeout=0)",
            by="tidings/forwarder.py Forwarder._run, wait and _checked_out",
            breaks="every forward of the listener",
        )
    finally:
        pool.release(connection)
        client.close()


class _Gate:
    """A TCP proxy to Redis that can hold back what Redis sends to its latest connection."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.latest: socket.socket | None = None
        self.gated: socket.socket | None = None
        self.allowed = 0
        self.held = b""
        self.lock = threading.Lock()
        self.cut = threading.Event()  # set once the allowed bytes are sent and more are held
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def hold_after(self, allowed: int) -> None:
        """Forward only `allowed` more bytes to the latest connection; hold the rest."""
        with self.lock:
            self.gated, self.allowed = self.latest, allowed

    def release(self) -> None:
        with self.lock:
            gated, data, self.gated, self.held = self.gated, self.held, None, b""
        if gated is not None:
            with contextlib.suppress(OSError):  # redis-py closed it: what it held is gone
                gated.sendall(data)

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.listener.close()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ, None)
        peers: dict[socket.socket, socket.socket] = {}
        while self.running:
            for key, _ in selector.select(0.02):
                if key.data is None:
                    client, _ = self.listener.accept()
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    upstream = socket.create_connection(self.target)
                    peers[client], peers[upstream] = upstream, client
                    selector.register(client, selectors.EVENT_READ, "up")
                    selector.register(upstream, selectors.EVENT_READ, "down")
                    self.latest = client
                    continue
                self._pump(key.fileobj, key.data, peers, selector)  # type: ignore[arg-type]
        for sock in peers:
            sock.close()

    def _pump(self, sock: socket.socket, direction: str, peers: dict, selector: Any) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        peer = peers[sock]
        if not data:
            for end in (sock, peer):
                selector.unregister(end)
                end.close()
            return
        gated = False
        if direction == "down":
            with self.lock:
                if peer is self.gated:
                    self.held += data
                    data, self.held = self.held[: self.allowed], self.held[self.allowed :]
                    self.allowed -= len(data)
                    gated = bool(self.held)
        with contextlib.suppress(OSError):
            peer.sendall(data)
        if gated:
            self.cut.set()


def _parsers() -> list[Any]:
    from redis.connection import DefaultParser

    python_parser = getattr(importlib.import_module("redis._parsers"), "_RESP2Parser", None)
    return [p for p in {DefaultParser, python_parser} if p is not None]


@pytest.mark.parametrize("parser_class", _parsers(), ids=lambda p: p.__name__)
def test_redis_get_message_timeout_0_still_drops_a_partly_received_message(
    redis_server: RedisServer, parser_class: type
) -> None:
    """Context, not a requirement: this passes whether or not redis-py still does it.

    Why tidings/pubsub.py reads its socket itself: with part of a message
    received, redis-py's get_message(timeout=0) reads the rest with a zero
    socket timeout, fails, and its retry reconnects, dropping the message.
    """
    gate = _Gate(redis_server.port)
    subscriber = redis.Redis(
        connection_pool=redis.ConnectionPool(port=gate.port, parser_class=parser_class)
    )
    publisher = redis_server.client()
    pubsub = subscriber.pubsub()
    try:
        pubsub.subscribe("third-party-check")
        confirmed = pubsub.get_message(timeout=5)
        assert confirmed and confirmed["type"] == "subscribe", confirmed
        gate.hold_after(20)  # of a ~150-byte message
        publisher.publish("third-party-check", "x" * 100)
        assert gate.cut.wait(5), "the proxy never received the message"
        # The first bytes are readable by the subscriber before it asks.
        assert select.select([pubsub.connection._sock], [], [], 5)[0], "nothing arrived"
        with contextlib.suppress(redis.RedisError):  # raising is also a way of losing it
            pubsub.get_message(timeout=0)
        gate.release()
        messages = []
        deadline = time.monotonic() + 0.5  # loopback: the rest arrives in microseconds
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
            if message and message["type"] == "message":
                messages.append(message)
        if messages:
            pytest.skip(
                f"redis-py {redis.__version__} ({parser_class.__name__}) no longer drops a "
                "partly received message on get_message(timeout=0): tidings/pubsub.py's "
                "reason to exist (its docstring) may be gone"
            )
    finally:
        pubsub.close()
        subscriber.close()
        publisher.close()
        gate.close()


def test_redis_sentinel_pool_internals_that_failover_handling_uses(
    redis_server: RedisServer,
) -> None:
    from redis.sentinel import Sentinel, SentinelConnectionPool

    from tidings.connection import _drop_connections

    address = ("127.0.0.1", redis_server.port)

    class Fixed(Sentinel):
        def discover_master(self, service_name: str) -> tuple[str, int]:
            return address

    manager = Fixed([("127.0.0.1", 1)], sentinel_kwargs={"socket_timeout": 0.5})
    require(
        manager.sentinels[0].connection_pool.connection_kwargs["host"] == "127.0.0.1"
        and manager.sentinels[0].connection_pool.connection_kwargs["port"] == 1
        and manager.sentinel_kwargs["socket_timeout"] == 0.5,
        "redis-py Sentinel keeps .sentinels (clients whose pool has connection_kwargs host and "
        "port) and .sentinel_kwargs",
        by="tidings/connection.py follow_master (a master_for client built elsewhere)",
        breaks="python-socketio's own Sentinel clients would not follow failovers",
    )
    client = manager.master_for("svc", socket_timeout=2)
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        require(
            isinstance(pool, SentinelConnectionPool)
            and pool.is_master
            and pool.service_name == "svc"
            and pool.sentinel_manager is manager
            and pool.master_address == address,
            "redis-py SentinelConnectionPool has is_master, service_name, sentinel_manager and "
            "master_address (the address it connects to, found by discover_master)",
            by="tidings/connection.py follow_master and _check",
            breaks="Sentinel failover: clients would stay on a demoted master",
            found={"pool": pool, "master_address": getattr(pool, "master_address", None)},
        )
        with pool._lock:
            in_use = list(pool._in_use_connections)
        require(
            in_use == [connection],
            "redis-py's pool keeps checked-out connections in _in_use_connections under _lock",
            by="tidings/connection.py _drop_connections",
            breaks="Sentinel failover: connections in use (pub/sub readers, the listener) "
            "would stay on the demoted master for good",
            found=in_use,
        )
        _drop_connections(pool)
        try:
            connection.send_command("PING")
            dropped = connection.read_response() != b"PONG"
        except (redis.ConnectionError, OSError):
            dropped = True
        require(
            dropped,
            "shutting down an in-use connection's _sock makes its owner's next command fail",
            by="tidings/connection.py _drop_connections",
            breaks="Sentinel failover of connections in use",
        )
    finally:
        pool.release(connection)
        client.close()


# -- hiredis ---------------------------------------------------------------------------------


def test_hiredis_reader_feeds_slices_and_returns_errors() -> None:
    import hiredis
    from redis.exceptions import InvalidResponse, ResponseError

    reader = hiredis.Reader(replyError=ResponseError, protocolError=InvalidResponse)
    buffer = bytearray(b"....*2\r\n$1\r\na\r\n$1\r\nb\r\n-ERR no\r\n")
    reader.feed(buffer, 4, 10)
    partial = reader.gets()
    reader.feed(buffer, 14, len(buffer) - 14)
    replies = [reader.gets(), reader.gets()]
    require(
        partial is False
        and replies[0] == [b"a", b"b"]
        and isinstance(replies[1], ResponseError)
        and reader.gets() is False,
        "hiredis.Reader(replyError=, protocolError=).feed(buffer, offset, length); gets() is "
        "False until a reply is whole and returns (not raises) errors",
        by="tidings/pubsub.py _reader, PubSubConnection.read and _drain (and RespReader, "
        "which copies that interface)",
        breaks="the message queue reader: replies lost, or an error reply kills the loop",
        found=(partial, replies),
    )


def test_hiredis_pack_command_packs_as_redis_py_does(redis_server: RedisServer) -> None:
    import hiredis

    command = ("EVALSHA", "ab" * 20, 3, "k1", b"\x00bytes", "é", 1.5, -7)
    connection = redis_server.client().connection_pool.make_connection()
    ours = hiredis.pack_command(command)
    theirs = b"".join(connection.pack_command(*command))
    require(
        ours == theirs,
        "hiredis.pack_command(tuple) packs str, bytes, int and float as redis-py's "
        "Connection.pack_command does",
        by="tidings/forwarder.py Forwarder._run and wait ([_hiredis_pack(command)])",
        breaks="every forward of the listener",
        found=(ours, theirs),
    )


# -- prometheus_client -------------------------------------------------------------------------


def test_prometheus_multiprocess_histogram_child_buckets_and_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import CollectorRegistry, Histogram, values
    from prometheus_client.multiprocess import MultiProcessCollector

    from tidings import metrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    bounds = metrics.LATENCY_BUCKETS
    direct = Histogram("tp_direct", "-", ["path"], buckets=bounds, registry=None)
    observed = Histogram("tp_observed", "-", ["path"], buckets=bounds, registry=None)
    child = direct.labels("ingest")
    buckets, total = getattr(child, "_buckets", None), getattr(child, "_sum", None)
    require(
        isinstance(buckets, list)
        and len(buckets) == len(bounds) + 1
        and all(hasattr(b, "inc") for b in buckets)
        and hasattr(total, "inc"),
        "a prometheus_client Histogram child has _buckets (one value per bound and +Inf, "
        "with inc) and _sum (with inc), in multiprocess mode too",
        by="tidings/metrics.py _observe_counts (else falls back to one observe() per "
        "publication: several file writes each)",
        breaks="the web tier's CPU per routed message (silently)",
        found={"_buckets": buckets, "_sum": total},
    )
    monkeypatch.setattr(metrics, "PUBLISH_TO_SEND", direct)
    latencies_ms = [0, 1, 2, 3, 40, 250, 60_000]
    metrics.observe_latencies("ingest", [1_000_000 - ms for ms in latencies_ms], 1_000_000)
    for ms in latencies_ms:
        observed.labels("ingest").observe(ms / 1000)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    samples: dict[str, dict[tuple, float]] = {"tp_direct": {}, "tp_observed": {}}
    for family in registry.collect():
        for sample in family.samples:
            if family.name in samples:
                key = (sample.name.rsplit("_", 1)[-1], sample.labels.get("le"))
                samples[family.name][key] = sample.value
    require(
        samples["tp_direct"] == samples["tp_observed"] and samples["tp_direct"],
        "incrementing a multiprocess Histogram child's _buckets[i] (non-cumulative) and _sum "
        "exposes what observe() would",
        by="tidings/metrics.py _observe_counts",
        breaks="tidings_publish_to_send_seconds would be wrong in /metrics",
        found=samples,
    )


# -- gunicorn (and gunicorn.conf.py's hiding of hiredis) -------------------------------------

_CONF_PROBE = """
import json, runpy, sys, types
namespace = runpy.run_path(sys.argv[1])
import redis.connection
import tidings.pubsub
from gunicorn.config import Config

cfg = Config()
unknown, refused = [], {}
for name, value in namespace.items():
    if name.startswith("_") or isinstance(value, types.ModuleType):
        continue
    if callable(value) and getattr(value, "__module__", None) != "<run_path>":
        continue  # imported, not a setting
    if name not in cfg.settings:
        unknown.append(name)
        continue
    try:
        cfg.set(name, value)
    except Exception as exc:
        refused[name] = repr(exc)
print(json.dumps({
    "unknown": unknown,
    "refused": refused,
    "parser": redis.connection.DefaultParser.__name__,
    "pubsub_hiredis": getattr(tidings.pubsub.hiredis, "__name__", None),
    "worker_class_str": cfg.worker_class_str,
    "doctor_reads": [hasattr(cfg, n) for n in ("workers", "worker_connections",
                     "preload_app", "backlog", "bind")] + [callable(cfg.parser)],
}))
"""


@pytest.fixture(scope="module")
def gunicorn_conf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What a fresh process that reads gunicorn.conf.py, as gunicorn's master does, ends up with."""
    probe = tmp_path_factory.mktemp("probe") / "probe.py"
    probe.write_text(_CONF_PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIDINGS_", "GUNICORN_"))}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, str(probe), str(ROOT / "gunicorn.conf.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_gunicorn_knows_every_setting_and_hook_of_gunicorn_conf_py(
    gunicorn_conf: dict[str, Any],
) -> None:
    require(
        not gunicorn_conf["unknown"] and not gunicorn_conf["refused"],
        "every setting and hook gunicorn.conf.py defines is a gunicorn setting that accepts it "
        "(gunicorn ignores unknown names in a config file without a word)",
        by="gunicorn.conf.py (control_socket_disable, backlog, worker_connections, hooks...)",
        breaks="that setting silently not applied (e.g. the control socket taken over, the "
        "accept queue too short for a reconnect storm)",
        found={"unknown": gunicorn_conf["unknown"], "refused": gunicorn_conf["refused"]},
    )
    require(
        gunicorn_conf["worker_class_str"] == "webapp.worker.GeventWebSocketWorker"
        and all(gunicorn_conf["doctor_reads"]),
        "gunicorn's Config has worker_class_str, workers, worker_connections, preload_app, "
        "backlog, bind and parser()",
        by="webapp/doctor.py load_gunicorn_config and check_gunicorn",
        breaks="`flask --app webapp doctor`'s gunicorn check",
        found=gunicorn_conf,
    )


def test_hiding_hiredis_makes_redis_py_parse_in_python_and_pubsub_keep_hiredis(
    gunicorn_conf: dict[str, Any],
) -> None:
    require(
        gunicorn_conf["parser"] == "_RESP2Parser" and gunicorn_conf["pubsub_hiredis"] == "hiredis",
        "with sys.modules['hiredis'] = None before redis-py is imported, redis-py picks its "
        "pure-Python parser; tidings.pubsub finds hiredis as _tidings_hiredis",
        by="gunicorn.conf.py (hides hiredis in the master); tidings/pubsub.py",
        breaks="web workers would poll() through the gevent hub per pool checkout (CPU), or "
        "the queue reader would lose hiredis (3x slower per message)",
        found={k: gunicorn_conf[k] for k in ("parser", "pubsub_hiredis")},
    )


# -- Python's standard library (the interpreter, not requirements.lock) ------------------------


def test_http_client_read_headers_returns_raw_lines_and_message_keeps_headers_raw() -> None:
    import email.message
    from http import client

    reader = getattr(client, "_read_headers", None)
    lines = reader(io.BytesIO(b"Host: a\r\nX-Long: b\r\n\r\nbody")) if reader else None
    require(
        lines == [b"Host: a\r\n", b"X-Long: b\r\n", b"\r\n"],
        "http.client._read_headers(fp) returns the header lines as read, the blank line last",
        by="webapp/worker.py parse_request_headers",
        breaks="every request's headers in the web tier (TypeError or wrong parse)",
        found=lines,
    )
    with pytest.raises(client.LineTooLong):
        client._read_headers(io.BytesIO(b"A: " + b"x" * 70_000 + b"\r\n\r\n"))  # type: ignore[attr-defined]
    message = email.message.Message()
    message.set_raw("Name", "value ")
    require(
        message._headers == [("Name", "value ")],
        "email.message.Message keeps raw (name, value) pairs in _headers, as set_raw adds them",
        by="webapp/worker.py _plain_headers (appends to _headers directly)",
        breaks="headers parsed without the email package would not be found",
        found=message._headers,
    )


# -- the Python client: python-engineio's client and websocket-client --------------------------


def test_engineio_client_hands_messages_to_trigger_event_with_run_async() -> None:
    from tidings.client import _InOrderClient, _InOrderEngineIO

    client = _InOrderClient()
    require(
        type(client.eio) is _InOrderEngineIO and hasattr(client.eio, "ws"),
        "python-socketio Client builds its engine.io client from _engineio_client_class(), "
        "which keeps the websocket as .ws",
        by="tidings/client.py _InOrderClient; TidingsClient._break_transport (eio.ws.sock)",
        breaks="publications handled out of order (and dropped as duplicates)",
        found=type(client.eio),
    )
    calls: list[tuple[Any, ...]] = []
    eio = engineio.Client()
    eio._trigger_event = lambda event, *args, **kwargs: calls.append((event, args, kwargs))
    eio._receive_packet(eio_packet.Packet(eio_packet.MESSAGE, "x"))
    require(
        calls == [("message", ("x",), {"run_async": True})],
        "python-engineio's client triggers 'message' through _trigger_event(..., run_async=True)",
        by="tidings/client.py _InOrderEngineIO._trigger_event (sets run_async=False)",
        breaks="publications handled on a thread each, out of order (and dropped)",
        found=calls,
    )
    import websocket

    parameters = inspect.signature(websocket.WebSocket.__init__).parameters
    require(
        "skip_utf8_validation" in parameters
        and "websocket_extra_options" in inspect.signature(engineio.Client.__init__).parameters
        and hasattr(websocket.WebSocket(), "sock"),
        "engineio.Client(websocket_extra_options=) reaches websocket-client's "
        "WebSocket(skip_utf8_validation=), which keeps its socket as .sock",
        by="tidings/client.py TidingsClient.__init__ and _break_transport",
        breaks="the Python client's CPU per delivery (20x) and its half-open-path recovery",
    )


# -- the SSE client: requests and urllib3 ------------------------------------------------------


def test_a_streamed_response_reads_chunks_as_they_come_and_its_socket_can_be_shut_down() -> None:
    import requests

    server = ChunkedServer([b"data: 1\n\n"], hang_up=False)
    try:
        response = requests.get(server.url, stream=True, timeout=(5, 5))
        first = response.raw.read1(65536)
        require(
            first == b"data: 1\n\n",
            "a requests response opened with stream=True hands over each chunk through "
            ".raw.read1() as it arrives (not once 64 KB came)",
            by="tidings/client_sse.py _Stream.events",
            breaks="SSE publications held back until the stream ends or the read times out",
            found=first,
        )
        sock = getattr(getattr(response.raw, "connection", None), "sock", None)
        require(
            isinstance(sock, socket.socket),
            "a streamed response keeps its urllib3 connection as .raw.connection, and the "
            "connection its socket as .sock",
            by="tidings/client_sse.py _Stream.cut",
            breaks="subscribe/unsubscribe and disconnect() cannot end the read of the old stream",
            found=sock,
        )
        sock.shutdown(socket.SHUT_RDWR)
        try:
            after = response.raw.read1(65536)
        except Exception as exc:  # any error ends the read, as an EOF does
            after = exc
        require(
            not after or isinstance(after, Exception),
            "after shutdown() of its socket, a blocked or next read1() ends (EOF or an error)",
            by="tidings/client_sse.py _Stream.cut",
            breaks="the read thread stays on a stream it was told to leave",
            found=after,
        )
        response.close()
    finally:
        server.close()
