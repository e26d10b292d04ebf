"""The oracle's own parts can fail: the recording upstream sees a smuggled request sent
straight to it, and a canary counts a connection."""

from __future__ import annotations

import asyncio

from tests.support.canaries import Canary
from tests.support.rawhttp import RawConnection
from tests.support.recording import RecordingUpstream
from tests.support.waiting import wait_until


async def test_recording_upstream_parses_a_smuggled_request_and_flags_leftovers() -> None:
    """Bytes sent straight to the upstream (no gateway): two requests, no request id, leftovers."""
    async with RecordingUpstream.start("127.0.0.2") as mirror:
        async with RawConnection.open("127.0.0.2", mirror.port) as conn:
            # What a desynced proxy would pass on: a body that hides a second request.
            await conn.send(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
                b"GET /smuggled HTTP/1.1\r\nHost: b\r\n\r\nGET /half HTTP/1.1\r\n"
            )
            await conn.read_response()
            await conn.read_response()
            await wait_until(lambda: len(mirror.requests) == 3)
        assert [r.target for r in mirror.requests] == ["/", "/smuggled", ""]
        assert all(r.header("X-Request-Id") is None for r in mirror.requests)
        await wait_until(lambda: all(c.closed for c in mirror.connections))
        assert not mirror.desync_free()


async def test_recording_upstream_records_parse_errors() -> None:
    """A malformed request is recorded as a parse error, which fails the oracle."""
    async with RecordingUpstream.start("127.0.0.2") as mirror:
        async with RawConnection.open("127.0.0.2", mirror.port) as conn:
            await conn.send(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx")
            assert await conn.closed_by_peer()
        assert mirror.connections[0].parse_error is not None
        assert not mirror.desync_free()


async def test_canary_counts_connections() -> None:
    """A canary counts every connection and the bytes sent to it."""
    async with Canary.start("127.0.0.3") as canary:
        _reader, writer = await asyncio.open_connection(canary.host, canary.port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        await writer.drain()
        await wait_until(lambda: canary.connections == 1 and bool(canary.received))
        writer.close()
        await writer.wait_closed()
    assert canary.received.startswith(b"GET /")
