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


# Presence, the server API and webhooks (issue 14). README, "Redis keys".
# tidings:nodes: a sorted set of live web nodes (`<host>:<pid>`), scored by
# their last heartbeat (Redis's clock, ms); a node silent for NODE_TTL_MS is
# reaped by whoever looks next, and what it counted is taken away.
NODES_INDEX = "tidings:nodes"
# tidings:node:<node>: a hash of the node's facts (pid, started, connections);
# tidings:node:<node>:topics|members|users: what this node adds to the
# cluster-wide hashes below, so that its share can be taken away again.
NODE_PREFIX = "tidings:node:"
# tidings:topics: a hash topic -> connections subscribed, across live nodes.
TOPICS_KEY = "tidings:topics"
# tidings:presence:<topic>: a hash sub -> connections, for presence topics.
PRESENCE_PREFIX = "tidings:presence:"
# tidings:users: a hash sub -> connections, kept while
# TIDINGS_MAX_CONNECTIONS_PER_USER is set.
USERS_KEY = "tidings:users"
# Revocations: tidings:revoked:subs (sorted set sub -> `before`, unix s),
# tidings:revoked:jtis (sorted set jti -> when the entry expires, unix s), and
# tidings:revoked:version (a counter bumped by every revocation: nodes reload
# their copy when it moves).
REVOKED_SUBS = "tidings:revoked:subs"
REVOKED_JTIS = "tidings:revoked:jtis"
REVOKED_VERSION = "tidings:revoked:version"
# Operator commands to every web node (disconnect, unsubscribe, revoke), JSON;
# each node answers on the list named in the command's `reply`.
CONTROL_CHANNEL = "tidings:control"
REPLY_PREFIX = "tidings:reply:"
# Webhook events waiting for delivery, in order; the Celery task deletes
# what it delivered. :lock is held by the one delivering task, :dispatch
# marks a task sent and not yet started, :state holds the retry count.
WEBHOOK_STREAM = "tidings:webhooks"
WEBHOOK_LOCK = "tidings:webhooks:lock"
WEBHOOK_DISPATCH = "tidings:webhooks:dispatch"
WEBHOOK_STATE = "tidings:webhooks:state"
STATS_WEBHOOKS_KEY = "tidings:stats:webhooks"


def presence_key(topic: str) -> str:
    """Return the cluster-wide presence hash of a topic."""
    return PRESENCE_PREFIX + topic


def node_key(node: str, part: str = "") -> str:
    """Return a node's facts hash, or one of its share hashes (`topics`, `members`, `users`)."""
    return NODE_PREFIX + node + (":" + part if part else "")
