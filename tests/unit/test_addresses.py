"""Client addresses behind proxies: which X-Forwarded-For is believed; what the web tier counts."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

import pytest
import redis
from flask import Flask
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from tidings import metrics, stats
from tidings.addresses import UNKNOWN, parse_address, parse_networks, resolve
from tidings.settings import Settings
from webapp import create_app
from webapp.doctor import check_proxies
from webapp.extensions import socketio

DEFAULT = parse_networks("127.0.0.1,::1")
# nginx on 10.0.0.2, a load balancer network in front of it, an IPv6 proxy.
CHAIN = parse_networks("10.0.0.2, 192.168.0.0/16, 2001:db8:f::/48")


def client(peer: str | None, header: str | None, trusted=CHAIN) -> str:
    return resolve(peer, header, trusted).address


# -- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("  203.0.113.7 ", "203.0.113.7"),
        ("203.0.113.7:5678", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # what a dual-stack bind reports
        ("::1", "::1"),
    ],
)
def test_addresses_parse_with_ports_brackets_and_mapped_ipv4(text: str, expected: str) -> None:
    assert str(parse_address(text)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unknown",
        "_hidden",
        "example.com",
        "203.0.113",
        "203.0.113.7.1",
        "203.0.113.256",
        "203.0.113.7:",
        "203.0.113.7:port",
        "203.0.113.7:123456",
        "[2001:db8::1",
        "[2001:db8::1]x",
        "[2001:db8::1]:",
        "2001:db8::g",
        "1.2.3.4/24",
        "\u0661.2.3.4",  # an Arabic-Indic digit
        "\x00",
    ],
)
def test_anything_else_is_not_an_address(text: str) -> None:
    assert parse_address(text) is None


def test_trusted_networks_take_addresses_cidrs_spaces_brackets_and_mapped_ipv4() -> None:
    networks = parse_networks(
        " 10.0.0.2 ,192.168.0.0/16,, [::1], 2001:db8::/32,::ffff:10.9.0.0/112"
    )
    assert [str(n) for n in networks] == [
        "10.0.0.2/32",
        "192.168.0.0/16",
        "::1/128",
        "2001:db8::/32",
        "10.9.0.0/16",  # compared with IPv4 peers as IPv4
    ]
    assert parse_networks("") == ()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("10.0.0.1/8", "has host bits set (did you mean 10.0.0.0/8?)"),
        ("nginx.internal", "not an IP address or CIDR: 'nginx.internal'"),
        ("10.0.0.0/33", "not an IP address or CIDR"),
        ("*", "not an IP address or CIDR"),
    ],
)
def test_a_bad_trusted_entry_says_what_is_wrong(raw: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_networks("127.0.0.1," + raw)
    assert message in str(caught.value)


# -- resolving ----------------------------------------------------------------------------


def test_an_untrusted_peer_is_the_client_whatever_its_header_says() -> None:
    assert resolve("203.0.113.7", "1.2.3.4", CHAIN) == ("203.0.113.7", True)
    assert resolve("203.0.113.7", None, CHAIN) == ("203.0.113.7", False)
    assert resolve("203.0.113.7", "", CHAIN) == ("203.0.113.7", False)
    # The default trusts loopback's 127.0.0.1 only, not the rest of 127.0.0.0/8.
    assert resolve("127.0.9.9", "1.2.3.4", DEFAULT) == ("127.0.9.9", True)
    assert resolve("10.0.0.2", "1.2.3.4", ()) == ("10.0.0.2", True)  # empty: trust nobody


def test_a_trusted_peer_names_the_first_untrusted_address_from_the_right() -> None:
    assert resolve("10.0.0.2", "203.0.113.7", CHAIN) == ("203.0.113.7", False)
    # Spoofed entries left of the address nginx appended are never reached.
    assert client("10.0.0.2", "6.6.6.6, 203.0.113.7") == "203.0.113.7"
    # Trusted hops (a load balancer, then nginx) are skipped.
    assert client("10.0.0.2", "6.6.6.6, 203.0.113.7, 192.168.4.4, 10.0.0.2") == "203.0.113.7"
    assert client("::1", "2001:db8::7", DEFAULT) == "2001:db8::7"
    assert client("2001:db8:f::9", "[2001:db8:1::7]:5000, 2001:db8:f::1") == "2001:db8:1::7"
    assert client("::ffff:10.0.0.2", "203.0.113.7") == "203.0.113.7"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client() -> None:
    assert client("10.0.0.2", "192.168.0.9, 10.0.0.2") == "192.168.0.9"
    assert client("127.0.0.1", "127.0.0.1", DEFAULT) == "127.0.0.1"


def test_several_headers_joined_and_spaces_are_one_list() -> None:
    # The WSGI server joins repeated headers with ","; nginx with ", ".
    assert client("10.0.0.2", "6.6.6.6,203.0.113.7 ,  192.168.1.1") == "203.0.113.7"
    assert client("10.0.0.2", "6.6.6.6 , ,203.0.113.7,") == "203.0.113.7"  # blanks skipped
    assert client("10.0.0.2", " , ") == "10.0.0.2"


def test_junk_ends_the_walk_at_the_last_address_a_trusted_proxy_vouched_for() -> None:
    # Junk right of the client: the client cannot hide behind it...
    assert client("10.0.0.2", "6.6.6.6, unknown, 192.168.0.9") == "192.168.0.9"
    assert client("10.0.0.2", "6.6.6.6, unknown") == "10.0.0.2"
    assert client("10.0.0.2", "not-an-address-" + "x" * 5000) == "10.0.0.2"
    # ...nor pick an address with it: junk left of an untrusted address is never read.
    assert client("10.0.0.2", "junk, 203.0.113.7") == "203.0.113.7"


def test_a_peer_without_an_address_keeps_what_the_server_said() -> None:
    assert resolve(None, None, DEFAULT) == (UNKNOWN, False)
    assert resolve("", "1.2.3.4", DEFAULT) == (UNKNOWN, True)
    assert resolve("/run/tidings.sock", None, DEFAULT) == ("/run/tidings.sock", False)


entries = st.one_of(
    st.ip_addresses().map(str),
    st.text(max_size=20),
    st.sampled_from(["unknown", "", " ", "[::1]:80", "10.0.0.2", "192.168.3.3"]),
)


@given(
    spoofed=st.lists(entries, max_size=5),
    real=st.ip_addresses(),
    proxies=st.lists(st.sampled_from(["10.0.0.2", "192.168.7.7", "2001:db8:f::1"]), max_size=3),
)
def test_a_client_cannot_choose_its_address(spoofed: list[str], real, proxies: list[str]) -> None:
    """Whatever a client puts in the header, it is counted under the address nginx saw."""
    real = parse_address(str(real))
    if any(real in network for network in CHAIN):
        return  # a trusted address is not a client here
    # The client's own header, then what each trusted proxy appended.
    header = ",".join([*spoofed, str(real), *proxies[1:]])
    peer = proxies[0] if proxies else "10.0.0.2"
    assert client(peer, header) == str(real)


# -- the web tier --------------------------------------------------------------------


@pytest.fixture
def make_app(redis_client: redis.Redis, redis_server) -> Callable[..., Flask]:
    def make(**env: str) -> Flask:
        settings = Settings.from_env({"TIDINGS_REDIS_URL": redis_server.url(0), **env})
        return create_app({"SETTINGS": settings, "QUEUE": False})

    return make


def connect_from(app: Flask, peer: str, forwarded_for: str | None = None):
    http = app.test_client()
    http.environ_base["REMOTE_ADDR"] = peer
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for is not None else None
    return socketio.test_client(app, headers=headers, flask_test_client=http)


def ignored_total() -> float:
    return REGISTRY.get_sample_value("tidings_untrusted_forwarded_total") or 0.0


def test_the_cap_counts_whom_a_trusted_proxy_names(make_app) -> None:
    app = make_app(TIDINGS_MAX_CONNECTIONS_PER_IP="2", TIDINGS_TRUSTED_PROXIES="10.0.0.2")
    per_ip = app.extensions["tidings.realtime"].connections.per_ip
    clients = [connect_from(app, "10.0.0.2", f"6.6.6.{i}, 203.0.113.{i % 2}") for i in range(4)]
    assert [c.is_connected() for c in clients] == [True] * 4
    assert dict(per_ip) == {"203.0.113.0": 2, "203.0.113.1": 2}
    assert not connect_from(app, "10.0.0.2", "203.0.113.1").is_connected()
    clients[1].disconnect()
    assert connect_from(app, "10.0.0.2", "203.0.113.1").is_connected()


def test_a_header_from_an_untrusted_peer_is_ignored_and_counted(make_app) -> None:
    app = make_app(TIDINGS_MAX_CONNECTIONS_PER_IP="2")
    per_ip = app.extensions["tidings.realtime"].connections.per_ip
    before = ignored_total()
    metrics.untrusted_peers.clear()
    spoofers = [connect_from(app, "10.0.0.9", f"203.0.113.{i}") for i in range(3)]
    assert [c.is_connected() for c in spoofers] == [True, True, False]
    assert dict(per_ip) == {"10.0.0.9": 2}
    assert ignored_total() - before == 3
    assert list(metrics.untrusted_peers) == ["10.0.0.9"]
    # From the default trusted 127.0.0.1 it is believed, and nothing is counted.
    assert connect_from(app, "127.0.0.1", "203.0.113.5").is_connected()
    assert per_ip["203.0.113.5"] == 1 and ignored_total() - before == 3


def test_remembered_peers_are_few_and_the_newest() -> None:
    metrics.untrusted_peers.clear()
    for i in range(metrics.RECENT_UNTRUSTED_PEERS + 3):
        metrics.untrusted_forwarded(f"10.1.0.{i}")
    metrics.untrusted_forwarded("10.1.0.5")  # seen again: now the newest
    peers = list(metrics.untrusted_peers)
    assert len(peers) == metrics.RECENT_UNTRUSTED_PEERS and peers[-1] == "10.1.0.5"
    assert "10.1.0.0" not in peers
    metrics.untrusted_peers.clear()


def test_the_doctor_names_ignoring_peers_and_the_variable(redis_client: redis.Redis) -> None:
    settings = Settings.from_env({})
    assert check_proxies(redis_client, settings).status == "skip"  # no web worker reports
    stats.write_web(redis_client, "h:1", {"clients": 3, "untrusted_forwarded": 0})
    assert check_proxies(redis_client, settings).status == "ok"
    now = int(time.time() * 1000)
    seen = json.dumps({"10.0.0.5": now - 3000, "10.0.0.6": now})
    stats.write_web(redis_client, "h:2", {"untrusted_forwarded": 7, "untrusted_peers": seen})
    stats.write_web(redis_client, "h:3", {"untrusted_forwarded": "x", "untrusted_peers": "{"})
    found = check_proxies(redis_client, settings)
    assert found.status == "warn" and found.details["ignored"] == 7
    assert found.details["peers"] == ["10.0.0.5", "10.0.0.6"]
    # Newest first, each with when it was last seen.
    assert re.search(r"10\.0\.0\.6 \(last [\d.]+ s ago\), 10\.0\.0\.5 \(last 3", found.summary)
    assert "TIDINGS_TRUSTED_PROXIES (here: 127.0.0.1, ::1)" in found.summary
