"""Fixtures most integration tests share: a gateway, a writer and an echo upstream.

A module that needs something else (overrides, another address) defines its own
fixture of the same name, which wins.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
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


@pytest_asyncio.fixture
async def host(
    request: pytest.FixtureRequest, writer: RouteWriter, upstream: Upstream, gateway: GatewayHandle
) -> str:
    """The public Host of the echo upstream, exposed on the test module's ``SANDBOX`` id."""
    sandbox: str = request.module.SANDBOX
    return await gateway.expose(writer, sandbox, upstream.port)


@pytest_asyncio.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A jar-less, non-decompressing client: whatever cookie or encoding the upstream sees
    came through the gateway, and bodies are compared as sent."""
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
    ) as session:
        yield session
