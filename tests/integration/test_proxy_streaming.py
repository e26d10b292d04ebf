"""Streaming through the gateway: large bodies both ways, SSE and chunked as produced,
and a client that leaves cancelling the upstream request (issue 3, point 3).

Memory is the test process's VmRSS (gateway, upstream and client all run in it): a
gateway that buffered a body would grow by the body's size.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from gateway.routing.store import RouteWriter
from tests.support.gateway import GatewayHandle
from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.upstreams import (
    OPEN_STREAMS,
    Upstream,
    deterministic_chunks,
    expected_sha256,
    start_upstream,
)
from tests.support.waiting import wait_until

SANDBOX = "streamaa01"
LABEL = "stream"
MIB = 1024 * 1024
RSS_GROWTH_LIMIT = 64 * MIB


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# ---------------------------------------------------------------------------------------
# Large bodies
# ---------------------------------------------------------------------------------------


async def test_256_mib_download_checksum_and_flat_memory(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """256 MiB arrive intact with their Content-Length, and memory stays flat meanwhile."""
    size = 256 * MIB
    digest = hashlib.sha256()
    received = 0
    before = peak = _rss_bytes()
    async with client.get(f"{gateway.url}/bytes?size={size}", headers={"Host": host}) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(size)
        chunks = 0
        async for chunk in response.content.iter_any():
            digest.update(chunk)
            received += len(chunk)
            chunks += 1
            if chunks % 64 == 0:
                peak = max(peak, _rss_bytes())
    peak = max(peak, _rss_bytes())
    assert received == size
    assert digest.hexdigest() == expected_sha256(size)
    assert peak - before < RSS_GROWTH_LIMIT, f"RSS grew by {(peak - before) / MIB:.1f} MiB"


async def test_64_mib_streamed_upload_checksum_and_flat_memory(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """A 64 MiB upload with Content-Length streams to the sandbox intact, memory flat."""
    size = 64 * MIB
    before = _rss_bytes()
    peaks = [before]

    async def body() -> AsyncIterator[bytes]:
        for index, chunk in enumerate(deterministic_chunks(size)):
            if index % 64 == 0:
                peaks.append(_rss_bytes())
            yield chunk

    async with client.post(
        f"{gateway.url}/upload", data=body(),
        headers={"Host": host, "Content-Length": str(size)},
    ) as response:  # fmt: skip
        assert response.status == 200
        info = await response.json()
    assert info == {"sha256": expected_sha256(size), "length": size}
    growth = max(peaks) - before
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / MIB:.1f} MiB"


async def test_chunked_streamed_upload(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """An upload with no length (chunked from the client) arrives whole."""
    size = 8 * MIB + 123

    async def body() -> AsyncIterator[bytes]:
        for chunk in deterministic_chunks(size, chunk_size=10_000):
            yield chunk

    async with client.post(
        f"{gateway.url}/upload", data=body(), headers={"Host": host}
    ) as response:
        info = await response.json()
    assert info == {"sha256": expected_sha256(size), "length": size}


# ---------------------------------------------------------------------------------------
# Delivered as produced
# ---------------------------------------------------------------------------------------


STEPS = web.AppKey("steps", list[asyncio.Event])


def _lockstep_app(count: int) -> web.Application:
    """Sends event i, then waits until the test says it received event i, then sends i+1.

    A gateway that held bytes back would deadlock this exchange (and the test's bounded
    read fails), so passing proves each event was delivered before the next existed.
    """
    app = web.Application()
    app[STEPS] = [asyncio.Event() for _ in range(count)]

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        steps: list[asyncio.Event] = request.app[STEPS]
        for index, step in enumerate(steps):
            await response.write(f"data: event {index}\n\n".encode())
            await step.wait()
        await response.write_eof()
        return response

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        steps: list[asyncio.Event] = request.app[STEPS]
        for index, step in enumerate(steps):
            await response.write(f"line {index}\n".encode())
            await step.wait()
        await response.write_eof()
        return response

    app.router.add_get("/sse", sse)
    app.router.add_get("/chunked", chunked)
    return app


async def _lockstep(
    gateway: GatewayHandle, writer: RouteWriter, path: str, separator: bytes, template: str
) -> None:
    count = 4
    server = await start_upstream("127.0.0.2", _lockstep_app(count))
    try:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, server.port)
        steps = server.app[STEPS]
        host = gateway.host(server.port, LABEL)
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(request_bytes("GET", path, [("Host", host)]))
            status, _, _, _ = await conn.read_head()
            assert status == 200
            buffer = b""
            for index in range(count):
                expected = template.format(index).encode()
                async with asyncio.timeout(5):
                    while expected not in buffer:
                        data = await conn.reader.read(65536)
                        assert data, "the stream ended early"
                        buffer += data
                # The next event does not exist yet: it is written after this set().
                assert template.format(index + 1).encode() not in buffer
                steps[index].set()
    finally:
        await server.stop()


async def test_sse_events_arrive_as_produced(gateway: GatewayHandle, writer: RouteWriter) -> None:
    """Each SSE event reaches the client before the sandbox writes the next one."""
    await _lockstep(gateway, writer, "/sse", b"\n\n", "data: event {}\n\n")


async def test_chunked_response_arrives_as_produced(
    gateway: GatewayHandle, writer: RouteWriter
) -> None:
    """Each chunk of a chunked response reaches the client before the next is written."""
    await _lockstep(gateway, writer, "/chunked", b"\n", "line {}\n")


async def test_sse_stream_with_interval_is_read_incrementally(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """The echo's SSE stream (n events, interval_ms apart) arrives event by event."""
    events: list[bytes] = []
    async with client.get(
        f"{gateway.url}/sse?n=5&interval_ms=20", headers={"Host": host}
    ) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        buffer = b""
        async for chunk in response.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                events.append(event)
    assert events == [f"id: {i}\ndata: event {i}".encode() for i in range(5)]


async def test_client_disconnect_cancels_the_upstream_request(
    gateway: GatewayHandle, host: str, upstream: Upstream
) -> None:
    """Abandoning an endless SSE stream ends the sandbox's handler too."""
    stats = upstream.app[OPEN_STREAMS]
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request_bytes("GET", "/sse?n=0&interval_ms=20", [("Host", host)]))
        status, _, _, _ = await conn.read_head()
        assert status == 200
        await conn.reader.readuntil(b"\n\n")
        assert stats.open == 1
    await wait_until(lambda: stats.cancelled == 1, what="the upstream SSE handler cancelled")
    assert stats.open == 0
