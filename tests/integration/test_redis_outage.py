"""The gateway while its Redis is frozen or dead (issue 3, points 1 and 2).

Each test runs its own redis-server (never the suite's shared one), freezes it with
SIGSTOP (connections accepted, never answered) or kills it, and checks: host errors are
judged without Redis; cached routes are served for the stale budget, then 503
route_store_unavailable; and the gateway recovers by itself once Redis is back.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from gateway.routing.store import RouteWriter
from tests.support.gateway import GatewayHandle, route_writer, running_gateway
from tests.support.rawhttp import RawResponse, exchange, request_bytes
from tests.support.redis_proc import RedisProcess
from tests.support.upstreams import Upstream
from tests.support.waiting import wait_until

SANDBOX, LABEL = "outage01", "outage"
STALE_BUDGET_SECONDS = 2.0


@pytest_asyncio.fixture
async def private_redis() -> AsyncIterator[RedisProcess]:
    # appendfsync always: a killed server comes back with every write it acknowledged.
    server = await RedisProcess.start(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    try:
        yield server
    finally:
        await server.stop()  # thaws a paused server first


@pytest_asyncio.fixture
async def writer(private_redis: RedisProcess) -> AsyncIterator[RouteWriter]:
    async with route_writer(private_redis.url) as w:
        yield w


async def _get(
    gateway: GatewayHandle, host: str, extra: list[tuple[str, str]] | None = None
) -> RawResponse:
    data = request_bytes("GET", "/", [("Host", host), *(extra or [])])
    return await exchange("127.0.0.1", gateway.port, data, wait=10)


async def _code(gateway: GatewayHandle, host: str) -> str:
    response = await _get(gateway, host)
    return response.header("X-Gateway-Error") or str(response.status)


@pytest.mark.parametrize(
    ("host", "code"),
    [("example.com", "unknown_host"), ("03000-abcdef.box.test", "invalid_host"),
     ("80-abcdef.box.test", "invalid_port"), ("3000-a_b.box.test", "invalid_host")],
)  # fmt: skip
async def test_host_errors_never_touch_redis(
    private_redis: RedisProcess, host: str, code: str
) -> None:
    """With Redis frozen (and lookups allowed to wait 3 s for it), host errors still get
    their own codes at once: they are judged before any lookup."""
    overrides = {"redis": {"lookup_timeout_seconds": 3.0}}
    async with running_gateway(private_redis.url, overrides) as gateway:
        private_redis.pause()
        try:
            started = time.monotonic()
            response = await _get(gateway, host)
            elapsed = time.monotonic() - started
            assert response.header("X-Gateway-Error") == code
            assert response.header("X-Request-Id")
            assert elapsed < 1.0, f"a host error took {elapsed:.2f} s: it waited for Redis"
            # An upgrade refusal is judged before the lookup too.
            upgrade = await _get(
                gateway, "3000-abcdef.box.test", [("Connection", "Upgrade"), ("Upgrade", "h2c")]
            )
            assert upgrade.header("X-Gateway-Error") == "unsupported_upgrade"
        finally:
            private_redis.resume()


async def test_stale_budget_then_503_then_recovery(
    private_redis: RedisProcess, writer: RouteWriter, upstream: Upstream
) -> None:
    """Redis frozen: the cached route keeps working (within the 2 s stale budget), an
    uncached label is 503 at once; past the budget the cached one is 503 too; once Redis
    thaws, everything works again by itself."""
    overrides = {"redis": {"stale_budget_seconds": STALE_BUDGET_SECONDS}}
    async with running_gateway(private_redis.url, overrides) as gateway:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, upstream.port)
        await writer.create("coldxx01", address="127.0.0.2")
        await writer.expose("coldxx01", upstream.port)
        host = gateway.host(upstream.port, LABEL)
        cold = gateway.host(upstream.port, "coldxx")
        assert await _code(gateway, host) == "200"

        private_redis.pause()
        frozen = time.monotonic()
        try:
            assert await _code(gateway, host) == "200"  # cached, within the budget
            assert await _code(gateway, cold) == "route_store_unavailable"
            await wait_until(
                lambda: _code_is(gateway, host, "route_store_unavailable"),
                timeout=STALE_BUDGET_SECONDS + 5, interval=0.1, what="503 past the budget",
            )  # fmt: skip
            assert time.monotonic() - frozen >= STALE_BUDGET_SECONDS * 0.9
            response = await _get(gateway, host)
            assert response.status == 503
            body = json.loads(response.body)["error"]
            assert body["code"] == "route_store_unavailable"
            assert body["requestId"] == response.header("X-Request-Id")
            page = await _get(gateway, host, [("Sec-Fetch-Mode", "navigate")])
            assert page.status == 503
            assert (page.header("Content-Type") or "").startswith("text/html")
        finally:
            private_redis.resume()
        await wait_until(
            lambda: _code_is(gateway, host, "200"), timeout=10, interval=0.1,
            what="recovery after Redis thawed",
        )  # fmt: skip
        assert await _code(gateway, cold) == "200"
        # Invalidations flow again.
        await writer.close(SANDBOX, upstream.port)
        await wait_until(lambda: _code_is(gateway, host, "port_not_exposed"), timeout=2)


async def _code_is(gateway: GatewayHandle, host: str, code: str) -> bool:
    return await _code(gateway, host) == code


async def test_killed_redis_then_restart(
    private_redis: RedisProcess, writer: RouteWriter, upstream: Upstream
) -> None:
    """Redis killed (connections refused): cached routes within the budget, then 503;
    after a restart (data kept on disk) the gateway recovers by itself."""
    overrides = {"redis": {"stale_budget_seconds": STALE_BUDGET_SECONDS}}
    async with running_gateway(private_redis.url, overrides) as gateway:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, upstream.port)
        host = gateway.host(upstream.port, LABEL)
        assert await _code(gateway, host) == "200"
        private_redis.kill()
        assert await _code(gateway, host) == "200"
        await wait_until(
            lambda: _code_is(gateway, host, "route_store_unavailable"),
            timeout=STALE_BUDGET_SECONDS + 5, interval=0.1, what="503 past the budget",
        )  # fmt: skip
        await private_redis.restart()
        await wait_until(
            lambda: _code_is(gateway, host, "200"), timeout=10, interval=0.1,
            what="recovery after the restart",
        )  # fmt: skip
        await writer.pause(SANDBOX)
        await wait_until(lambda: _code_is(gateway, host, "sandbox_paused"), timeout=2)
