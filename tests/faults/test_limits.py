"""Limits (issue 9, point 4): per-sandbox connections, big heads, slow readers, health."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import aiohttp

from gateway.routing.store import RouteWriter
from tests.faults.figures import record
from tests.soak.test_soak import _rss
from tests.support.gateway import DOMAIN, GatewayHandle, ServeProcess, route_writer
from tests.support.rawhttp import IncompleteBody, RawConnection, exchange, request_bytes
from tests.support.upstreams import Upstream
from tests.support.waiting import wait_until


async def _healthy(gateway: GatewayHandle) -> bool:
    async with (
        aiohttp.ClientSession() as http,
        http.get(gateway.admin_url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r,
    ):
        return r.status == 200


async def test_connection_limit_answers_429_and_spares_other_sandboxes(
    gateway: GatewayHandle, writer: RouteWriter, upstream: Upstream
) -> None:
    """A sandbox at its record's limit (2) gets 429 rate_limited; another sandbox is served;
    once its streams end, it is served again."""
    await writer.create("greedy01", address="127.0.0.2", limits={"connections": 2})
    await writer.expose("greedy01", upstream.port)
    await writer.create("polite01", address="127.0.0.2")
    await writer.expose("polite01", upstream.port)
    greedy = gateway.host(upstream.port, "greedy")
    polite = gateway.host(upstream.port, "polite")
    stream = request_bytes("GET", "/sse?n=0&interval_ms=50", [("Host", greedy)])
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):
            conn = await stack.enter_async_context(RawConnection.open("127.0.0.1", gateway.port))
            await conn.send(stream)
            status, *_ = await conn.read_head()
            assert status == 200
        refused = await exchange(
            "127.0.0.1", gateway.port, request_bytes("GET", "/", [("Host", greedy)])
        )
        assert refused.status == 429
        assert refused.header("X-Gateway-Error") == "rate_limited"
        started = time.monotonic()
        other = await exchange(
            "127.0.0.1", gateway.port, request_bytes("GET", "/", [("Host", polite)])
        )
        other_ms = (time.monotonic() - started) * 1000
        assert other.status == 200
        assert await _healthy(gateway)
        # A WebSocket counts too.
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{gateway.url}/ws", headers={"Host": greedy}) as ws_refused,
        ):
            assert ws_refused.status == 429
    await wait_until(
        lambda: _status_is(gateway, greedy, 200), timeout=5, interval=0.05,
        what="the sandbox served again after its streams ended",
    )  # fmt: skip
    record("connection_limit", refused_status=429, other_tenant_ms=round(other_ms, 1))


async def _status_is(gateway: GatewayHandle, host: str, status: int) -> bool:
    response = await exchange(
        "127.0.0.1", gateway.port, request_bytes("GET", "/", [("Host", host)])
    )
    return response.status == status


async def test_many_headers_are_refused_cleanly(
    gateway: GatewayHandle, writer: RouteWriter, upstream: Upstream
) -> None:
    """A head with 1,000 headers or one 64 KiB header is answered 4xx or closed, never 5xx
    or a hang; the gateway stays healthy and serves the next request."""
    await writer.create("heads001", address="127.0.0.2")
    await writer.expose("heads001", upstream.port)
    host = gateway.host(upstream.port, "heads0")
    heads = {
        "many": [("Host", host), *((f"X-H{i}", "v") for i in range(1000))],
        "huge": [("Host", host), ("X-Big", "a" * 65536)],
    }
    outcomes: dict[str, str] = {}
    for name, pairs in heads.items():
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            with contextlib.suppress(ConnectionError):
                await conn.send(request_bytes("GET", "/", pairs))
            try:
                status, *_ = await conn.read_head(wait=5)
                outcomes[name] = str(status)
            except (ConnectionError, IncompleteBody):
                outcomes[name] = "closed"
        assert outcomes[name] == "closed" or 400 <= int(outcomes[name]) < 500, outcomes
    assert await _status_is(gateway, host, 200)
    assert await _healthy(gateway)
    record("large_heads", many_headers=outcomes["many"], huge_header=outcomes["huge"])


async def test_slow_reader_keeps_the_gateway_memory_bounded(
    served: ServeProcess, redis_url: str, upstream: Upstream
) -> None:
    """A client that reads nothing while the sandbox streams 256 MiB as fast as it can:
    backpressure holds the gateway's RSS within 64 MiB of its baseline for 3 s, and its
    /healthz answers meanwhile."""
    size = 256 * 1024 * 1024
    pid = served.pid
    port = int(served.ready["listen"].rpartition(":")[2])
    admin = "http://" + served.ready["admin"]
    async with route_writer(redis_url) as writer:
        await writer.create("slowrd01", address="127.0.0.2")
        await writer.expose("slowrd01", upstream.port)
    host = f"{upstream.port}-slowrd.{DOMAIN}"
    assert (
        await exchange("127.0.0.1", port, request_bytes("GET", "/", [("Host", host)]))
    ).status == 200
    baseline = _rss(pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    peak = baseline
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        await asyncio.get_running_loop().sock_sendall(
            sock, request_bytes("GET", f"/bytes?size={size}", [("Host", host)])
        )
        async with aiohttp.ClientSession() as http:
            for _ in range(15):  # bounded: 15 samples, 0.2 s apart (the measurement window)
                peak = max(peak, _rss(pid))
                async with http.get(
                    admin + "/healthz", timeout=aiohttp.ClientTimeout(total=2)
                ) as r:
                    assert r.status == 200
                await asyncio.sleep(0.2)
        # The stream was really flowing (an error page would prove nothing).
        async with asyncio.timeout(5):
            head = await asyncio.get_running_loop().sock_recv(sock, 64)
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        sock.close()
    growth = peak - baseline
    assert growth < 64 * 1024 * 1024, f"the gateway grew {growth / 2**20:.1f} MiB"
    record("slow_reader", streamed_mib=size // 2**20, rss_growth_mib=round(growth / 2**20, 1))
