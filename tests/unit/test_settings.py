import subprocess
import sys

import pytest

from tests.support import ROOT
from tidings.settings import ConfigError, Settings, parse_sentinel_url


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.broker_url == "redis://127.0.0.1:6379/1"
    assert settings.bind == "127.0.0.1:8000"
    assert settings.public_topics == ("public.*",)
    assert settings.secret is None and settings.api_key is None
    assert (settings.max_payload, settings.history_size, settings.history_ttl) == (
        65536,
        1000,
        86400,
    )


def test_queue_linger_is_read_in_milliseconds() -> None:
    assert Settings.from_env({}).queue_linger_ms == 2000
    assert Settings.from_env({"TIDINGS_QUEUE_LINGER_MS": "0"}).queue_linger_ms == 0


def test_the_ingest_batch_wait_is_read_in_microseconds() -> None:
    assert Settings.from_env({}).ingest_batch_wait_us == 2000
    assert Settings.from_env({"TIDINGS_INGEST_BATCH_WAIT_US": "0"}).ingest_batch_wait_us == 0


def test_broker_defaults_to_next_db_of_the_same_server() -> None:
    settings = Settings.from_env({"TIDINGS_REDIS_URL": "redis://:pw@example:6380/4"})
    assert settings.broker_url == "redis://:pw@example:6380/5"


def test_port_sets_the_bind_address_and_tidings_bind_wins() -> None:
    assert Settings.from_env({"PORT": "5000"}).bind == "0.0.0.0:5000"
    assert Settings.from_env({"PORT": "5000", "TIDINGS_BIND": "[::1]:9"}).bind == "[::1]:9"


def test_the_backlog_holds_every_connection_of_the_host_and_never_less_than_gunicorns() -> None:
    assert Settings.from_env({}).backlog == 10000
    both = {"WEB_CONCURRENCY": "3", "TIDINGS_WORKER_CONNECTIONS": "5000"}
    assert Settings.from_env(both).backlog == 15000
    assert Settings.from_env({"TIDINGS_WORKER_CONNECTIONS": "500"}).backlog == 2048


def test_lists_are_split_and_trimmed() -> None:
    settings = Settings.from_env(
        {
            "TIDINGS_PUBLIC_TOPICS": " public.*, news.?? ",
            "TIDINGS_SUBSCRIBE": "legacy.*",
            "TIDINGS_CORS_ORIGINS": "https://a.example, http://localhost:3000",
        }
    )
    assert settings.public_topics == ("public.*", "news.??")
    assert settings.subscribe == ("legacy.*",)
    assert settings.cors_origins == ("https://a.example", "http://localhost:3000")


