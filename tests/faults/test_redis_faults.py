"""Redis faults (issue 9, point 2), through the fault relay or on a private redis-server.

The gateway reaches Redis through a ``FaultRelay``; the writer talks to Redis directly
(the control plane is not the gateway's path). Stale budget 2 s, heartbeat 0.2 s (four
missed beats: a black hole is noticed after about 0.8 s). Each case records its figures.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest_asyncio

from gateway.routing.store import RouteWriter
from tests.faults.figures import record
from tests.support.faultrelay import FaultRelay
from tests.support.gateway import GatewayHandle, route_writer, running_gateway
from tests.support.rawhttp import exchange, request_bytes
from tests.support.redis_proc import RedisProcess
from tests.support.upstreams import Upstream
from tests.support.waiting import wait_until

STALE_BUDGET_SECONDS = 2.0
OVERRIDES = {"redis": {"stale_budget_seconds": STALE_BUDGET_SECONDS}}
SANDBOX, LABEL = "faults01", "faults"


@pytest_asyncio.fixture
async def tcp_redis() -> AsyncIterator[RedisProcess]:
    server = await RedisProcess.start(tcp=True)
    try:
        yield server
    finally:
        await server.stop()  # thaws a paused server first


@pytest_asyncio.fixture
async def relay(tcp_redis: RedisProcess) -> AsyncIterator[FaultRelay]:
    assert tcp_redis.host is not None and tcp_redis.port is not None
    async with FaultRelay(tcp_redis.host, tcp_redis.port) as r:
        yield r


@pytest_asyncio.fixture
async def relayed_gateway(relay: FaultRelay) -> AsyncIterator[GatewayHandle]:
    async with running_gateway(f"redis://{relay.host}:{relay.port}", OVERRIDES) as handle:
        yield handle


@pytest_asyncio.fixture
async def direct_writer(
    relayed_gateway: GatewayHandle, tcp_redis: RedisProcess
) -> AsyncIterator[RouteWriter]:
    async with route_writer(tcp_redis.url) as w:
        yield w


async def _code(gateway: GatewayHandle, host: str) -> str:
    data = request_bytes("GET", "/", [("Host", host)])
    response = await exchange("127.0.0.1", gateway.port, data, wait=10)
    return response.header("X-Gateway-Error") or str(response.status)


async def _exposed(writer: RouteWriter, gateway: GatewayHandle, upstream: Upstream) -> str:
    await writer.create(SANDBOX, address="127.0.0.2")
    await writer.expose(SANDBOX, upstream.port)
    host = gateway.host(upstream.port, LABEL)
    assert await _code(gateway, host) == "200"
    return host


async def _codes_until(gateway: GatewayHandle, host: str, code: str, within: float) -> list[str]:
    """Request every 50 ms until ``code`` answers; returns every answer seen, in order."""
    seen: list[str] = []

    async def answered() -> bool:
        seen.append(await _code(gateway, host))
        return seen[-1] == code

    await wait_until(answered, timeout=within, interval=0.05, what=f"{code} from {host}")
    return seen


def _stats(gateway: GatewayHandle) -> tuple[int, int]:
    stats = gateway.running.handler._cache.stats
    return stats.stale_serves, stats.flushes


async def test_blackholed_redis_stale_budget_then_503_then_recovery(
    relay: FaultRelay, relayed_gateway: GatewayHandle, direct_writer: RouteWriter,
    upstream: Upstream,
) -> None:  # fmt: skip
    """Redis black-holed (connections kept, nothing answered): the cached route is served
    within the budget, then 503 route_store_unavailable; open the hole and it recovers,
    with the cache flushed on resubscribe."""
    gateway = relayed_gateway
    host = await _exposed(direct_writer, gateway, upstream)
    stale_before, flushes_before = _stats(gateway)
    relay.faults.blackhole = True
    started = time.monotonic()
    seen = await _codes_until(gateway, host, "route_store_unavailable", STALE_BUDGET_SECONDS + 8)
    to_503 = time.monotonic() - started
    from_cache = seen.count("200")
    assert set(seen) <= {"200", "route_store_unavailable"}, seen
    # The budget counts from the last contact, so 503 comes no sooner than about it.
    assert to_503 >= STALE_BUDGET_SECONDS * 0.5
    stale_serves = _stats(gateway)[0] - stale_before
    relay.faults.clear()
    reopened = time.monotonic()
    await _codes_until(gateway, host, "200", 15)
    to_recover = time.monotonic() - reopened
    await wait_until(lambda: _stats(gateway)[1] > flushes_before, timeout=5, what="a flush")
    # Invalidations flow again.
    await direct_writer.close(SANDBOX, upstream.port)
    await _codes_until(gateway, host, "port_not_exposed", 3)
    record(
        "redis_blackhole", seconds_to_503=round(to_503, 2), seconds_to_recover=round(to_recover, 2),
        answered_from_cache=from_cache, stale_serves=stale_serves, requests_lost=0,
    )  # fmt: skip


async def test_subscription_cut_then_close_is_never_served(
    relay: FaultRelay, relayed_gateway: GatewayHandle, direct_writer: RouteWriter,
    upstream: Upstream,
) -> None:  # fmt: skip
    """Every gateway connection to Redis reset (RST), then the port closed: once the
    close returned and the gateway answers port_not_exposed, it never serves it again."""
    gateway = relayed_gateway
    host = await _exposed(direct_writer, gateway, upstream)
    connections_before = relay.connections
    _, flushes_before = _stats(gateway)
    relay.reset()
    cut = time.monotonic()
    await direct_writer.close(SANDBOX, upstream.port)
    closed = time.monotonic()
    seen = await _codes_until(gateway, host, "port_not_exposed", 5)
    to_converge = time.monotonic() - closed
    served_after_close = seen.count("200")
    # Redis was reachable all along (only connections were cut): served at most for the
    # detection time, never past the stale budget.
    assert time.monotonic() - cut < STALE_BUDGET_SECONDS + 1
    after: list[str] = []
    for _ in range(20):  # bounded: 20 requests
        after.append(await _code(gateway, host))
    assert after == ["port_not_exposed"] * 20, after
    await wait_until(lambda: relay.connections > connections_before, timeout=5, what="reconnect")
    await wait_until(lambda: _stats(gateway)[1] > flushes_before, timeout=5, what="a flush")
    record(
        "redis_subscription_reset", seconds_to_converge=round(to_converge, 2),
        served_after_close=served_after_close, requests_lost=0,
    )  # fmt: skip


async def test_slow_redis_still_serves(
    relay: FaultRelay, relayed_gateway: GatewayHandle, direct_writer: RouteWriter,
    upstream: Upstream,
) -> None:  # fmt: skip
    """Redis 40 ms away each way (a lookup's round trips near the 250 ms lookup timeout):
    answers are only 200, a not-yet-seen sandbox or a 503, never a hang; it serves within
    5 s and invalidations still arrive."""
    gateway = relayed_gateway
    relay.faults.latency_seconds = 0.04
    await direct_writer.create(SANDBOX, address="127.0.0.2")
    await direct_writer.expose(SANDBOX, upstream.port)
    host = gateway.host(upstream.port, LABEL)
    started = time.monotonic()
    seen = await _codes_until(gateway, host, "200", 5)
    cold_ms = (time.monotonic() - started) * 1000
    assert set(seen) <= {"200", "sandbox_not_found", "route_store_unavailable"}, seen
    await direct_writer.close(SANDBOX, upstream.port)
    closed = time.monotonic()
    await _codes_until(gateway, host, "port_not_exposed", 5)
    record(
        "redis_slow_40ms", seconds_to_first_200=round(cold_ms / 1000, 2),
        store_unavailable_answers=seen.count("route_store_unavailable"),
        invalidation_seconds=round(time.monotonic() - closed, 2),
    )  # fmt: skip


async def test_redis_restarted_empty_is_never_served_from_old_cache(
    tcp_redis: RedisProcess, upstream: Upstream
) -> None:
    """Redis killed and restarted with no data: the old cached route is dropped (flush on
    resubscribe), never served past the budget; a new create serves again by itself."""
    async with running_gateway(tcp_redis.url, OVERRIDES) as gateway:
        async with route_writer(tcp_redis.url) as writer:
            host = await _exposed(writer, gateway, upstream)
        tcp_redis.kill()
        killed = time.monotonic()
        await tcp_redis.restart()  # persistence off: it comes back empty
        answers: list[str] = []

        async def not_served() -> bool:
            answers.append(await _code(gateway, host))
            return answers[-1] != "200"

        await wait_until(not_served, timeout=STALE_BUDGET_SECONDS + 8, interval=0.05)
        to_detect = time.monotonic() - killed
        assert time.monotonic() - killed < STALE_BUDGET_SECONDS + 8
        # Re-initialise the table as a control plane would (serve writes the settings).
        async with running_gateway(tcp_redis.url, OVERRIDES), route_writer(tcp_redis.url) as w:
            await w.create(SANDBOX, address="127.0.0.2")
            await w.expose(SANDBOX, upstream.port)
        recovered = time.monotonic()
        await _codes_until(gateway, host, "200", 10)
        record(
            "redis_restarted_empty", seconds_to_detect=round(to_detect, 2),
            answered_from_cache=answers.count("200"),
            seconds_to_recover=round(time.monotonic() - recovered, 2), first_code=answers[-1],
        )  # fmt: skip
