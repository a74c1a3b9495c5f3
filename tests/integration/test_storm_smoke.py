"""The reconnect-storm benchmark runs end to end at a tiny size (`bench.storm`, `--quick`).

A smoke test of bench/storm.py, not a benchmark: it asserts that every
client, of each kind, was cut by the kill, came back on a jittered backoff
and resubscribed, and that every durable publication reached every client
exactly once, in order; never how fast. Needs Node.js (bench/peers/).
"""

from __future__ import annotations

import pytest

from bench.storm import QUICK, SHARED, Sizes, run, summary

pytestmark = pytest.mark.integration


def test_a_tiny_storm_brings_every_client_back_with_nothing_lost(node: None) -> None:
    storm = run(Sizes(**vars(QUICK)), log=lambda line: None)
    results = storm.results
    assert len(results) == QUICK.clients
    assert {r.kind for r in results} == {"socket.io-client", "leanio", "python"}
    assert storm.all_back_s is not None and storm.forked_s is not None
    for r in results:
        assert r.disconnected_ms is not None and r.disconnected_ms >= storm.kill_ms, r
        assert r.back_ms is not None and r.back_ms > r.disconnected_ms, r
        assert r.attempts, r
        assert (r.lost, r.twice, r.out_of_order, r.gaps, r.unexpected) == (0, 0, 0, 0, 0), r
        assert r.refused is None, r
    # Publications went out all along, and each client got all of its topics'.
    assert storm.published[SHARED] > QUICK.shared_rate * QUICK.warmup
    own = sum(n for topic, n in storm.published.items() if topic != SHARED)
    assert sum(r.delivered for r in results) == len(results) * storm.published[SHARED] + own
    # Each kind's first attempts are spread out, not one instant for all.
    for kind in ("socket.io-client", "leanio", "python"):
        first = [r.attempts[0] - r.disconnected_ms for r in results if r.kind == kind]
        assert max(first) - min(first) > 50, (kind, first)
    lines, result = summary(storm)
    assert "lost 0, twice 0" in result
    assert any("first attempt after the disconnect" in line for line in lines)
