"""The doctor's accept-queue rule: a reconnect storm must fit the listening socket's queue."""

from __future__ import annotations

from tidings.listenqueue import KernelLimits, ListeningSocket
from webapp.doctor import _bind_port, accept_queue_problems

DEBIAN = KernelLimits(somaxconn=4096, max_syn_backlog=2048, syncookies=1)


def problems(
    storm: int,
    backlog: int,
    limits: KernelLimits = DEBIAN,
    live: ListeningSocket | None = None,
    overflowed: int | None = 0,
) -> tuple[int, list[str]]:
    return accept_queue_problems(
        storm=storm, backlog=backlog, limits=limits, live=live, overflowed=overflowed
    )


def test_a_queue_that_holds_the_storm_is_fine() -> None:
    assert problems(4000, 10000) == (4096, [])
    assert problems(4096, 4096, live=ListeningSocket(queued=7, limit=4096)) == (4096, [])


def test_somaxconn_caps_the_backlog_and_the_fix_names_the_sysctl() -> None:
    length, found = problems(10000, 10000)
    assert length == 4096
    (line,) = found
    assert "accept queue 4096" in line and "< 10000 clients" in line
    assert "sysctl -w net.core.somaxconn=10000" in line
    assert "backlog" not in line.split(":", 1)[1]  # the backlog itself is large enough


def test_a_small_backlog_is_named() -> None:
    length, (line,) = problems(3000, 2048)
    assert length == 2048
    assert "set gunicorn's backlog to at least 3000" in line
    assert "somaxconn to" not in line


def test_a_socket_that_listens_with_an_older_queue_needs_a_restart() -> None:
    # somaxconn was raised after gunicorn started: the running queue is the old one.
    raised = KernelLimits(somaxconn=65535, max_syn_backlog=2048, syncookies=1)
    length, found = problems(10000, 10000, limits=raised, live=ListeningSocket(0, 4096))
    assert length == 4096
    assert "listens with an accept queue of 4096, the settings now give 10000" in found[0]
    assert found[1].endswith("restart gunicorn")


def test_the_syn_queue_matters_only_without_syncookies() -> None:
    no_cookies = KernelLimits(somaxconn=65535, max_syn_backlog=2048, syncookies=0)
    _, found = problems(5000, 10000, limits=no_cookies)
    assert len(found) == 1 and "tcp_max_syn_backlog 2048" in found[0] and "1536" in found[0]
    assert problems(1000, 10000, limits=no_cookies) == (10000, [])
    cookies = KernelLimits(somaxconn=65535, max_syn_backlog=128, syncookies=1)
    assert problems(5000, 10000, limits=cookies) == (10000, [])


def test_overflows_while_the_doctor_ran_are_reported() -> None:
    _, (line,) = problems(100, 10000, overflowed=12)
    assert "dropped 12 connection(s) at a full accept queue" in line
    assert problems(100, 10000, overflowed=None) == (4096, [])


def test_the_bind_port_is_the_first_tcp_one() -> None:
    assert _bind_port(["127.0.0.1:8000"]) == 8000
    assert _bind_port(["unix:/run/tidings.sock", "[::]:9000"]) == 9000
    assert _bind_port(["unix:/run/tidings.sock"]) is None
