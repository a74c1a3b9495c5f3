"""Per-address connection caps behind the shipped nginx: every client counts under its own address.

nginx runs deploy/nginx as shipped (one upstream node: this test's gunicorn).
Every websocket then reaches gunicorn from nginx's 127.0.0.1, a trusted proxy
by default (TIDINGS_TRUSTED_PROXIES), so the web tier counts each client under
the address nginx appends to X-Forwarded-For. Each client binds its socket to
an address of its own in 127.0.0.0/8 (all of it is this host) and only
connects (`BareConnect`): no thread per client, so hundreds stay cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import BareConnect, Nginx, Stack, nginx_binary

pytestmark = pytest.mark.integration

CAP = 100  # TIDINGS_MAX_CONNECTIONS_PER_IP's default, per web worker
CLIENTS = 300  # one address each: three times the cap nginx's own address used to get
UNTRUSTED_PEER = "127.0.9.9"  # loopback, but not in the default 127.0.0.1,::1


@pytest.fixture
def opened() -> Iterator[list[BareConnect]]:
    """Connections to close after the test, whatever happened."""
    connections: list[BareConnect] = []
    yield connections
    for connection in connections:
        connection.close()


@pytest.fixture
def node(make_stack: Callable[..., Stack]) -> Stack:
    """One gunicorn node with the default settings; connecting needs no listener."""
    stack = make_stack()
    stack.start_web()
    return stack


def spoofing(i: int) -> list[tuple[str, str]]:
    """X-Forwarded-For headers a client makes up: one, or two (which servers join)."""
    made_up = [("X-Forwarded-For", f"203.0.113.{i % 250}")]
    return made_up if i % 2 else [("X-Forwarded-For", "198.51.100.7"), *made_up]


def test_behind_nginx_each_client_address_has_its_own_cap(
    node: Stack, tmp_path: Path, opened: list[BareConnect]
) -> None:
    nginx_binary()
    nginx = Nginx(tmp_path / "nginx", [node.port])
    nginx.start()
    try:
        for i in range(CLIENTS):
            opened.append(BareConnect(nginx.port, f"127.10.{i // 200}.{i % 200 + 1}"))
        refused = [c.answer for c in opened if c.answer != "connected"]
        assert not refused, f"{len(refused)} of {CLIENTS} refused: {refused[:3]}"
        # One address still gets its cap, whatever it writes in X-Forwarded-For:
        # nginx appends the address it saw, and the walk from the right stops there.
        same = [BareConnect(nginx.port, "127.20.0.1", spoofing(i)) for i in range(CAP + 1)]
        opened.extend(same)
        assert [c.answer for c in same] == ["connected"] * CAP + ["limit"]
        assert node.web is not None
        assert f"refused a connection: 127.20.0.1 has {CAP} already" in node.web.log()
    finally:
        nginx.stop()


def test_a_header_sent_straight_to_gunicorn_by_an_untrusted_peer_changes_nothing(
    node: Stack, opened: list[BareConnect]
) -> None:
    for i in range(CAP + 1):
        opened.append(BareConnect(node.port, UNTRUSTED_PEER, spoofing(i)))
    assert [c.answer for c in opened] == ["connected"] * CAP + ["limit"]
    assert node.web is not None
    log = node.web.log()
    assert f"refused a connection: {UNTRUSTED_PEER} has {CAP} already" in log
    assert f"ignored X-Forwarded-For from {UNTRUSTED_PEER}" in log
    assert "TIDINGS_TRUSTED_PROXIES" in log
