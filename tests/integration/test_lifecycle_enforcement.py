"""Lifecycle changes end open streams and WebSockets (issue 3, point 5).

After a close, pause or terminate, an open SSE stream and an open WebSocket to that port
or sandbox are torn down within 2 s (WebSockets with 1001 and a reason); another
sandbox's, and the same sandbox's other ports after a close, stay. After a resume the
same URL works again, also at a new address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import WSMsgType

from gateway.routing.store import RouteWriter
from tests.support.gateway import GatewayHandle
from tests.support.rawhttp import RawConnection, exchange, request_bytes
from tests.support.upstreams import (
    OPEN_STREAMS,
    OPEN_WEBSOCKETS,
    Upstream,
    echo_app,
    start_upstream,
)
from tests.support.waiting import wait_until

TEARDOWN_BOUND_SECONDS = 2.0
A, A_LABEL = "lifeaa01", "lifeaa"
B, B_LABEL = "lifebb01", "lifebb"


@pytest_asyncio.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


@dataclass
class Tenants:
    """Sandbox A with two ports (a1, a2) on 127.0.0.2, sandbox B (b) on 127.0.0.3."""

    a1: Upstream
    a2: Upstream
    b: Upstream


@pytest_asyncio.fixture
async def tenants(writer: RouteWriter) -> AsyncIterator[Tenants]:
    a1 = await start_upstream("127.0.0.2", echo_app("a1"))
    a2 = await start_upstream("127.0.0.2", echo_app("a2"))
    b = await start_upstream("127.0.0.3", echo_app("b"))
    try:
        await writer.create(A, address="127.0.0.2")
        await writer.expose(A, a1.port)
        await writer.expose(A, a2.port)
        await writer.create(B, address="127.0.0.3")
        await writer.expose(B, b.port)
        yield Tenants(a1, a2, b)
    finally:
        for server in (a1, a2, b):
            await server.stop()


class Stream:
    """An SSE stream through the gateway (n=0: endless), read on a raw connection."""

    def __init__(self, conn: RawConnection) -> None:
        self.conn = conn
        self.buffer = b""

    async def next_event(self, *, wait: float = 5.0) -> bytes:
        async with asyncio.timeout(wait):
            while b"\n\n" not in self.buffer:
                data = await self.conn.reader.read(65536)
                if not data:
                    raise ConnectionError("the stream ended")
                self.buffer += data
        event, self.buffer = self.buffer.split(b"\n\n", 1)
        return event

    async def ended(self, *, wait: float) -> bool:
        """Whether the connection ends (EOF or reset) within ``wait`` seconds."""
        try:
            async with asyncio.timeout(wait):
                while True:
                    try:
                        data = await self.conn.reader.read(65536)
                    except ConnectionResetError:
                        return True
                    if not data:
                        return True
        except TimeoutError:
            return False


@contextlib.asynccontextmanager
async def sse(gateway: GatewayHandle, host: str) -> AsyncIterator[Stream]:
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request_bytes("GET", "/sse?n=0&interval_ms=20", [("Host", host)]))
        status, _, _, _ = await conn.read_head()
        assert status == 200
        stream = Stream(conn)
        await stream.next_event()
        yield stream


async def _websocket(
    client: aiohttp.ClientSession, gateway: GatewayHandle, host: str
) -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws_connect(gateway.url + "/ws", headers={"Host": host})
    await ws.send_str("ping")
    assert (await ws.receive(timeout=5)).data == "ping"
    return ws


async def _assert_ws_alive(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_str("still there?")
    message = await ws.receive(timeout=5)
    assert (message.type, message.data) == (WSMsgType.TEXT, "still there?")


async def _assert_ws_going_away(ws: aiohttp.ClientWebSocketResponse, started: float) -> float:
    message = await ws.receive(timeout=TEARDOWN_BOUND_SECONDS + 1)
    elapsed = time.monotonic() - started
    assert message.type is WSMsgType.CLOSE, message
    assert message.data == 1001
    assert message.extra  # a reason is given
    return elapsed


async def _status(gateway: GatewayHandle, host: str) -> tuple[int, str | None, bytes]:
    response = await exchange(
        "127.0.0.1", gateway.port, request_bytes("GET", "/", [("Host", host)])
    )
    return response.status, response.header("X-Gateway-Error"), response.body


@pytest.mark.parametrize("operation", ["close", "pause", "terminate"])
async def test_lifecycle_change_tears_down_streams_and_websockets(
    gateway: GatewayHandle,
    writer: RouteWriter,
    tenants: Tenants,
    client: aiohttp.ClientSession,
    operation: str,
) -> None:
    """The affected port's (close) or sandbox's (pause, terminate) streams end within
    2 s, WebSockets with 1001 and a reason; everything else stays."""
    a1_host = gateway.host(tenants.a1.port, A_LABEL)
    a2_host = gateway.host(tenants.a2.port, A_LABEL)
    b_host = gateway.host(tenants.b.port, B_LABEL)
    async with (
        sse(gateway, a1_host) as a1_stream,
        sse(gateway, a2_host) as a2_stream,
        sse(gateway, b_host) as b_stream,
    ):
        a1_ws = await _websocket(client, gateway, a1_host)
        a2_ws = await _websocket(client, gateway, a2_host)
        b_ws = await _websocket(client, gateway, b_host)
        try:
            if operation == "close":
                await writer.close(A, tenants.a1.port)
            elif operation == "pause":
                await writer.pause(A)
            else:
                await writer.terminate(A)
            started = time.monotonic()

            ws_elapsed = await _assert_ws_going_away(a1_ws, started)
            assert await a1_stream.ended(wait=TEARDOWN_BOUND_SECONDS)
            stream_elapsed = time.monotonic() - started
            print(
                f"\n{operation}: WebSocket closed 1001 after {ws_elapsed * 1000:.1f} ms, "
                f"SSE stream ended after {stream_elapsed * 1000:.1f} ms"
            )
            assert max(ws_elapsed, stream_elapsed) < TEARDOWN_BOUND_SECONDS
            if operation == "close":  # the sandbox's other port lives on
                await a2_stream.next_event()
                await _assert_ws_alive(a2_ws)
            else:
                await _assert_ws_going_away(a2_ws, started)
                assert await a2_stream.ended(wait=TEARDOWN_BOUND_SECONDS)
            # The other tenant is untouched.
            await b_stream.next_event()
            await _assert_ws_alive(b_ws)
        finally:
            for ws in (a1_ws, a2_ws, b_ws):
                await ws.close()
    # The sandbox side of the torn-down exchanges ended too.
    a1_streams, a1_sockets = tenants.a1.app[OPEN_STREAMS], tenants.a1.app[OPEN_WEBSOCKETS]
    await wait_until(lambda: a1_streams.open == 0 and a1_sockets.open == 0)
    assert a1_sockets.close_codes[0] == 1001


async def test_new_requests_are_refused_after_the_change(
    gateway: GatewayHandle, writer: RouteWriter, tenants: Tenants
) -> None:
    """Close, pause and terminate answer at once with their codes."""
    a1_host = gateway.host(tenants.a1.port, A_LABEL)
    a2_host = gateway.host(tenants.a2.port, A_LABEL)
    assert (await _status(gateway, a1_host))[0] == 200
    await writer.close(A, tenants.a1.port)
    await wait_until(
        lambda: _status_is(gateway, a1_host, "port_not_exposed"), what="port_not_exposed"
    )
    assert (await _status(gateway, a2_host))[0] == 200
    await writer.pause(A)
    await wait_until(lambda: _status_is(gateway, a2_host, "sandbox_paused"), what="paused")
    await writer.terminate(A)
    await wait_until(lambda: _status_is(gateway, a2_host, "sandbox_terminated"), what="terminated")


async def _status_is(gateway: GatewayHandle, host: str, code: str) -> bool:
    _, error, _ = await _status(gateway, host)
    return error == code


async def test_resume_restores_the_same_url(
    gateway: GatewayHandle, writer: RouteWriter, tenants: Tenants
) -> None:
    host = gateway.host(tenants.a1.port, A_LABEL)
    await writer.pause(A)
    await wait_until(lambda: _status_is(gateway, host, "sandbox_paused"))
    await writer.resume(A)

    async def back() -> bool:
        status, _, body = await _status(gateway, host)
        return status == 200 and json.loads(body)["upstream"] == "a1"

    await wait_until(back, what="the URL working again after resume")


async def test_resume_at_a_new_address_moves_the_url_and_ends_old_sessions(
    gateway: GatewayHandle,
    writer: RouteWriter,
    tenants: Tenants,
    client: aiohttp.ClientSession,
) -> None:
    """Resume A at 127.0.0.3 (an upstream on the same port there): the URL reaches the
    new address; streams to the old one are ended; a pause + resume at a new address too."""
    moved = await start_upstream("127.0.0.3", echo_app("a1-moved"), port=tenants.a1.port)
    host = gateway.host(tenants.a1.port, A_LABEL)
    try:
        async with sse(gateway, host) as old_stream:
            old_ws = await _websocket(client, gateway, host)
            try:
                # A running sandbox moving (no pause in between) is a resume with an address.
                await writer.resume(A, address="127.0.0.3")
                started = time.monotonic()
                await _assert_ws_going_away(old_ws, started)
                assert await old_stream.ended(wait=TEARDOWN_BOUND_SECONDS)
            finally:
                await old_ws.close()

        async def at(name: str) -> bool:
            status, _, body = await _status(gateway, host)
            return status == 200 and json.loads(body)["upstream"] == name

        await wait_until(lambda: at("a1-moved"), what="the URL at the new address")
        await writer.pause(A)
        await writer.resume(A, address="127.0.0.2")
        await wait_until(lambda: at("a1"), what="the URL back at the old address")
        # WebSockets follow the move too.
        ws = await _websocket(client, gateway, host)
        try:
            await ws.send_str("!info")
            info = json.loads((await ws.receive(timeout=5)).data)
            assert info["upstream"] == "a1"
        finally:
            await ws.close()
    finally:
        await moved.stop()


async def test_an_unrelated_write_keeps_sessions(
    gateway: GatewayHandle, writer: RouteWriter, tenants: Tenants, client: aiohttp.ClientSession
) -> None:
    """Exposing another port of the same sandbox invalidates its label but ends nothing."""
    host = gateway.host(tenants.a1.port, A_LABEL)
    async with sse(gateway, host) as stream:
        ws = await _websocket(client, gateway, host)
        try:
            await writer.expose(A, 3000)
            await writer.pause(B)
            # Pub/sub keeps order: once B's pause is seen, A's invalidation was received.
            b_host = gateway.host(tenants.b.port, B_LABEL)
            await wait_until(lambda: _status_is(gateway, b_host, "sandbox_paused"))
            for _ in range(5):
                await stream.next_event()
            await _assert_ws_alive(ws)
        finally:
            await ws.close()
