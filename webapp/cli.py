"""Flask CLI commands: `flask --app webapp publish` and `flask --app webapp token`."""

from __future__ import annotations

import json

import click
import redis
from flask import Flask, current_app
from flask.cli import with_appcontext

from tidings.publishing import PublishError, PublishTimeout, publish
from webapp.grants import make_token


@click.command("publish")
@click.argument("topic")
@click.argument("data")
@click.option("--fast", is_flag=True, help="PUBLISH on tidings:topic:<topic> (at most once).")
@click.option("--wait", is_flag=True, help="Wait until forwarded; print the topic offset.")
@with_appcontext
def publish_command(topic: str, data: str, fast: bool, wait: bool) -> None:
    """Publish DATA (a JSON value) on TOPIC; durable through the ingest stream by default."""
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise click.BadParameter(
            f"not JSON ({exc}); quote strings: '\"text\"'", param_hint="DATA"
        ) from None
    try:
        result = publish(
            topic,
            value,
            durable=not fast,
            wait=wait,
            client=current_app.extensions["tidings.redis"],
            settings=current_app.extensions["tidings.settings"],
        )
    except PublishError as exc:
        raise click.UsageError(str(exc)) from None
    except PublishTimeout as exc:
        raise click.ClickException(str(exc)) from None
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis unavailable: {exc}") from None
    if fast:
        click.echo(f"published to {result} listener(s)")
    else:
        click.echo(result)


@click.command("token")
@click.option("--sub", required=True, help="User id (the `sub` claim).")
@click.option("--topic", "topics", multiple=True, required=True, help="Topic glob; repeatable.")
@click.option("--ttl", default=3600, show_default=True, type=click.IntRange(1), help="Seconds.")
@with_appcontext
def token_command(sub: str, topics: tuple[str, ...], ttl: int) -> None:
    """Print a connection token (JWT HS256 signed with TIDINGS_SECRET; with `iat` and `jti`)."""
    settings = current_app.extensions["tidings.settings"]
    secret = settings.secret
    if not secret:
        raise click.UsageError("TIDINGS_SECRET is not set: there is no key to sign tokens with")
    if ttl > settings.revocation_ttl:
        # A revocation is remembered that long: a longer-lived token would outlive it.
        raise click.BadParameter(
            f"at most TIDINGS_REVOCATION_TTL ({settings.revocation_ttl} s)", param_hint="--ttl"
        )
    click.echo(make_token(secret, sub, list(topics), ttl))


def init_app(app: Flask) -> None:
    """Register the CLI commands."""
    app.cli.add_command(publish_command)
    app.cli.add_command(token_command)