def test_trusted_proxies_default_to_loopback_and_take_addresses_and_cidrs() -> None:
    assert [str(n) for n in Settings.from_env({}).trusted_proxies] == ["127.0.0.1/32", "::1/128"]
    env = {"TIDINGS_TRUSTED_PROXIES": " 10.0.0.2, 192.168.0.0/16 ,fd00::/8 "}
    assert [str(n) for n in Settings.from_env(env).trusted_proxies] == [
        "10.0.0.2/32",
        "192.168.0.0/16",
        "fd00::/8",
    ]
    # Set but empty: no proxy is trusted, every X-Forwarded-For is ignored.
    assert Settings.from_env({"TIDINGS_TRUSTED_PROXIES": ""}).trusted_proxies == ()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TIDINGS_REDIS_URL", "http://localhost"),
        ("TIDINGS_REDIS_URL", "redis://localhost:notaport/0"),
        ("TIDINGS_REDIS_URL", "redis://localhost/abc"),
        ("TIDINGS_REDIS_URL", "redis:///0"),
        ("TIDINGS_BROKER_URL", "nonsense"),
        ("TIDINGS_BIND", "8000"),
        ("TIDINGS_BIND", "localhost:99999"),
        ("PORT", "http"),
        ("WEB_CONCURRENCY", "0"),
        ("TIDINGS_MAX_PAYLOAD", "-1"),
        ("TIDINGS_HISTORY_SIZE", "ten"),
        ("TIDINGS_HISTORY_TTL", "0"),
        ("TIDINGS_PUBLIC_TOPICS", "bad topic"),
        ("TIDINGS_SUBSCRIBE", "a:b"),
        ("TIDINGS_CORS_ORIGINS", "example.com"),
        ("TIDINGS_LOG_LEVEL", "LOUD"),
        ("TIDINGS_SECRET", "too-short"),
        ("TIDINGS_TRUSTED_PROXIES", "nginx.internal"),
        ("TIDINGS_QUEUE_LINGER_MS", "-1"),
        ("TIDINGS_SSE_KEEPALIVE", "0"),
        ("TIDINGS_QUEUE_LINGER_MS", "2s"),
        ("TIDINGS_INGEST_BATCH_WAIT_US", "1ms"),
        ("TIDINGS_INGEST_BATCH_WAIT_US", "100001"),
        ("TIDINGS_TRUSTED_PROXIES", "10.0.0.1/8"),
        ("TIDINGS_TRUSTED_PROXIES", "127.0.0.1, ::1/129"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: value})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(variable + ":")


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "--check-config"],
        ["-m", "celery", "-A", "tasks", "inspect", "ping"],
        ["-m", "flask", "--app", "webapp", "publish", "public.x", "1"],
    ],
)
def test_every_entry_point_stops_with_one_line_naming_the_variable(command: list[str]) -> None:
    env = {"TIDINGS_HISTORY_SIZE": "-5", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "TIDINGS_HISTORY_SIZE" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


# -- Redis Sentinel ------------------------------------------------------------

SENTINEL_URL = "redis+sentinel://:pw@s1.example:26379,s2.example:26380/2/tidings-main"


def test_sentinel_url_is_accepted_and_parsed() -> None:
    settings = Settings.from_env({"TIDINGS_REDIS_URL": SENTINEL_URL})
    assert settings.redis_url == SENTINEL_URL
    parsed = parse_sentinel_url(settings.redis_url)
    assert parsed.sentinels == (("s1.example", 26379), ("s2.example", 26380))
    assert (parsed.db, parsed.service) == (2, "tidings-main")
    assert (parsed.username, parsed.password) == (None, "pw")
    with_user = parse_sentinel_url("redis+sentinel://web:secret@h:1/0/m")
    assert (with_user.username, with_user.password) == ("web", "secret")


def test_sentinel_url_gives_a_kombu_sentinel_broker_and_its_master_name() -> None:
    settings = Settings.from_env({"TIDINGS_REDIS_URL": SENTINEL_URL})
    assert settings.broker_url == (
        "sentinel://:pw@s1.example:26379/3;sentinel://s2.example:26380/3"
    )
    assert settings.sentinel_master == "tidings-main"


def test_sentinel_broker_takes_its_master_name_from_the_setting() -> None:
    env = {
        "TIDINGS_BROKER_URL": "sentinel://a:26379/1;sentinel://b:26379/1",
        "TIDINGS_SENTINEL_MASTER": "celery-master",
    }
    settings = Settings.from_env(env)
    assert settings.broker_url == env["TIDINGS_BROKER_URL"]
    assert settings.sentinel_master == "celery-master"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("variable", "env"),
    [
        ("TIDINGS_REDIS_URL", {"TIDINGS_REDIS_URL": "redis+sentinel://h:26379/0"}),
        ("TIDINGS_REDIS_URL", {"TIDINGS_REDIS_URL": "redis+sentinel://h:26379"}),
        ("TIDINGS_REDIS_URL", {"TIDINGS_REDIS_URL": "redis+sentinel://h:26379/0/"}),
        ("TIDINGS_REDIS_URL", {"TIDINGS_REDIS_URL": "redis+sentinel://h/0/m"}),
        ("TIDINGS_REDIS_URL", {"TIDINGS_REDIS_URL": "redis+sentinel://h:x/0/m"}),
        ("TIDINGS_REDIS_URL", {"TIDINGS_REDIS_URL": "redis+sentinel://h:1,:2/0/m"}),
        ("TIDINGS_REDIS_URL", {"TIDINGS_REDIS_URL": "redis+sentinel:///0/m"}),
        ("TIDINGS_REDIS_URL", {"TIDINGS_REDIS_URL": "redis+sentinel://h:1/db/m"}),
        ("TIDINGS_REDIS_URL", {"TIDINGS_REDIS_URL": "redis+sentinel://h:1/0/m/extra"}),
        ("TIDINGS_REDIS_URL", {"TIDINGS_REDIS_URL": "redis+sentinel://h:99999/0/m"}),
        ("TIDINGS_REDIS_URL", {"TIDINGS_REDIS_URL": "redis+sentinel://u:p%40ss@h:1/0/m"}),
        ("TIDINGS_REDIS_URL", {"TIDINGS_REDIS_URL": "redis+sentinel://[::1]:1/0/m"}),
        ("TIDINGS_BROKER_URL", {"TIDINGS_BROKER_URL": "sentinel://h:1;redis://h:2/0"}),
        ("TIDINGS_BROKER_URL", {"TIDINGS_BROKER_URL": "sentinel://:1/0"}),
        ("TIDINGS_BROKER_URL", {"TIDINGS_BROKER_URL": "sentinel://h:port/0"}),
        ("TIDINGS_SENTINEL_MASTER", {"TIDINGS_BROKER_URL": "sentinel://h:26379/1"}),
        ("TIDINGS_SENTINEL_MASTER", {"TIDINGS_SENTINEL_MASTER": "two words"}),
    ],
)
def test_malformed_sentinel_settings_name_the_variable(variable: str, env: dict) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.variable == variable
    assert str(caught.value).startswith(variable + ":")


