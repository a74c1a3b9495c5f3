"""The server API as `flask --app webapp` commands; each prints the API's JSON answer.

flask --app webapp topics [--pattern 'rooms.*']
flask --app webapp presence rooms.lobby [--stats]
flask --app webapp history rooms.lobby [--since 1700000000000-0] [--limit 100]
flask --app webapp disconnect alice [bob ...]
flask --app webapp unsubscribe alice rooms.lobby
flask --app webapp revoke --sub alice [--before UNIX_TIME] | --jti TOKEN_ID
flask --app webapp info
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click
import redis
from flask import Flask, current_app
from flask.cli import with_appcontext

from tidings import server_api
from tidings.server_api import ApiError


def _run(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call the API with the app's client and settings; print the answer as JSON."""
    try:
        answer = call(
            *args,
            client=current_app.extensions["tidings.redis"],
            settings=current_app.extensions["tidings.settings"],
            **kwargs,
        )
    except ApiError as exc:
        raise click.UsageError(f"{exc.error}: {exc.detail}") from None
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis unavailable: {exc}") from None
    click.echo(json.dumps(answer, indent=2))


@click.command("topics")
@click.option("--pattern", default=None, help="Only topics matching this glob.")
@with_appcontext
def topics_command(pattern: str | None) -> None:
    """List the topics with at least one subscriber, across nodes."""
    _run(lambda **c: {"topics": server_api.topics(pattern, **c)})


@click.command("presence")
@click.argument("topic")
@click.option("--stats", is_flag=True, help="Counts only (presence_stats).")
@with_appcontext
def presence_command(topic: str, stats: bool) -> None:
    """Show who is subscribed to a presence TOPIC."""
    _run(server_api.presence_stats if stats else server_api.presence, topic)


@click.command("history")
@click.argument("topic")
@click.option("--since", default=None, help="An offset: what came after it.")
@click.option("--limit", default=server_api.DEFAULT_HISTORY_LIMIT, show_default=True, type=int)
@with_appcontext
def history_command(topic: str, since: str | None, limit: int) -> None:
    """Print a TOPIC's history."""
    _run(server_api.history, topic, since, limit)


@click.command("disconnect")
@click.argument("subs", nargs=-1, required=True)
@with_appcontext
def disconnect_command(subs: tuple[str, ...]) -> None:
    """Close every connection of the users SUBS, on every node."""
    _run(server_api.disconnect, list(subs))


@click.command("unsubscribe")
@click.argument("sub")
@click.argument("topic")
@with_appcontext
def unsubscribe_command(sub: str, topic: str) -> None:
    """Unsubscribe the connections of user SUB from TOPIC, on every node."""
    _run(server_api.unsubscribe, [(sub, topic)])


@click.command("revoke")
@click.option("--sub", default=None, help="Revoke this user's tokens issued before --before.")
@click.option("--before", default=None, type=float, help="Unix time; default now.")
@click.option("--jti", default=None, help="Revoke the token with this id.")
@with_appcontext
def revoke_command(sub: str | None, before: float | None, jti: str | None) -> None:
    """Revoke tokens (by user and issue time, or by id) and close their connections."""
    if (sub is None) == (jti is None) or (jti is not None and before is not None):
        raise click.UsageError("give --sub (and maybe --before), or --jti")
    item: dict[str, Any] = {"jti": jti} if jti is not None else {"sub": sub}
    if before is not None:
        item["before"] = before
    _run(server_api.revoke, [item])


@click.command("info")
@with_appcontext
def info_command() -> None:
    """Show the live web nodes and the listener."""
    _run(server_api.info)


def init_app(app: Flask) -> None:
    """Register the server API's commands."""
    for command in (
        topics_command,
        presence_command,
        history_command,
        disconnect_command,
        unsubscribe_command,
        revoke_command,
        info_command,
    ):
        app.cli.add_command(command)
