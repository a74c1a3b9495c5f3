"""Redis key and channel names fixed by the contract, in one place."""

TOPIC_CHANNEL_PREFIX = "tidings:topic:"
TOPIC_CHANNEL_PATTERN = TOPIC_CHANNEL_PREFIX + "*"
INGEST_STREAM = "tidings:ingest"
INGEST_GROUP = "tidings"
HISTORY_PREFIX = "tidings:history:"
LEASE_KEY = "tidings:listener"
SOCKETIO_CHANNEL = "tidings:socketio"
# tidings:socketio:<topic>: the listener emits each topic's publications on a
# queue channel of the topic's own, which a web worker subscribes to while it
# has clients of the topic (interest routing); `tidings:socketio` keeps
# control messages and application emits.
QUEUE_TOPIC_PREFIX = SOCKETIO_CHANNEL + ":"
# tidings:receipt:<ingest id>: a short-lived list the listener pushes a
# durable publication's offset to when its publisher waits for it.
RECEIPT_PREFIX = "tidings:receipt:"


def history_key(topic: str) -> str:
    """Return the history stream key of a topic."""
    return HISTORY_PREFIX + topic


def topic_channel(topic: str) -> str:
    """Return the pub/sub channel a fast publication of a topic goes to."""
    return TOPIC_CHANNEL_PREFIX + topic


def queue_channel(topic: str) -> str:
    """Return the message-queue channel a topic's publications are emitted on."""
    return QUEUE_TOPIC_PREFIX + topic


def room(topic: str) -> str:
    """Return the Socket.IO room of a topic.

    The prefix holds a character topics cannot contain, so no topic can name
    another room (every client's sid is a room too).
    """
    return "t:" + topic


# Operational statistics (issue 6), read by the web tier's /metrics, /api/ops
# and `flask doctor`; nothing in the delivery path depends on them.
# tidings:stats:listener: a hash of the listener's counters, accumulated
# across listeners (HINCRBY deltas about once a second) plus its last flush.
STATS_LISTENER_KEY = "tidings:stats:listener"
# tidings:stats:drops: a capped list (newest first) of recent drops, as JSON.
STATS_DROPS_KEY = "tidings:stats:drops"
# tidings:stats:web:<host>:<pid>: a hash per web worker, expiring seconds
# after the worker stops refreshing it; tidings:stats:webs indexes them (a
# sorted set scored by refresh time, so nobody has to SCAN the keyspace).
STATS_WEB_PREFIX = "tidings:stats:web:"
STATS_WEB_INDEX = "tidings:stats:webs"


def web_stats_key(worker: str) -> str:
    """Return the stats hash key of a web worker named `<host>:<pid>`."""
    return STATS_WEB_PREFIX + worker