# -- presence, the server API, webhooks (issue 14) -------------------------------


def test_presence_and_webhook_settings() -> None:
    defaults = Settings.from_env({})
    assert defaults.presence_topics == () and defaults.join_leave_topics == ()
    assert defaults.max_connections_per_user is None
    assert defaults.webhook_url is None and defaults.revocation_ttl == 30 * 86400
    settings = Settings.from_env(
        {
            "TIDINGS_PRESENCE_TOPICS": "rooms.*, lobby",
            "TIDINGS_JOIN_LEAVE_TOPICS": "rooms.*",
            "TIDINGS_MAX_CONNECTIONS_PER_USER": "5",
            "TIDINGS_WEBHOOK_URL": "https://hooks.example/tidings",
            "TIDINGS_WEBHOOK_SECRET": "sixteen-bytes-at-least",
            "TIDINGS_WEBHOOK_MAX_ATTEMPTS": "3",
        }
    )
    assert settings.presence_topics == ("rooms.*", "lobby")
    assert settings.max_connections_per_user == 5
    assert settings.webhook_url == "https://hooks.example/tidings"
    assert settings.webhook_max_attempts == 3
    assert (
        Settings.from_env({"TIDINGS_MAX_CONNECTIONS_PER_USER": "0"}).max_connections_per_user
        is None
    )


@pytest.mark.parametrize(
    ("variable", "env"),
    [
        ("TIDINGS_PRESENCE_TOPICS", {"TIDINGS_PRESENCE_TOPICS": "a b"}),
        ("TIDINGS_JOIN_LEAVE_TOPICS", {"TIDINGS_JOIN_LEAVE_TOPICS": "a:b"}),
        ("TIDINGS_MAX_CONNECTIONS_PER_USER", {"TIDINGS_MAX_CONNECTIONS_PER_USER": "-1"}),
        ("TIDINGS_REVOCATION_TTL", {"TIDINGS_REVOCATION_TTL": "1"}),
        ("TIDINGS_WEBHOOK_URL", {"TIDINGS_WEBHOOK_URL": "ftp://x/y"}),
        ("TIDINGS_WEBHOOK_URL", {"TIDINGS_WEBHOOK_URL": "http://h:port/"}),
        ("TIDINGS_WEBHOOK_SECRET", {"TIDINGS_WEBHOOK_URL": "http://h/"}),
        (
            "TIDINGS_WEBHOOK_SECRET",
            {"TIDINGS_WEBHOOK_URL": "http://h/", "TIDINGS_WEBHOOK_SECRET": "short"},
        ),
        ("TIDINGS_WEBHOOK_MAX_ATTEMPTS", {"TIDINGS_WEBHOOK_MAX_ATTEMPTS": "0"}),
        ("TIDINGS_WEBHOOK_TIMEOUT", {"TIDINGS_WEBHOOK_TIMEOUT": "61"}),
    ],
)
def test_bad_presence_and_webhook_settings_name_the_variable(variable: str, env: dict) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.variable == variable
