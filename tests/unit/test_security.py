"""Tokens, permissions, expiry, limits: the realtime handlers in-process on a real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask

from tests.support import wait_for
from tidings.settings import Settings
from webapp import create_app
from webapp.extensions import socketio

SECRET = "a-test-secret-of-at-least-32-bytes!"


def _pem(private_key) -> tuple[bytes, str]:
    private = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


RSA_PRIVATE, RSA_PUBLIC = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
EC_PRIVATE, EC_PUBLIC = _pem(ec.generate_private_key(ec.SECP256R1()))


def token(key=SECRET, alg="HS256", sub="alice", topics=("orders.*",), ttl=60) -> str:
    claims = {"sub": sub, "topics": list(topics), "exp": int(time.time()) + ttl}
    return jwt.encode(claims, key, algorithm=alg)


@pytest.fixture
def make_app(redis_client, redis_server) -> Callable[..., Flask]:
    def make(**env: str) -> Flask:
        settings = Settings.from_env(
            {"TIDINGS_REDIS_URL": redis_server.url(0), "TIDINGS_SECRET": SECRET, **env}
        )
        return create_app({"SETTINGS": settings, "QUEUE": False})

    return make


def connect(app: Flask, auth: dict | None = None):
    return socketio.test_client(app, auth=auth)


def subscribe(client, payload) -> dict:
    return client.emit("subscribe", payload, callback=True)


@pytest.mark.parametrize(
    ("key", "alg", "public_key"),
    [(RSA_PRIVATE, "RS256", RSA_PUBLIC), (EC_PRIVATE, "ES256", EC_PUBLIC)],
)
def test_public_key_tokens(make_app, key, alg, public_key) -> None:
    app = make_app(TIDINGS_JWT_PUBLIC_KEY=public_key)
    client = connect(app, {"token": token(key, alg)})
    assert client.is_connected()
    assert subscribe(client, {"topic": "orders.1"})["ok"]
    # HS256 still checks against the secret; a token "signed" with the public
    # key as an HMAC secret (algorithm confusion) is refused.
    assert not connect(app, {"token": _hs256_with(public_key)}).is_connected()


def _hs256_with(key: str) -> str:
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "x", "topics": ["*"], "exp": int(time.time()) + 60}).encode())
    signature = hmac.new(key.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


def test_refused_tokens(make_app) -> None:
    app = make_app()
    unsigned = jwt.encode({"sub": "a", "topics": ["*"], "exp": int(time.time()) + 60}, None, "none")
    for bad in [
        token(ttl=-10),
        token(key="another-secret-of-at-least-32-bytes"),
        unsigned,
        "garbage",
        "a.b.c",
        42,
        "",
        "x" * 10_000,
        jwt.encode({"topics": ["*"], "exp": int(time.time()) + 60}, SECRET, "HS256"),  # no sub
        jwt.encode({"sub": "a", "topics": "orders.*", "exp": 9e9}, SECRET, "HS256"),
    ]:
        assert not connect(app, {"token": bad}).is_connected(), bad


def test_permissions(make_app) -> None:
    app = make_app()
    anonymous = connect(app)
    assert subscribe(anonymous, {"topic": "public.news"})["ok"]
    assert subscribe(anonymous, {"topic": "orders.1"}) == {"ok": False, "error": "forbidden"}
    alice = connect(app, {"token": token()})
    assert subscribe(alice, {"topic": "orders.1"})["ok"]
    assert subscribe(alice, {"topic": "invoices.1"})["error"] == "forbidden"


def test_channel_tokens_grant_topics_after_connecting(make_app) -> None:
    app = make_app()
    anonymous = connect(app)
    granted = subscribe(anonymous, {"topic": "orders.7", "token": token(topics=["orders.7"])})
    assert granted["ok"]
    wrong_topic = subscribe(anonymous, {"topic": "orders.8", "token": token(topics=["orders.7"])})
    assert wrong_topic["error"] == "forbidden"
    assert subscribe(anonymous, {"topic": "orders.9", "token": "junk"})["error"] == "forbidden"
    bob = connect(app, {"token": token(sub="bob", topics=[])})
    theirs = subscribe(bob, {"topic": "orders.7", "token": token(sub="alice")})
    assert theirs["error"] == "forbidden"


def test_refresh_keeps_the_user_and_replaces_the_grant(make_app) -> None:
    app = make_app()
    alice = connect(app, {"token": token(topics=[])})
    assert subscribe(alice, {"topic": "orders.1"})["error"] == "forbidden"
    assert alice.emit("refresh", {"token": token()}, callback=True)["ok"]
    assert subscribe(alice, {"topic": "orders.1"})["ok"]
    assert alice.emit("refresh", {"token": token(sub="mallory")}, callback=True) == {
        "ok": False,
        "error": "invalid_token",
    }
    assert alice.emit("refresh", {"token": "junk"}, callback=True)["error"] == "invalid_token"
    assert alice.emit("refresh", "junk", callback=True)["error"] == "invalid_token"


def test_expired_connections_are_told_then_cut_unless_refreshed(make_app) -> None:
    app = make_app(TIDINGS_TOKEN_GRACE="1")
    lazy = connect(app, {"token": token(ttl=1)})
    keen = connect(app, {"token": token(ttl=1)})

    def told(client) -> bool:
        return any(e["name"] == "token_expired" for e in client.get_received())

    wait_for(lambda: told(keen), timeout=5)
    assert keen.emit("refresh", {"token": token(ttl=60)}, callback=True)["ok"]
    wait_for(lambda: not lazy.is_connected(), timeout=5)
    assert keen.is_connected()


def test_subscribe_rate_and_subscription_limits(make_app) -> None:
    app = make_app(TIDINGS_SUBSCRIBE_RATE="5", TIDINGS_MAX_SUBSCRIPTIONS="3")
    client = connect(app)
    answers = [subscribe(client, {"topic": f"public.{i % 3}"}) for i in range(8)]
    assert [a["ok"] for a in answers[:5]] == [True] * 5
    assert {"ok": False, "error": "limit"} in answers[5:]
    time.sleep(1.1)  # the bucket refills with time: waiting is the behaviour under test
    assert subscribe(client, {"topic": "public.3"}) == {"ok": False, "error": "limit"}
    assert subscribe(client, {"topic": "public.0"})["ok"]


def test_connections_per_ip(make_app) -> None:
    app = make_app(TIDINGS_MAX_CONNECTIONS_PER_IP="2")
    first, second = connect(app), connect(app)
    assert first.is_connected() and second.is_connected()
    assert not connect(app).is_connected()
    first.disconnect()
    assert connect(app).is_connected()


def test_publish_api_limits(make_app) -> None:
    app = make_app(
        TIDINGS_API_KEY="k3y", TIDINGS_MAX_PUBLISH_BODY="2048", TIDINGS_MAX_PUBLISH_BATCH="2"
    )
    http = app.test_client()
    auth = {"Authorization": "Bearer k3y"}
    big = {"topic": "public.a", "data": "x" * 4096}
    assert http.post("/api/publish", json=big, headers=auth).status_code == 413
    three = [{"topic": "public.a", "data": i} for i in range(3)]
    assert http.post("/api/publish", json=three, headers=auth).status_code == 400
    assert http.post("/api/publish", json=three[:2], headers=auth).status_code == 202


def test_an_expired_channel_token_ends_that_subscription_only(make_app) -> None:
    app = make_app()
    connections = app.extensions["tidings.realtime"].connections
    anonymous = connect(app)
    assert subscribe(anonymous, {"topic": "public.news"})["ok"]
    # Nothing of an anonymous connection on public topics can expire: not swept.
    assert not connections.expiring
    granted = subscribe(
        anonymous, {"topic": "orders.7", "token": token(topics=["orders.7"], ttl=1)}
    )
    assert granted["ok"] and len(connections.expiring) == 1
    wait_for(
        lambda: any(
            e["name"] == "token_expired" and e["args"] == [{"topic": "orders.7"}]
            for e in anonymous.get_received()
        ),
        timeout=5,
    )
    assert anonymous.is_connected()
    (sid,) = connections.by_sid
    assert list(connections.by_sid[sid].grant.topics) == ["public.news"]
    wait_for(lambda: not connections.expiring, timeout=5)  # and it is swept no more
