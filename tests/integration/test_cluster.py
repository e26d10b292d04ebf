"""The route table on a real 3-node Redis Cluster: the hash-tagged key design holds.

The writer and reader run unchanged on ``redis.asyncio.cluster.RedisCluster``: every
per-sandbox script touches two keys of one label, which share a slot thanks to the
``{label}`` hash tag, so Cluster never refuses it as cross-slot.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient

from gateway import errors
from gateway.routing import schema, store
from gateway.routing.model import State
from gateway.routing.store import RouteReader, RouteWriter
from tests.integration.test_store import SETTINGS
from tests.support.redis_proc import RedisCluster

pytestmark = pytest.mark.cluster


@pytest_asyncio.fixture
async def client(cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    """A cluster client with the table settings stored (the cluster is shared: fresh labels)."""
    nodes = [ClusterNode(host, port) for host, port in cluster.startup_nodes]
    connection = ClusterClient(startup_nodes=nodes, socket_timeout=2.0)
    try:
        await connection.initialize()
        await store.write_settings(connection, SETTINGS)
        yield connection
    finally:
        await connection.aclose()


def spread_labels(client: ClusterClient, count: int) -> list[str]:
    """``count`` fresh labels whose keys live on different nodes."""
    salt = os.urandom(2).hex()
    labels: list[str] = []
    owners: set[object] = set()
    for i in range(256):
        label = f"{salt}{i:02x}"[:6]
        node = client.get_node_from_key(schema.sandbox_key(label))
        owner = (getattr(node, "host", None), getattr(node, "port", None))
        if owner not in owners:
            owners.add(owner)
            labels.append(label)
        if len(labels) == count:
            return labels
    raise AssertionError("no labels spread over the nodes")


async def test_both_keys_of_a_label_share_a_slot(client: ClusterClient) -> None:
    """gw:{label}:sandbox and gw:{label}:gen share a slot; the labels land on different nodes."""
    labels = spread_labels(client, 3)
    slots = [client.keyslot(schema.sandbox_key(label)) for label in labels]
    assert len(set(slots)) == 3
    for label, slot in zip(labels, slots, strict=True):
        assert client.keyslot(schema.gen_key(label)) == slot
        assert client.keyslot(label) == slot  # the slot is the label's own


async def test_writer_and_reader_work_on_every_node(client: ClusterClient) -> None:
    """Create, expose, pause, resume, close, terminate and reads work for labels on all 3 nodes."""
    writer = RouteWriter(client)
    reader = RouteReader(client, timeout_seconds=2.0)
    for label in spread_labels(client, 3):
        sid = f"{label}zz"
        created = await writer.create(sid, address="127.0.0.2")
        exposure, first = await writer.expose(sid, 3000)
        assert first and exposure.url == f"https://3000-{label}.box.runra.dev"
        await writer.pause(sid)
        resumed = await writer.resume(sid, address="::1")
        assert (resumed.state, resumed.address, set(resumed.ports)) == (
            State.RUNNING,
            "::1",
            {3000},
        )
        assert resumed.incarnation != created.incarnation
        await writer.close(sid, 3000)
        assert await writer.list_ports(sid) == []
        tombstone = await writer.terminate(sid)
        assert tombstone.gen == 6
        read = await reader.get(label)
        assert read is not None and (read.id, read.state, read.gen) == (sid, State.TERMINATED, 6)
        assert 0 < await client.ttl(schema.sandbox_key(label)) <= SETTINGS.quarantine_seconds
        with pytest.raises(errors.LifecycleConflict, match="quarantined"):
            await writer.create(f"{label}yy", address="127.0.0.3")


async def test_events_are_appended_on_the_cluster(client: ClusterClient) -> None:
    """XADD to gw:events works through the cluster client, and read_events reads them back."""
    writer = RouteWriter(client)
    (label,) = spread_labels(client, 1)
    await writer.create(label, address="127.0.0.2")
    await writer.expose(label, 3000)
    mine = [e async for e in store.read_events(client, follow=False) if e["label"] == label]
    assert [(e["type"], e["gen"]) for e in mine] == [("sandbox.created", 1), ("port.exposed", 2)]


async def test_invalidation_reaches_a_subscriber_on_another_node(
    client: ClusterClient, cluster: RedisCluster
) -> None:
    """The PUBLISH inside the script reaches subscribers on every node of the cluster."""
    (label,) = spread_labels(client, 1)
    owner = client.get_node_from_key(schema.sandbox_key(label))
    host, port = next((h, p) for h, p in cluster.startup_nodes if p != getattr(owner, "port", None))
    subscriber = aioredis.Redis(host=host, port=port, decode_responses=True)
    pubsub = subscriber.pubsub()
    try:
        await pubsub.subscribe(schema.INVALIDATION_CHANNEL)
        await pubsub.get_message(timeout=1.0)
        record = await RouteWriter(client).create(label, address="127.0.0.2")
        expected = (label, record.gen)
        seen: list[tuple[str, int] | None] = []
        # Other tests' late messages (and heartbeats) may come first: skip them, bounded.
        for _ in range(50):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
            if message is None:
                break
            seen.append(schema.parse_invalidation(message["data"]))
            if seen[-1] == expected:
                break
    finally:
        await pubsub.aclose()
        await subscriber.aclose()
    assert expected in seen
