"""Every environment variable Tidings reads, typed and checked once at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from tidings.topics import is_valid_pattern

REDIS_SCHEMES = ("redis", "rediss", "unix")


class ConfigError(ValueError):
    """A bad environment variable; the message names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class Settings:
    """Tidings configuration; build it with `Settings.from_env()`."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str = "redis://127.0.0.1:6379/1"
    bind: str = "127.0.0.1:8000"
    web_concurrency: int = 1
    worker_connections: int = 10000
    secret: str | None = None
    public_topics: tuple[str, ...] = ("public.*",)
    api_key: str | None = None
    max_payload: int = 65536
    history_size: int = 1000
    history_ttl: int = 86400
    subscribe: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    lease_ttl_ms: int = 3000
    max_subscriptions: int = 100
    client_queue_packets: int = 1000
    client_queue_bytes: int = 1024 * 1024
    log_level: str = "INFO"
    log_format: str = "text"
    jwt_public_key: str | None = None
    token_grace: int = 30
    subscribe_rate: int = 20
    max_message_bytes: int = 16384
    max_connections_per_ip: int = 100
    max_publish_body: int = 1024 * 1024
    max_publish_batch: int = 1000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check every TIDINGS_* variable; raise ConfigError naming a bad one."""
        env = os.environ if env is None else env
        redis_url = _redis_url(env, "TIDINGS_REDIS_URL", cls.redis_url)
        broker_default = _next_db(redis_url)
        port = env.get("PORT", "").strip()
        if port:
            _int_in("PORT", port, 1, 65535)
            bind_default = f"0.0.0.0:{port}"
        else:
            bind_default = cls.bind
        return cls(
            redis_url=redis_url,
            broker_url=_broker_url(env, broker_default),
            bind=_bind(env.get("TIDINGS_BIND", bind_default)),
            web_concurrency=_int(env, "WEB_CONCURRENCY", cls.web_concurrency, 1, 512),
            worker_connections=_int(
                env, "TIDINGS_WORKER_CONNECTIONS", cls.worker_connections, 1, 1_000_000
            ),
            secret=_secret(env.get("TIDINGS_SECRET", "")),
            public_topics=_patterns(env, "TIDINGS_PUBLIC_TOPICS", "public.*"),
            api_key=env.get("TIDINGS_API_KEY") or None,
            max_payload=_int(env, "TIDINGS_MAX_PAYLOAD", cls.max_payload, 1, 512 * 1024 * 1024),
            history_size=_int(env, "TIDINGS_HISTORY_SIZE", cls.history_size, 1, 10_000_000),
            history_ttl=_int(env, "TIDINGS_HISTORY_TTL", cls.history_ttl, 1, 10 * 365 * 86400),
            subscribe=_patterns(env, "TIDINGS_SUBSCRIBE", ""),
            cors_origins=_origins(env.get("TIDINGS_CORS_ORIGINS", "")),
            max_subscriptions=_int(
                env, "TIDINGS_MAX_SUBSCRIPTIONS", cls.max_subscriptions, 1, 100_000
            ),
            client_queue_packets=_int(
                env, "TIDINGS_CLIENT_QUEUE_PACKETS", cls.client_queue_packets, 1, 10_000_000
            ),
            client_queue_bytes=_int(
                env, "TIDINGS_CLIENT_QUEUE_BYTES", cls.client_queue_bytes, 1024, 1 << 34
            ),
            lease_ttl_ms=_int(env, "TIDINGS_LEASE_TTL_MS", cls.lease_ttl_ms, 500, 60_000),
            log_level=_choice(
                env, "TIDINGS_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")
            ),
            log_format=_choice(env, "TIDINGS_LOG_FORMAT", "TEXT", ("TEXT", "JSON")).lower(),
            jwt_public_key=_public_key(env.get("TIDINGS_JWT_PUBLIC_KEY", "")),
            token_grace=_int(env, "TIDINGS_TOKEN_GRACE", cls.token_grace, 0, 86400),
            subscribe_rate=_int(env, "TIDINGS_SUBSCRIBE_RATE", cls.subscribe_rate, 1, 100_000),
            max_message_bytes=_int(
                env, "TIDINGS_MAX_MESSAGE_BYTES", cls.max_message_bytes, 256, 64 * 1024 * 1024
            ),
            max_connections_per_ip=_int(
                env, "TIDINGS_MAX_CONNECTIONS_PER_IP", cls.max_connections_per_ip, 1, 1_000_000
            ),
            max_publish_body=_int(
                env, "TIDINGS_MAX_PUBLISH_BODY", cls.max_publish_body, 1024, 1 << 30
            ),
            max_publish_batch=_int(
                env, "TIDINGS_MAX_PUBLISH_BATCH", cls.max_publish_batch, 1, 100_000
            ),
        )


