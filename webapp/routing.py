"""Interest routing: which per-topic queue channels this web worker subscribes to, and when.

The listener emits each topic's publications on the topic's own channel,
`tidings:socketio:<topic>` (tidings.keys.queue_channel). A web worker wants a
topic's channel while any of its clients is subscribed to the topic or is
joining it, and only then: a worker pays for its own clients' topics, not for
the whole stream.

A route goes SUBSCRIBING (SUBSCRIBE queued or sent) -> LIVE (Redis confirmed
it: from now on every publication of the topic reaches this worker) ->
UNSUBSCRIBING (UNSUBSCRIBE sent) -> gone. When the last local client leaves,
the route stays LIVE, unwanted, for `linger` seconds (a client that leaves
and comes back, or the next of a steady trickle of short-lived subscribers,
finds the channel still live), and is unsubscribed only if nobody wanted it
meanwhile. A route wanted again while its UNSUBSCRIBE is in flight is
subscribed again at once: Redis answers the two in order, so the
confirmation that makes it LIVE comes last.

Commands are not sent from here: `take_commands` hands the queued channel
names to the one greenlet that writes on the queue connection, which sends
them batched (tidings.pubsub: 512 channels per command). After a reconnect,
`reset` queues every wanted route again and forgets the rest.

Not thread-safe by itself: the queue manager holds its lock around it.
"""

from __future__ import annotations

import threading

from tidings.keys import QUEUE_TOPIC_PREFIX, queue_channel

SUBSCRIBING, LIVE, UNSUBSCRIBING = "subscribing", "live", "unsubscribing"
# Seconds a channel nobody here wants stays subscribed before it is left.
LINGER_SECONDS = 2.0


class Route:
    """One topic's queue channel as this worker sees it."""

    __slots__ = ("channel", "live", "state", "topic", "vacated_at", "wanted")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.channel = queue_channel(topic)
        self.state = SUBSCRIBING
        self.wanted = True
        # Set while LIVE: a joining client waits on it before reading history.
        self.live = threading.Event()
        self.vacated_at = 0.0


class Routes:
    """Every route of this worker, and the (UN)SUBSCRIBE commands waiting to be sent."""

    def __init__(self, linger: float = LINGER_SECONDS) -> None:
        self.linger = linger
        self.by_topic: dict[str, Route] = {}
        self.connected = False
        self._subscribe: dict[str, None] = {}  # ordered sets of channel names
        self._unsubscribe: dict[str, None] = {}

    def want(self, topic: str) -> Route:
        """Make sure the topic's channel is, or is being, subscribed; return its route."""
        route = self.by_topic.get(topic)
        if route is None:
            route = self.by_topic[topic] = Route(topic)
            self._queue_subscribe(route)
            return route
        route.wanted = True
        if route.state == UNSUBSCRIBING:
            route.state = SUBSCRIBING
            self._queue_subscribe(route)
        return route

    def vacate(self, topic: str, now: float) -> None:
        """Note that no local client wants the topic any more; it lingers, then goes."""
        route = self.by_topic.get(topic)
        if route is not None and route.wanted:
            route.wanted = False
            route.vacated_at = now

    def expire(self, now: float) -> list[Route]:
        """Queue UNSUBSCRIBE for live routes unwanted for `linger` seconds; return them."""
        gone = [
            route
            for route in self.by_topic.values()
            if not route.wanted and route.state == LIVE and now - route.vacated_at >= self.linger
        ]
        for route in gone:
            route.state = UNSUBSCRIBING
            route.live.clear()
            self._subscribe.pop(route.channel, None)
            if self.connected:
                self._unsubscribe[route.channel] = None
        return gone

    def confirmed(self, channel: str) -> Route | None:
        """Mark a route LIVE on Redis' SUBSCRIBE confirmation; None if it is not ours."""
        route = self.by_channel(channel)
        if route is None or route.state != SUBSCRIBING:
            return None
        route.state = LIVE
        route.live.set()
        return route

    def left(self, channel: str) -> str | None:
        """Forget a route on Redis' UNSUBSCRIBE confirmation (unless wanted again since).

        Returns the topic of the route forgotten, if any.
        """
        route = self.by_channel(channel)
        if route is not None and route.state == UNSUBSCRIBING:
            del self.by_topic[route.topic]
            return route.topic
        return None

    def by_channel(self, channel: str) -> Route | None:
        """Return the route of a queue channel name."""
        if not channel.startswith(QUEUE_TOPIC_PREFIX):
            return None
        return self.by_topic.get(channel[len(QUEUE_TOPIC_PREFIX) :])

    def reset(self, connected: bool) -> None:
        """After a (dis)connect: wanted routes SUBSCRIBING (queued if connected), others gone."""
        self.connected = connected
        self._subscribe.clear()
        self._unsubscribe.clear()
        for topic, route in list(self.by_topic.items()):
            route.live.clear()
            if not route.wanted:
                del self.by_topic[topic]
                continue
            route.state = SUBSCRIBING
            self._queue_subscribe(route)

    def take_commands(self) -> tuple[list[str], list[str]]:
        """Return and forget the channels to subscribe and to unsubscribe."""
        subscribe, unsubscribe = list(self._subscribe), list(self._unsubscribe)
        self._subscribe.clear()
        self._unsubscribe.clear()
        return subscribe, unsubscribe

    def has_commands(self) -> bool:
        """Tell whether commands wait to be sent."""
        return bool(self._subscribe or self._unsubscribe)

    def count(self, state: str) -> int:
        """Return how many routes are in `state`."""
        return sum(1 for route in self.by_topic.values() if route.state == state)

    def _queue_subscribe(self, route: Route) -> None:
        self._unsubscribe.pop(route.channel, None)
        if self.connected:
            self._subscribe[route.channel] = None
