"""The fault relay itself: transparent by default, and each fault does what it says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest_asyncio

from tests.support.faultrelay import FaultRelay


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest_asyncio.fixture
async def relay() -> AsyncIterator[FaultRelay]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FaultRelay("127.0.0.1", port) as r:
        yield r
    server.close()
    await server.wait_closed()


async def _roundtrip(relay: FaultRelay, data: bytes, wait: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection(relay.host, relay.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait):
            return await reader.readexactly(len(data))
    finally:
        writer.close()


async def test_transparent_and_counted(relay: FaultRelay) -> None:
    """Without faults bytes pass unchanged both ways and are counted."""
    assert await _roundtrip(relay, b"x" * 100_000) == b"x" * 100_000
    assert relay.connections == 1
    assert relay.bytes_up == relay.bytes_down == 100_000


async def test_latency_and_slicing(relay: FaultRelay) -> None:
    """Latency delays each segment; slicing still delivers every byte in order."""
    relay.faults.latency_seconds = 0.2
    started = time.monotonic()
    assert await _roundtrip(relay, b"ping") == b"ping"
    assert time.monotonic() - started >= 0.4  # once each way
    relay.faults.clear()
    relay.faults.slice_bytes = 7
    payload = bytes(range(256)) * 4
    assert await _roundtrip(relay, payload) == payload


async def test_bandwidth_cap(relay: FaultRelay) -> None:
    """A 20 KB/s cap makes 10 KB take at least 0.5 s each way."""
    relay.faults.bytes_per_second = 20_000
    started = time.monotonic()
    assert await _roundtrip(relay, b"y" * 10_000) == b"y" * 10_000
    assert time.monotonic() - started >= 0.9


async def test_blackhole_keeps_the_connection_silent(relay: FaultRelay) -> None:
    """A black-holed connection is accepted and open, and nothing comes back."""
    relay.faults.blackhole = True
    reader, writer = await asyncio.open_connection(relay.host, relay.port)
    try:
        writer.write(b"hello")
        await writer.drain()
        try:
            async with asyncio.timeout(0.5):
                data = await reader.read(10)
        except TimeoutError:
            data = None
        assert data is None, "a black hole answered"
        assert relay.open_connections == 1
    finally:
        writer.close()


async def test_reset_sends_rst(relay: FaultRelay) -> None:
    """reset() aborts open connections: the client's read fails with a reset."""
    reader, writer = await asyncio.open_connection(relay.host, relay.port)
    writer.write(b"a")
    await writer.drain()
    assert await reader.readexactly(1) == b"a"
    relay.reset()
    outcome: object
    try:
        async with asyncio.timeout(5):
            outcome = await reader.read(10)
    except ConnectionResetError as exc:
        outcome = exc
    writer.close()
    assert isinstance(outcome, ConnectionResetError)


async def test_half_close_gives_eof(relay: FaultRelay) -> None:
    """half_close() shows the client an EOF on reads."""
    reader, writer = await asyncio.open_connection(relay.host, relay.port)
    writer.write(b"a")
    await writer.drain()
    assert await reader.readexactly(1) == b"a"
    relay.half_close()
    async with asyncio.timeout(5):
        assert await reader.read(10) == b""
    writer.close()
