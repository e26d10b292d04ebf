"""The invalidation subscriber: keeps the route cache honest.

Strategy (DESIGN.md section 7): Redis pub/sub drops messages published while a
subscriber is disconnected, so the cache is flushed whenever the subscription is (re)made:
after our own reconnects, and after redis-py's silent re-subscribe (seen as a second
``subscribe`` confirmation on the same PubSub). A subscription can also go quiet without
dropping (a black hole), so the watcher publishes a heartbeat to itself on the same
channel; when none has come back for ``HEARTBEAT_MISSES`` intervals, the subscription is
treated as lost: the cache is told (it flushes and shortens TTLs) and the watcher
subscribes again.

On Redis Cluster, classic PUBLISH is broadcast over the cluster bus to every node, so a
subscription on any one node hears every invalidation. The watcher subscribes with a plain
connection to one node of the cluster's current node list, a different one at each
(re)subscribe, so a dead node is left at the next attempt. The heartbeat is published
through the cluster client (to whichever node it picks), so it checks the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis
import redis.asyncio.cluster
import redis.exceptions

from gateway.routing import schema
from gateway.routing.cache import RouteCache

log = logging.getLogger("gateway.watcher")

HEARTBEAT_MISSES = 4
RECONNECT_BACKOFF_SECONDS = (0.05, 0.1, 0.2, 0.5, 1.0)
# Connection settings a cluster node's subscriber connection inherits from the cluster
# client (the rest of a node's kwargs are cluster-client internals).
_NODE_KWARGS = (
    "host", "port", "username", "password", "credential_provider", "socket_timeout",
    "socket_connect_timeout", "socket_keepalive",
)  # fmt: skip


class SubscriptionLost(Exception):
    """The subscription stopped delivering (dropped, or our heartbeats stopped coming back)."""


class InvalidationWatcher:
    """Runs for ever (until cancelled), applying invalidations to ``cache``."""

    def __init__(
        self,
        client: aioredis.Redis | redis.asyncio.cluster.RedisCluster,
        cache: RouteCache,
        *,
        heartbeat_interval_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        observe_lag: Callable[[float], None] | None = None,
    ) -> None:
        self._client = client
        # Called with seconds from Redis publishing an invalidation to it being applied
        # here (wall clocks of two hosts: as good as their synchronisation).
        self._observe_lag = observe_lag
        self._cache = cache
        self._interval = heartbeat_interval_seconds
        self._clock = clock
        self._replica = os.urandom(6).hex()
        self._beat_prefix = f"{schema.HEARTBEAT_PREFIX}{self._replica}:".encode()
        self._last_beat = clock()
        self._next_node = 0
        self.resubscribes = 0
        # The cluster node of the current subscription (``host:port``), None standalone.
        self.subscribed_node: str | None = None

    async def run(self) -> None:
        """Subscribe, apply messages, and re-subscribe after any loss, for ever."""
        failures = 0
        beats = asyncio.create_task(self._publish_heartbeats())
        try:
            while True:
                try:
                    await self._watch_once()
                except (SubscriptionLost, redis.exceptions.RedisError, OSError) as exc:
                    reraise_swallowed_cancel()
                    self._cache.set_subscribed(False)
                    log.warning("invalidation subscription lost: %s", exc)
                delay = RECONNECT_BACKOFF_SECONDS[min(failures, len(RECONNECT_BACKOFF_SECONDS) - 1)]
                failures += 1
                await asyncio.sleep(delay)
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats

    # Private methods ------------------------------------------------------------------

    async def _watch_once(self) -> None:
        async with self._subscription() as pubsub:
            confirmed = False
            self._last_beat = self._clock()
            while True:
                message = await asyncio.wait_for(
                    pubsub.get_message(timeout=self._interval), self._interval + 5.0
                )
                reraise_swallowed_cancel()
                if message is not None:
                    confirmed = self._handle(message, confirmed)
                if self._clock() - self._last_beat > self._interval * HEARTBEAT_MISSES:
                    raise SubscriptionLost("no heartbeat came back")

    @contextlib.asynccontextmanager
    async def _subscription(self) -> AsyncIterator[aioredis.client.PubSub]:
        node_client: aioredis.Redis | None = None
        if isinstance(self._client, redis.asyncio.cluster.RedisCluster):
            node_client = await self._node_client(self._client)
            pubsub = node_client.pubsub()
        else:
            pubsub = self._client.pubsub()
        try:
            async with asyncio.timeout(5.0):
                await pubsub.subscribe(schema.INVALIDATION_CHANNEL)
            reraise_swallowed_cancel()
            yield pubsub
        finally:
            try:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await pubsub.aclose()
            finally:
                # Our own pool on that node: close it whatever happened above.
                if node_client is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(1.0):
                            await node_client.aclose()

    async def _node_client(self, cluster: redis.asyncio.cluster.RedisCluster) -> aioredis.Redis:
        """A one-server client on the next node of the cluster (its own connection pool)."""
        async with asyncio.timeout(5.0):
            await cluster.initialize()  # a no-op once the slots are known
        reraise_swallowed_cancel()
        nodes = sorted(cluster.get_nodes(), key=lambda n: n.name)
        if not nodes:
            raise SubscriptionLost("the cluster client knows no nodes")
        node = nodes[self._next_node % len(nodes)]
        self._next_node += 1
        self.subscribed_node = node.name
        kwargs = {
            key: value
            for key, value in node.connection_kwargs.items()
            if key in _NODE_KWARGS or key.startswith("ssl")
        }
        pool = aioredis.ConnectionPool(connection_class=node.connection_class, **kwargs)
        return aioredis.Redis.from_pool(pool)  # closing the client closes the pool

    def _handle(self, message: dict[str, object], confirmed: bool) -> bool:
        kind = message.get("type")
        if kind == "subscribe":
            if confirmed:
                # redis-py re-subscribed on its own after a reconnect: anything published
                # in between is lost, so nothing cached can be trusted.
                self.resubscribes += 1
            self._cache.set_subscribed(True)
            self._last_beat = self._clock()
            return True
        if kind != "message":
            return confirmed
        data = message.get("data")
        if isinstance(data, bytes) and data.startswith(self._beat_prefix):
            self._last_beat = self._clock()
        elif isinstance(data, bytes | str):
            parsed = schema.parse_invalidation(data)
            if parsed is not None:
                self._cache.invalidate(*parsed)
                published = schema.invalidation_time_ms(data)
                if published is not None and self._observe_lag is not None:
                    self._observe_lag(max(0.0, time.time() - published / 1000))
        return confirmed

    async def _publish_heartbeats(self) -> None:
        seq = 0
        while True:
            seq += 1
            beat = f"{schema.HEARTBEAT_PREFIX}{self._replica}:{seq}"
            # A failed publish just means a missed beat; the reader side decides.
            with contextlib.suppress(redis.exceptions.RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self._interval * 2):
                    await self._client.publish(schema.INVALIDATION_CHANNEL, beat)
            reraise_swallowed_cancel()
            await asyncio.sleep(self._interval)


def reraise_swallowed_cancel() -> None:
    """Raise the cancellation of this task if a Redis call swallowed it.

    redis-py's asyncio client awaits ``asyncio.wait_for`` (e.g. around socket drains),
    and on Python 3.11 ``wait_for`` loses a cancellation that arrives as the awaited
    operation completes (CPython gh-86296, fixed in 3.12): the command returns normally
    and the task goes on as if never cancelled. The watcher's loops run for ever, so a
    lost cancellation would hang the gateway's shutdown; they check after every call.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
