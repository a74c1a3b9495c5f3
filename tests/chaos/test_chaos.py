"""No durable publication lost, none twice, through every fault at once (fixed schedule);
then a fast-path burst, with everything up again, reaches every client whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import Chaos, fixed_schedule, start_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_durable_publications_survive_the_fault_schedule(tmp_path: Path) -> None:
    stack, server = start_stack(tmp_path)
    chaos = Chaos(stack, clients=20, publications=6000, rate=220)
    try:
        chaos.connect()
        report = chaos.run(fixed_schedule(chaos))
        print("\n[chaos] " + "\n[chaos] ".join(report.lines()))
        assert len(report.faults) == 6, report.faults
        assert report.lost == 0
        assert report.duplicated == 0
        assert report.out_of_order == 0
        assert report.delivered == report.published
        assert report.published >= 6000 * 2 * 20 // 4  # each client holds two of four topics
        assert report.burst_sent > 0 and report.burst_lost == 0
        assert report.burst_duplicated == 0
    finally:
        chaos.close()
        stack.stop()
        server.stop()
