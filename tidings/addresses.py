"""Client addresses behind proxies: which `X-Forwarded-For` to believe (TIDINGS_TRUSTED_PROXIES).

gunicorn never rewrites `REMOTE_ADDR`: behind nginx it is nginx's address for
every client. The client's own address is read the usual safe way: only when
the socket peer is a trusted proxy, walk `X-Forwarded-For` from the right
(each proxy appends the address it was connected from), skipping trusted
hops; the first untrusted address is the client. If every hop is trusted,
the leftmost one is. A header from any other peer is ignored.

Malformed entries: blank entries (`a,,b`, an empty header joined to another)
are skipped; anything else that is not an IP address (`unknown`, a name,
`_obfuscated`, garbage) ends the walk, and the client is the last address
reached before it (a trusted hop, or the peer itself). Only addresses that
a trusted proxy appended are ever reached, so a client can neither pick its
address nor dodge a per-address limit with junk. A port (`1.2.3.4:5678`,
`[2001:db8::1]:443`) or brackets are dropped; an IPv4-mapped IPv6 address
(`::ffff:10.0.0.1`, what a dual-stack bind reports) counts as the IPv4 one.

No Flask, Celery or gevent here: settings parse the variable with it.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_TRUSTED_PROXIES = "127.0.0.1,::1"
# What limits and logs call a peer without a usable address (no REMOTE_ADDR).
UNKNOWN = "?"


def parse_network(text: str) -> Network:
    """Parse one address or CIDR of TIDINGS_TRUSTED_PROXIES; ValueError says what is wrong."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text!r} has host bits set (did you mean {loose}?)") from None
        raise ValueError(f"not an IP address or CIDR: {text!r}") from None
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            # Peers are compared as IPv4 (see parse_address): so are these.
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_networks(raw: str) -> tuple[Network, ...]:
    """Parse a comma-separated list of addresses and CIDRs (blank items skipped)."""
    return tuple(parse_network(item) for item in raw.split(",") if item.strip())


def describe(networks: tuple[Network, ...]) -> str:
    """Spell a trusted list for people: single hosts without their /32 or /128."""
    return (
        ", ".join(str(n.network_address) if n.num_addresses == 1 else str(n) for n in networks)
        or "none"
    )


def parse_address(text: str) -> IPAddress | None:
    """Parse one peer or `X-Forwarded-For` entry; None when it is not an IP address."""
    text = text.strip()
    if text.startswith("["):  # [v6] or [v6]:port
        text, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not _is_port(rest)):
            return None
    elif text.count(":") == 1:  # v4:port (a bare v6 has two colons or more)
        text, _, port = text.partition(":")
        if not _is_port(":" + port):
            return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    port = text[1:]
    return text.startswith(":") and port.isascii() and port.isdigit() and len(port) <= 5


def is_trusted(address: IPAddress, trusted: tuple[Network, ...]) -> bool:
    """Tell whether `address` is one of the trusted proxies."""
    # Comparing an IPv4 address with an IPv6 network is simply False.
    return any(address in network for network in trusted)


class Resolved(NamedTuple):
    """A request's client address, and whether it carried a header that was not believed."""

    address: str
    # X-Forwarded-For came from a peer outside TIDINGS_TRUSTED_PROXIES (so it was ignored).
    ignored_header: bool


def resolve(peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]) -> Resolved:
    """Return the client address limits and logs use: the peer, or whom trusted proxies name."""
    peer_address = parse_address(peer or "")
    if peer_address is None:
        return Resolved(peer or UNKNOWN, bool(forwarded_for))
    if not forwarded_for:
        return Resolved(str(peer_address), False)
    if not is_trusted(peer_address, trusted):
        return Resolved(str(peer_address), True)
    client = peer_address
    for entry in reversed(forwarded_for.split(",")):
        if not entry.strip():
            continue
        hop = parse_address(entry)
        if hop is None:
            break  # everything from here leftwards is unverifiable
        client = hop
        if not is_trusted(hop, trusted):
            break
    return Resolved(str(client), False)
