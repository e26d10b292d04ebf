"""Fixtures most integration tests share: a gateway, a writer and an echo upstream.

A module that needs something else (overrides, another address) defines its own
fixture of the same name, which wins.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
import redis.asyncio as aioredis

from gateway.routing.store import RouteWriter
from tests.support.gateway import GatewayHandle, route_writer, running_gateway
from tests.support.upstreams import Upstream, echo_app, start_upstream


@pytest_asyncio.fixture
async def gateway(redis: aioredis.Redis, redis_url: str) -> AsyncIterator[GatewayHandle]:
    """A whole gateway on the (flushed) test Redis, on loopback port 0."""
    async with running_gateway(redis_url) as handle:
        yield handle


@pytest_asyncio.fixture
async def writer(gateway: GatewayHandle, redis_url: str) -> AsyncIterator[RouteWriter]:
    """A route writer on the same Redis (after the gateway wrote the table settings)."""
    async with route_writer(redis_url) as w:
        yield w


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """An echo upstream playing a sandbox port on 127.0.0.2."""
    server = await start_upstream("127.0.0.2", echo_app("a"))
    try:
        yield server
    finally:
        await server.stop()
