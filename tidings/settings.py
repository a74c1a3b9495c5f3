"""Every environment variable Tidings reads, typed and checked once at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from tidings.addresses import DEFAULT_TRUSTED_PROXIES, Network, parse_networks
from tidings.topics import is_valid_pattern

SENTINEL_SCHEME = "redis+sentinel"
REDIS_SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME)
# kombu's (Celery's broker) spelling: sentinel://host1:port1;sentinel://host2:port2
BROKER_SENTINEL_SCHEME = "sentinel"
# gunicorn's default listen() backlog.
GUNICORN_BACKLOG = 2048


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
    # Proxies whose X-Forwarded-For names the client (tidings/addresses.py).
    trusted_proxies: tuple[Network, ...] = parse_networks(DEFAULT_TRUSTED_PROXIES)
    # Milliseconds a web worker stays subscribed to a topic's queue channel
    # after its last local client of the topic left (webapp/routing.py).
    queue_linger_ms: int = 2000
    # Seconds between keep-alive comments on an idle SSE stream.
    sse_keepalive: int = 15
    max_publish_body: int = 1024 * 1024
    max_publish_batch: int = 1000
    # Microseconds the listener lets durable publications gather while they
    # come in a busy trickle (tidings/listener.py); 0: each as it arrives.
    ingest_batch_wait_us: int = 2000
    # The Sentinel master name of a sentinel:// broker (TIDINGS_SENTINEL_MASTER,
    # else the service named in a redis+sentinel:// TIDINGS_REDIS_URL).
    sentinel_master: str | None = None
    # Presence, the server API and webhooks (issue 14).
    presence_topics: tuple[str, ...] = ()
    join_leave_topics: tuple[str, ...] = ()
    max_connections_per_user: int | None = None  # None: unlimited
    revocation_ttl: int = 30 * 86400
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_max_attempts: int = 10
    webhook_timeout: int = 5

    @property
    def backlog(self) -> int:
        """gunicorn's listen() backlog: room for every connection of this host at once."""
        # A reconnect storm brings every client back before a new worker
        # accepts (gunicorn.conf.py says why); never below gunicorn's 2048.
        return max(GUNICORN_BACKLOG, self.web_concurrency * self.worker_connections)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check every TIDINGS_* variable; raise ConfigError naming a bad one."""
        env = os.environ if env is None else env
        redis_url = _redis_url(env, "TIDINGS_REDIS_URL", cls.redis_url)
        broker_default = _next_db(redis_url)
        sentinel_master = _sentinel_master(env, redis_url)
        port = env.get("PORT", "").strip()
        if port:
            _int_in("PORT", port, 1, 65535)
            bind_default = f"0.0.0.0:{port}"
        else:
            bind_default = cls.bind
        return cls(
            redis_url=redis_url,
            broker_url=_broker_url(env, broker_default, sentinel_master),
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
            trusted_proxies=_trusted_proxies(env),
            queue_linger_ms=_int(env, "TIDINGS_QUEUE_LINGER_MS", cls.queue_linger_ms, 0, 3_600_000),
            sse_keepalive=_int(env, "TIDINGS_SSE_KEEPALIVE", cls.sse_keepalive, 1, 3600),
            max_publish_body=_int(
                env, "TIDINGS_MAX_PUBLISH_BODY", cls.max_publish_body, 1024, 1 << 30
            ),
            max_publish_batch=_int(
                env, "TIDINGS_MAX_PUBLISH_BATCH", cls.max_publish_batch, 1, 100_000
            ),
            ingest_batch_wait_us=_int(
                env, "TIDINGS_INGEST_BATCH_WAIT_US", cls.ingest_batch_wait_us, 0, 100_000
            ),
            sentinel_master=sentinel_master,
            presence_topics=_patterns(env, "TIDINGS_PRESENCE_TOPICS", ""),
            join_leave_topics=_patterns(env, "TIDINGS_JOIN_LEAVE_TOPICS", ""),
            max_connections_per_user=_int(env, "TIDINGS_MAX_CONNECTIONS_PER_USER", 0, 0, 1_000_000)
            or None,
            revocation_ttl=_int(
                env, "TIDINGS_REVOCATION_TTL", cls.revocation_ttl, 60, 10 * 365 * 86400
            ),
            webhook_url=_webhook_url(env.get("TIDINGS_WEBHOOK_URL", "")),
            webhook_secret=_webhook_secret(env),
            webhook_max_attempts=_int(
                env, "TIDINGS_WEBHOOK_MAX_ATTEMPTS", cls.webhook_max_attempts, 1, 1000
            ),
            webhook_timeout=_int(env, "TIDINGS_WEBHOOK_TIMEOUT", cls.webhook_timeout, 1, 60),
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
    if url.startswith(SENTINEL_SCHEME + "://"):
        parse_sentinel_url(url, variable)
        return url
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


@dataclass(frozen=True)
class SentinelURL:
    """A parsed `redis+sentinel://[user:pass@]host1:port1,host2:port2/<db>/<service>`."""

    sentinels: tuple[tuple[str, int], ...]
    db: int
    service: str
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str, variable: str = "TIDINGS_REDIS_URL") -> SentinelURL:
    """Parse a Sentinel URL (python-socketio's format); ConfigError naming `variable` if bad.

    The user and password are the Redis master's (not the sentinels'). They
    are taken verbatim, as python-socketio's message queue reads them, so
    percent-encoding is refused rather than read two different ways.
    """
    form = f"expected {SENTINEL_SCHEME}://[user:password@]host:port[,host:port...]/<db>/<service>"
    scheme, sep, rest = url.partition("://")
    if scheme != SENTINEL_SCHEME or not sep:
        raise ConfigError(variable, f"{form}, got {url!r}")
    netloc, slash, path = rest.partition("/")
    credentials, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        if "%" in credentials:
            raise ConfigError(variable, "percent-encoded credentials are not supported here")
        user, colon, secret = credentials.partition(":")
        username = user or None
        password = secret if colon and secret else None
    sentinels = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host:
            raise ConfigError(variable, f"each sentinel must be host:port, got {item!r} ({form})")
        if host.startswith("["):
            raise ConfigError(
                variable, f"IPv6 literals are not supported, use a host name: {item!r}"
            )
        sentinels.append((host, _int_in(variable, port, 1, 65535)))
    segments = path.split("/") if slash else []
    if len(segments) != 2 or not segments[0] or not segments[1]:
        raise ConfigError(variable, f"{form}: the database and the service name are required")
    db = _db_of(variable, segments[0])
    service = segments[1]
    if not _is_name(service):
        raise ConfigError(variable, f"not a Sentinel service name: {service!r}")
    return SentinelURL(tuple(sentinels), db, service, username, password)


def _is_name(name: str) -> bool:
    return bool(name) and not any(c.isspace() or c in "/;,@:" for c in name)


def _sentinel_master(env: Mapping[str, str], redis_url: str) -> str | None:
    name = env.get("TIDINGS_SENTINEL_MASTER", "").strip()
    if name:
        if not _is_name(name):
            raise ConfigError("TIDINGS_SENTINEL_MASTER", f"not a Sentinel master name: {name!r}")
        return name
    if redis_url.startswith(SENTINEL_SCHEME + "://"):
        return parse_sentinel_url(redis_url).service
    return None


def _db_of(variable: str, path: str) -> int:
    db = path.strip("/") or "0"
    if not db.isdigit():
        raise ConfigError(variable, f"database must be a number, got {db!r}")
    return int(db)


def _next_db(url: str) -> str:
    """Return the same server's next database: the broker's default home.

    For a redis+sentinel:// URL, the same sentinels in kombu's spelling
    (`sentinel://host:port/<db>;sentinel://...`), credentials on the first.
    """
    if url.startswith(SENTINEL_SCHEME + "://"):
        parsed = parse_sentinel_url(url)
        auth = ""
        if parsed.username or parsed.password:
            auth = f"{parsed.username or ''}:{parsed.password or ''}@"
        return ";".join(
            f"{BROKER_SENTINEL_SCHEME}://{auth if i == 0 else ''}{host}:{port}/{parsed.db + 1}"
            for i, (host, port) in enumerate(parsed.sentinels)
        )
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return url
    db = _db_of("TIDINGS_REDIS_URL", parts.path)
    return urlunsplit(parts._replace(path=f"/{db + 1}"))


def _broker_url(env: Mapping[str, str], default: str, sentinel_master: str | None) -> str:
    url = env.get("TIDINGS_BROKER_URL", "").strip() or default
    sentinel = url.startswith(BROKER_SENTINEL_SCHEME + "://")
    for part in url.split(";"):
        try:
            parts = urlsplit(part.strip())
            parts.port  # noqa: B018 -- raises ValueError on a bad port
        except ValueError as exc:
            raise ConfigError("TIDINGS_BROKER_URL", f"not a valid URL ({exc})") from None
        if not parts.scheme or "://" not in part:
            raise ConfigError("TIDINGS_BROKER_URL", f"not a URL: {url!r}")
        if (parts.scheme == BROKER_SENTINEL_SCHEME) != sentinel:
            raise ConfigError("TIDINGS_BROKER_URL", f"mixes sentinel:// and other URLs: {url!r}")
        if sentinel:
            if not parts.hostname:
                raise ConfigError("TIDINGS_BROKER_URL", f"no sentinel host in {part!r}")
            _db_of("TIDINGS_BROKER_URL", parts.path)
    if sentinel and not sentinel_master:
        raise ConfigError(
            "TIDINGS_SENTINEL_MASTER",
            "a sentinel:// TIDINGS_BROKER_URL needs the master's name: set "
            "TIDINGS_SENTINEL_MASTER (a redis+sentinel:// TIDINGS_REDIS_URL names it too)",
        )
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


def _webhook_url(raw: str) -> str | None:
    url = raw.strip()
    if not url:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError("TIDINGS_WEBHOOK_URL", f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("TIDINGS_WEBHOOK_URL", f"expected an http(s):// URL, got {url!r}")
    return url


def _webhook_secret(env: Mapping[str, str]) -> str | None:
    secret = env.get("TIDINGS_WEBHOOK_SECRET", "")
    if not env.get("TIDINGS_WEBHOOK_URL", "").strip():
        return secret or None
    # Unsigned webhooks would let anyone who can reach the receiver forge events.
    if len(secret.encode()) < 16:
        raise ConfigError(
            "TIDINGS_WEBHOOK_SECRET",
            "must be set (at least 16 bytes) when TIDINGS_WEBHOOK_URL is: receivers check "
            "the signature with it",
        )
    return secret


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


def _trusted_proxies(env: Mapping[str, str]) -> tuple[Network, ...]:
    # Unset: the default; set but empty: no proxy is trusted, every header ignored.
    try:
        return parse_networks(env.get("TIDINGS_TRUSTED_PROXIES", DEFAULT_TRUSTED_PROXIES))
    except ValueError as exc:
        raise ConfigError("TIDINGS_TRUSTED_PROXIES", str(exc)) from None


def load_or_exit(env: Mapping[str, str] | None = None) -> Settings:
    """Return the settings, or stop the process with one line naming the bad variable."""
    try:
        return Settings.from_env(env)
    except ConfigError as exc:
        raise SystemExit(f"tidings: bad configuration: {exc}") from None
