"""Fixtures shared by every test: a real Redis, a clean client, and a Redis Cluster.

Session fixtures are sync on purpose: pytest-asyncio runs each test in its own loop, and a
sync fixture (Popen plus a blocking PING poll) belongs to no loop, so any test can use the
URL it yields.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tests.support.redis_proc import RedisCluster, RedisProcess, start_cluster_sync

TEST_REDIS_URL_ENV = "GATEWAY_TEST_REDIS_URL"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the suite's Redis: ``$GATEWAY_TEST_REDIS_URL``, else a private unix-socket server."""
    external = os.environ.get(TEST_REDIS_URL_ENV)
    if external:
        yield external
        return
    server = RedisProcess.start_sync()
    try:
        yield server.url
    finally:
        server.stop_sync()


@pytest_asyncio.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client (str replies) on an empty database; FLUSHDB at setup, closed at teardown."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await client.flushdb()
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def cluster() -> Iterator[RedisCluster]:
    """A 3-node Redis Cluster on 127.0.0.1 for tests marked ``@pytest.mark.cluster``."""
    running = start_cluster_sync(3)
    try:
        yield running
    finally:
        running.stop_sync()
