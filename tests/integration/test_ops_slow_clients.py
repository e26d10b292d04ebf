"""Slow and idle clients, and the connection cap (issue 6, point 4).

aiohttp has no header-read timeout; the listener's own closes connections whose request
head does not arrive in time (slowloris, and connections that send nothing), while idle
keep-alive time between requests is left to ``keepalive_idle_seconds``. Connections over
``max_connections`` are closed at once, and the admin listener still answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tests.integration.test_ops_drain import (
    Replica,
    replica,
    route_sandbox,
    sample,
    scrape,
    status_of,
)
from tests.support.gateway import running_gateway
from tests.support.rawhttp import RawConnection, exchange, request_bytes
from tests.support.upstreams import Upstream
from tests.support.waiting import wait_until

SANDBOX = "opsslw01"
DRIPPERS = 500
DRIP_SECONDS = 0.2
HEADER_TIMEOUT_SECONDS = 1.0
# A normal request must not wait behind the drippers for longer than this.
PROMPT_SECONDS = 0.5


@pytest.fixture(autouse=True, scope="module")
def _enough_file_descriptors() -> None:
    """500 client sockets here, 500 more in the gateway (a child inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * DRIPPERS + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest_asyncio.fixture
async def gateway(redis: aioredis.Redis, redis_url: str) -> AsyncIterator[Replica]:
    """``gateway serve`` as its own process (the drippers must not share its loop)."""
    env = {
        "GATEWAY_SERVER__HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT_SECONDS),
        "GATEWAY_ACCESS_LOG__ENABLED": "false",
    }
    async with replica(redis_url, env=env) as running:
        yield running


async def _drip(port: int, host: str, lifetimes: list[float], answers: list[bytes]) -> None:
    """Send a request head one byte every DRIP_SECONDS until the gateway hangs up."""
    head = f"GET /drip HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode() + b"a" * 1000
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened = time.monotonic()
    received = b""
    try:
        for index in range(len(head)):
            writer.write(head[index : index + 1])
            try:
                received = await asyncio.wait_for(reader.read(65536), DRIP_SECONDS)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            break  # b"" (closed) or an answer: either way the gateway acted
    finally:
        lifetimes.append(time.monotonic() - opened)
        answers.append(received)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_slowloris_is_closed_and_does_not_stop_normal_requests(
    gateway: Replica, redis_url: str, upstream: Upstream
) -> None:
    """500 dripping connections: normal requests answer promptly; all drips closed in time."""
    host = await route_sandbox(redis_url, SANDBOX, upstream)
    before = sample(await scrape(gateway.admin_url), "gateway_header_timeouts_total")
    lifetimes: list[float] = []
    answers: list[bytes] = []
    drips = [asyncio.ensure_future(_drip(gateway.port, host, lifetimes, answers))
             for _ in range(DRIPPERS)]  # fmt: skip
    try:
        await wait_until(
            lambda: _connections_at_least(gateway.admin_url, DRIPPERS),
            timeout=5, interval=0.05, what="all drippers connected",
        )  # fmt: skip
        # While they drip, ordinary clients are served as usual.
        slowest = 0.0
        normal = 0
        while not any(d.done() for d in drips):
            started = time.monotonic()
            answer = await exchange(
                "127.0.0.1", gateway.port, request_bytes("GET", "/normal", [("Host", host)])
            )
            slowest = max(slowest, time.monotonic() - started)
            assert answer.status == 200
            normal += 1
        assert normal >= 3
        assert slowest < PROMPT_SECONDS, slowest
        async with asyncio.timeout(HEADER_TIMEOUT_SECONDS + 5):
            await asyncio.gather(*drips)
    finally:
        for drip in drips:
            drip.cancel()
        await asyncio.gather(*drips, return_exceptions=True)
    assert len(lifetimes) == DRIPPERS
    assert set(answers) == {b""}  # closed without an answer
    # Measured from when this loop saw the connect, which may lag the accept a little.
    assert min(lifetimes) >= HEADER_TIMEOUT_SECONDS * 0.7
    assert max(lifetimes) < HEADER_TIMEOUT_SECONDS + 2.0, max(lifetimes)
    samples = await scrape(gateway.admin_url)
    assert sample(samples, "gateway_header_timeouts_total") - before >= DRIPPERS
    print(
        f"slowloris: {DRIPPERS} drips closed after {min(lifetimes):.2f}-{max(lifetimes):.2f} s; "
        f"{normal} normal requests meanwhile, slowest {slowest * 1000:.0f} ms"
    )


async def _connections_at_least(admin_url: str, count: int) -> bool:
    return sample(await scrape(admin_url), "gateway_connections") >= count


async def test_silent_connection_is_closed_by_the_header_timeout(gateway: Replica) -> None:
    """A connection that never sends a byte is closed after the header timeout too."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        started = time.monotonic()
        assert await conn.read_until_close(wait=HEADER_TIMEOUT_SECONDS + 2) == b""
        waited = time.monotonic() - started
    assert HEADER_TIMEOUT_SECONDS - 0.1 <= waited < HEADER_TIMEOUT_SECONDS + 1.0


async def test_idle_keep_alive_is_not_cut_by_the_header_timer(
    gateway: Replica, redis_url: str, upstream: Upstream
) -> None:
    """Idle 2 s between requests with a 1 s header timeout: the connection still works."""
    host = await route_sandbox(redis_url, SANDBOX, upstream)
    request = request_bytes("GET", "/again", [("Host", host)])
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request)
        assert (await conn.read_response()).status == 200
        assert not await conn.closed_by_peer(wait=2 * HEADER_TIMEOUT_SECONDS)
        await conn.send(request)
        assert (await conn.read_response()).status == 200


async def test_slow_body_is_not_cut_by_the_header_timer(
    gateway: Replica, redis_url: str, upstream: Upstream
) -> None:
    """Once the head is in, a body may take longer than the header timeout."""
    host = await route_sandbox(redis_url, SANDBOX, upstream)
    body = b"0123456789"
    head = request_bytes("POST", "/upload", [("Host", host), ("Content-Length", str(len(body)))])
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(head)
        for index in range(len(body)):
            assert not await conn.closed_by_peer(wait=0.2)  # paces the body: 2 s in all
            await conn.send(body[index : index + 1])
        answer = await conn.read_response()
    assert answer.status == 200
    assert b'"length": 10' in answer.body


async def test_connection_cap(redis: aioredis.Redis, redis_url: str, upstream: Upstream) -> None:
    """max_connections 5: the 6th connection is closed; the admin listener still answers."""
    async with running_gateway(redis_url, {"server": {"max_connections": 5}}) as gateway:
        host = await route_sandbox(redis_url, SANDBOX, upstream)
        request = request_bytes("GET", "/capped", [("Host", host)])
        async with contextlib.AsyncExitStack() as stack:
            held = [
                await stack.enter_async_context(RawConnection.open("127.0.0.1", gateway.port))
                for _ in range(5)
            ]
            for conn in held:
                await conn.send(request)
                assert (await conn.read_response()).status == 200
            async with RawConnection.open("127.0.0.1", gateway.port) as sixth:
                with contextlib.suppress(ConnectionError):
                    await sixth.send(request)
                assert await sixth.read_until_close(wait=2) == b""
            assert await status_of(gateway.admin_url + "/healthz") == 200
            samples = await scrape(gateway.admin_url)
            assert sample(samples, "gateway_connections_refused_total") == 1
            assert sample(samples, "gateway_connections") == 5
            # One leaves: a newcomer is served again.
            await held[0].close()

            async def served() -> bool:
                try:
                    answer = await exchange("127.0.0.1", gateway.port, request, wait=1)
                except (ConnectionError, TimeoutError, OSError):
                    return False
                return answer.status == 200

            await wait_until(served, timeout=3, what="a connection slot freed")
