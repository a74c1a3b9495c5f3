"""Redis key and channel names fixed by the contract, in one place."""

TOPIC_CHANNEL_PREFIX = "tidings:topic:"
TOPIC_CHANNEL_PATTERN = TOPIC_CHANNEL_PREFIX + "*"
INGEST_STREAM = "tidings:ingest"
INGEST_GROUP = "tidings"
HISTORY_PREFIX = "tidings:history:"
LEASE_KEY = "tidings:listener"
SOCKETIO_CHANNEL = "tidings:socketio"
# tidings:receipt:<ingest id>: a short-lived list the listener pushes a
# durable publication's offset to when its publisher waits for it.
RECEIPT_PREFIX = "tidings:receipt:"


def history_key(topic: str) -> str:
    """Return the history stream key of a topic."""
    return HISTORY_PREFIX + topic


def topic_channel(topic: str) -> str:
    """Return the pub/sub channel a fast publication of a topic goes to."""
    return TOPIC_CHANNEL_PREFIX + topic


def room(topic: str) -> str:
    """Return the Socket.IO room of a topic.

    The prefix holds a character topics cannot contain, so no topic can name
    another room (every client's sid is a room too).
    """
    return "t:" + topic