def _int_in(variable: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(variable, f"expected a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(variable, f"must be between {low} and {high}, got {value}")
    return value


def _int(env: Mapping[str, str], variable: str, default: int, low: int, high: int) -> int:
    raw = env.get(variable, "")
    return default if raw.strip() == "" else _int_in(variable, raw, low, high)


def _choice(env: Mapping[str, str], variable: str, default: str, allowed: tuple[str, ...]) -> str:
    value = env.get(variable, "").strip().upper() or default
    if value not in allowed:
        raise ConfigError(variable, f"must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _redis_url(env: Mapping[str, str], variable: str, default: str) -> str:
    url = env.get(variable, "").strip() or default
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(variable, f"not a valid URL ({exc})") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(
            variable, f"scheme must be one of {', '.join(REDIS_SCHEMES)}, got {url!r}"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(variable, f"no host in {url!r}")
    _db_of(variable, parts.path)
    return url


def _db_of(variable: str, path: str) -> int:
    db = path.strip("/") or "0"
    if not db.isdigit():
        raise ConfigError(variable, f"database must be a number, got {db!r}")
    return int(db)


def _next_db(url: str) -> str:
    """Return the same server's next database: the broker's default home."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return url
    db = _db_of("TIDINGS_REDIS_URL", parts.path)
    return urlunsplit(parts._replace(path=f"/{db + 1}"))


def _broker_url(env: Mapping[str, str], default: str) -> str:
    url = env.get("TIDINGS_BROKER_URL", "").strip()
    if not url:
        return default
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:
        raise ConfigError("TIDINGS_BROKER_URL", f"not a valid URL ({exc})") from None
    if not scheme or "://" not in url:
        raise ConfigError("TIDINGS_BROKER_URL", f"not a URL: {url!r}")
    return url


def _bind(raw: str) -> str:
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not host:
        raise ConfigError("TIDINGS_BIND", f"expected HOST:PORT, got {raw!r}")
    _int_in("TIDINGS_BIND", port, 1, 65535)
    return raw.strip()


def _secret(raw: str) -> str | None:
    if not raw:
        return None
    # RFC 7518: an HS256 key shorter than the hash is guessable offline.
    if len(raw.encode()) < 32:
        raise ConfigError("TIDINGS_SECRET", "must be at least 32 bytes (try: openssl rand -hex 32)")
    return raw


def _public_key(raw: str) -> str | None:
    """Return a PEM public key given inline or as a file path; check that it loads."""
    raw = raw.strip()
    if not raw:
        return None
    if not raw.startswith("-----BEGIN"):
        try:
            with open(raw, encoding="ascii") as pem:
                raw = pem.read()
        except OSError as exc:
            raise ConfigError("TIDINGS_JWT_PUBLIC_KEY", f"cannot read {raw!r}: {exc}") from None
    try:
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        key = load_pem_public_key(raw.encode())
    except ValueError as exc:
        raise ConfigError("TIDINGS_JWT_PUBLIC_KEY", f"not a PEM public key ({exc})") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError("TIDINGS_JWT_PUBLIC_KEY", "must be an RSA or EC public key")
    return raw


def _split(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _patterns(env: Mapping[str, str], variable: str, default: str) -> tuple[str, ...]:
    patterns = _split(env.get(variable, default))
    for pattern in patterns:
        if not is_valid_pattern(pattern):
            raise ConfigError(variable, f"not a topic pattern: {pattern!r}")
    return patterns


def _origins(raw: str) -> tuple[str, ...]:
    origins = _split(raw)
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc):
            raise ConfigError("TIDINGS_CORS_ORIGINS", f"not an origin: {origin!r}")
    return origins


def load_or_exit(env: Mapping[str, str] | None = None) -> Settings:
    """Return the settings, or stop the process with one line naming the bad variable."""
    try:
        return Settings.from_env(env)
    except ConfigError as exc:
        raise SystemExit(f"tidings: bad configuration: {exc}") from None
