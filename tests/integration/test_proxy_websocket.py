"""WebSockets through the gateway to real upstreams (issue 3, point 4).

The sandbox handshake comes first and the client is accepted with the sandbox's chosen
subprotocol; a refusal is a plain HTTP answer. Frames (text, binary, ping, pong, close
with code and reason) are relayed both ways; 1005/1006 never go on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import WSMsgType, web
from yarl import URL

from gateway.proxy import websocket
from gateway.routing import model
from gateway.routing.store import RouteWriter
from tests.support.gateway import GatewayHandle, route_writer, running_gateway
from tests.support.rawhttp import RawConnection, request_bytes
from tests.support.upstreams import (
    OPEN_WEBSOCKETS,
    Upstream,
    start_upstream,
)
from tests.support.waiting import wait_until

SANDBOX = "wssbox01"
LABEL = "wssbox"
LIMIT = 65536


@pytest_asyncio.fixture
async def special() -> AsyncIterator[Upstream]:
    server = await start_upstream("127.0.0.2", _special_app())
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def special_host(
    writer: RouteWriter, host: str, special: Upstream, gateway: GatewayHandle
) -> str:
    """The special upstream's public host (same sandbox, another port)."""
    await writer.expose(SANDBOX, special.port)
    return gateway.host(special.port, LABEL)


SANDBOX_PONGS = web.AppKey("sandbox_pongs", list[bytes])
SANDBOX_CLOSES = web.AppKey("sandbox_closes", list[tuple[int | None, str]])


def _special_app() -> web.Application:
    """Sandbox behaviours the echo app lacks (served on a second port of the sandbox):

    /ws-ping   pings the client with a payload and reports the pong's payload as text
    /ws-die    on any message, drops the TCP connection without a close frame
    /ws-big    sends one text message of ``size`` bytes, then echoes
    /ws-codes  records the close code and reason it receives
    """
    app = web.Application()
    app[SANDBOX_PONGS] = []
    app[SANDBOX_CLOSES] = []

    async def ping(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await ws.ping(b"from-sandbox")
        async for message in ws:
            if message.type is WSMsgType.PONG:
                request.app[SANDBOX_PONGS].append(message.data)
                await ws.send_str(f"pong:{message.data.decode()}")
        return ws

    async def die(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        assert request.transport is not None
        request.transport.abort()
        return ws

    async def big(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        await ws.send_str("x" * int(request.query["size"]))
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
        request.app[SANDBOX_CLOSES].append((ws.close_code, ""))
        return ws

    async def codes(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoclose=False)
        await ws.prepare(request)
        while True:
            message = await ws.receive()
            if message.type is WSMsgType.CLOSE:
                request.app[SANDBOX_CLOSES].append((message.data, message.extra or ""))
                await ws.close(code=message.data, message=(message.extra or "").encode())
                break
            if message.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
                request.app[SANDBOX_CLOSES].append((ws.close_code, "error"))
                break
        return ws

    app.router.add_get("/ws-ping", ping)
    app.router.add_get("/ws-die", die)
    app.router.add_get("/ws-big", big)
    app.router.add_get("/ws-codes", codes)
    return app


async def _connect(
    client: aiohttp.ClientSession, gateway: GatewayHandle, host: str, path: str = "/ws", **kw: Any
) -> aiohttp.ClientWebSocketResponse:
    headers = {"Host": host, **kw.pop("headers", {})}
    ws: aiohttp.ClientWebSocketResponse = await client.ws_connect(
        gateway.url + path, headers=headers, **kw
    )
    return ws


async def _info(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    await ws.send_str("!info")
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.TEXT
    data: dict[str, Any] = json.loads(message.data)
    return data


# ---------------------------------------------------------------------------------------
# Handshake
# ---------------------------------------------------------------------------------------


async def test_subprotocol_is_the_sandboxs_choice(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """The client is accepted with the protocol the sandbox picked from the client's list."""
    ws = await _connect(client, gateway, host, protocols=("nope", "superchat", "chat"))
    try:
        assert ws.protocol == "superchat"
        assert (await _info(ws))["protocol"] == "superchat"
    finally:
        await ws.close()


async def test_no_subprotocol_when_the_sandbox_picks_none(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    ws = await _connect(client, gateway, host, protocols=("nope",))
    try:
        assert ws.protocol is None
        assert (await _info(ws))["protocol"] is None
    finally:
        await ws.close()


async def test_handshake_headers_reach_the_sandbox(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """Cookie, Origin and Authorization pass; the public Host too; the path is raw."""
    # encoded=True: aiohttp's client would turn %2a into * otherwise.
    ws = await client.ws_connect(
        URL(f"{gateway.url}/ws?x=%2a", encoded=True),
        headers={"Host": host, "Cookie": "sid=1", "Origin": "https://app.example",
                 "Authorization": "Bearer t"},
    )  # fmt: skip
    try:
        info = await _info(ws)
    finally:
        await ws.close()
    headers = {k.lower(): v for k, v in info["headers"]}
    assert headers["cookie"] == "sid=1"
    assert headers["origin"] == "https://app.example"
    assert headers["authorization"] == "Bearer t"
    assert headers["host"] == host
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert info["path_qs"] == "/ws?x=%2a"


def _upgrade_request(host: str, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return request_bytes("GET", path, [
        ("Host", host), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13"),
    ])  # fmt: skip


async def test_refused_upstream_handshake_is_a_plain_http_answer(
    gateway: GatewayHandle, host: str
) -> None:
    """/ws-reject answers 403 to the upgrade: the client gets that 403, never a 101."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(_upgrade_request(host, "/ws-reject"))
        response = await conn.read_response(keep_interim=True)
    assert response.status == 403
    assert response.header("Upgrade") is None
    assert b"refused" in response.body


async def test_websocket_to_nothing_listening_is_upstream_refused(
    gateway: GatewayHandle, writer: RouteWriter
) -> None:
    """No server behind the port: 502 upstream_refused before any 101."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    await writer.create(SANDBOX, address="127.0.0.2")
    await writer.expose(SANDBOX, port)
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(_upgrade_request(gateway.host(port, LABEL), "/ws"))
        response = await conn.read_response(keep_interim=True)
    assert response.status == 502
    assert response.header("X-Gateway-Error") == "upstream_refused"


# ---------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------


async def test_text_and_binary_round_trip(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    ws = await _connect(client, gateway, host)
    try:
        await ws.send_str("héllo")
        assert (await ws.receive(timeout=5)).data == "héllo"
        await ws.send_bytes(b"\x00\x01\xffbinary")
        message = await ws.receive(timeout=5)
        assert message.type is WSMsgType.BINARY
        assert message.data == b"\x00\x01\xffbinary"
    finally:
        await ws.close()


async def test_one_mib_frames_pass(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """Frames far above a small limit but under the configured one pass intact."""
    payload = os.urandom(1024 * 1024)
    ws = await _connect(client, gateway, host, max_msg_size=0)
    try:
        await ws.send_bytes(payload)
        message = await ws.receive(timeout=10)
        assert message.type is WSMsgType.BINARY
        assert message.data == payload
    finally:
        await ws.close()


async def test_client_ping_payload_reaches_the_sandbox_and_its_pong_comes_back(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """A client ping is relayed with its payload; the sandbox's pong comes back with it."""
    ws = await _connect(client, gateway, host, autoping=False)
    try:
        await ws.ping(b"client-ping")
        message = await ws.receive(timeout=5)
        assert message.type is WSMsgType.PONG
        assert message.data == b"client-ping"
    finally:
        await ws.close()


async def test_sandbox_ping_reaches_the_client_and_the_pong_goes_back(
    gateway: GatewayHandle, special_host: str, special: Upstream, client: aiohttp.ClientSession
) -> None:
    ws = await _connect(client, gateway, special_host, "/ws-ping", autoping=False)
    try:
        message = await ws.receive(timeout=5)
        assert message.type is WSMsgType.PING
        assert message.data == b"from-sandbox"
        await ws.pong(b"client-pong")
        reply = await ws.receive(timeout=5)
        assert reply.data == "pong:client-pong"
    finally:
        await ws.close()
    assert special.app[SANDBOX_PONGS] == [b"client-pong"]


# ---------------------------------------------------------------------------------------
# Close codes
# ---------------------------------------------------------------------------------------


async def test_sandbox_close_code_and_reason_reach_the_client(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """The sandbox closes with 4001 "done": the client sees exactly that."""
    ws = await _connect(client, gateway, host)
    await ws.send_str("close:4001:done")
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.CLOSE
    assert (message.data, message.extra) == (4001, "done")
    await ws.close()
    assert ws.close_code == 4001


async def test_client_close_code_and_reason_reach_the_sandbox(
    gateway: GatewayHandle, special_host: str, special: Upstream, client: aiohttp.ClientSession
) -> None:
    """The client closes with 4002 "bye": the sandbox sees it, and echoes it back."""
    ws = await _connect(client, gateway, special_host, "/ws-codes")
    await ws.close(code=4002, message=b"bye")
    assert ws.close_code == 4002
    await wait_until(lambda: special.app[SANDBOX_CLOSES] == [(4002, "bye")])


async def test_client_close_code_reaches_the_echo(
    gateway: GatewayHandle, host: str, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    stats = upstream.app[OPEN_WEBSOCKETS]
    ws = await _connect(client, gateway, host)
    await ws.close(code=4002, message=b"bye")
    await wait_until(lambda: stats.close_codes == [4002])


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def test_close_without_a_code_reaches_the_sandbox_as_1000(
    gateway: GatewayHandle, special_host: str, special: Upstream
) -> None:
    """An empty close frame (1005, "no status") from the client becomes 1000 upstream."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(_upgrade_request(special_host, "/ws-codes"))
        status, _, _, _ = await conn.read_head()
        assert status == 101
        await conn.send(_masked_frame(0x8, b""))
        # The gateway answers with a close frame of its own, then ends the connection.
        data = await conn.read_until_close()
    assert data[:1] == b"\x88"
    await wait_until(lambda: len(special.app[SANDBOX_CLOSES]) == 1)
    code, _ = special.app[SANDBOX_CLOSES][0]
    assert code == 1000


async def test_sandbox_tcp_death_reaches_the_client_as_1011(
    gateway: GatewayHandle, special_host: str, client: aiohttp.ClientSession
) -> None:
    """The sandbox drops TCP without a close frame (1006): the client gets 1011."""
    ws = await _connect(client, gateway, special_host, "/ws-die")
    await ws.send_str("now")
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.CLOSE
    assert message.data == 1011
    await ws.close()


async def test_client_tcp_death_reaches_the_sandbox_as_1011(
    gateway: GatewayHandle, special_host: str, special: Upstream
) -> None:
    """The client drops TCP without a close frame: the sandbox gets a close (never 1006
    on the wire)."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(_upgrade_request(special_host, "/ws-codes"))
        status, _, _, _ = await conn.read_head()
        assert status == 101
        conn.writer.transport.abort()
    await wait_until(lambda: len(special.app[SANDBOX_CLOSES]) == 1)
    code, _ = special.app[SANDBOX_CLOSES][0]
    assert code not in (1005, 1006)


# ---------------------------------------------------------------------------------------
# Message size limit
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limited:
    """A gateway with a small message limit; hosts of the echo and the special upstream."""

    gateway: GatewayHandle
    host: str
    special_host: str


@pytest_asyncio.fixture
async def limited(
    redis: aioredis.Redis, redis_url: str, upstream: Upstream, special: Upstream
) -> AsyncIterator[Limited]:
    overrides = {"upstream": {"websocket_max_message_bytes": LIMIT}}
    async with (
        running_gateway(redis_url, overrides) as gateway,
        route_writer(redis_url) as writer,
    ):
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, upstream.port)
        await writer.expose(SANDBOX, special.port)
        yield Limited(
            gateway, gateway.host(upstream.port, LABEL), gateway.host(special.port, LABEL)
        )


async def test_client_message_over_the_limit_closes_with_1009(
    limited: Limited, special: Upstream, client: aiohttp.ClientSession
) -> None:
    """A client message above websocket_max_message_bytes: 1009 to the client and the
    sandbox."""
    ws = await _connect(client, limited.gateway, limited.special_host, "/ws-codes")
    await ws.send_bytes(b"x" * (LIMIT + 1))
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.CLOSE
    assert message.data == 1009
    await ws.close()
    await wait_until(lambda: len(special.app[SANDBOX_CLOSES]) == 1)
    assert special.app[SANDBOX_CLOSES][0][0] == 1009


async def test_sandbox_message_over_the_limit_closes_with_1009(
    limited: Limited, client: aiohttp.ClientSession
) -> None:
    """A sandbox message above the limit: 1009 to the client (and to the sandbox)."""
    ws = await _connect(
        client, limited.gateway, limited.special_host, f"/ws-big?size={LIMIT + 1}",
        max_msg_size=0,
    )  # fmt: skip
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.CLOSE
    assert message.data == 1009
    await ws.close()


async def test_messages_at_the_limit_pass(limited: Limited, client: aiohttp.ClientSession) -> None:
    ws = await _connect(client, limited.gateway, limited.host)
    try:
        await ws.send_bytes(b"y" * LIMIT)
        message = await ws.receive(timeout=5)
        assert message.type is WSMsgType.BINARY and len(message.data) == LIMIT
    finally:
        await ws.close()


@pytest.mark.parametrize("count", [200])
async def test_many_messages_keep_their_order(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession, count: int
) -> None:
    ws = await _connect(client, gateway, host)
    try:
        for index in range(count):
            await ws.send_str(f"m{index}")
        received = [(await ws.receive(timeout=5)).data for _ in range(count)]
    finally:
        await ws.close()
    assert received == [f"m{index}" for index in range(count)]


async def test_websocket_session_is_torn_down_upstream_when_the_client_leaves(
    gateway: GatewayHandle, host: str, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    stats = upstream.app[OPEN_WEBSOCKETS]
    ws = await _connect(client, gateway, host)
    await ws.send_str("hi")
    await ws.receive(timeout=5)
    assert stats.open == 1
    await ws.close()
    await wait_until(lambda: stats.open == 0)


async def _read_frame(conn: RawConnection) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    first, second = await conn.reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(await conn.reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await conn.reader.readexactly(8), "big")
    return first & 0x0F, await conn.reader.readexactly(length)


async def test_gateway_adds_no_headers_of_its_own_to_the_handshake(
    gateway: GatewayHandle, host: str
) -> None:
    """A bare handshake reaches the sandbox without User-Agent/Accept/Accept-Encoding
    that the client never sent."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(_upgrade_request(host, "/ws"))
        status, _, _, _ = await conn.read_head()
        assert status == 101
        await conn.send(_masked_frame(0x1, b"!info"))
        opcode, payload = await _read_frame(conn)
        await conn.send(_masked_frame(0x8, (1000).to_bytes(2, "big")))
        await conn.read_until_close()
    assert opcode == 0x1
    names = {k.lower() for k, _ in json.loads(payload)["headers"]}
    assert not names & {"user-agent", "accept", "accept-encoding"}


async def test_refused_upgrade_keeps_the_sandboxs_headers(
    gateway: GatewayHandle, writer: RouteWriter
) -> None:
    """A sandbox redirecting the upgrade to a login page: the 302 and its Location come
    back, with the gateway's request id."""
    app = web.Application()

    async def login(request: web.Request) -> web.Response:
        raise web.HTTPFound("/login", headers={"X-Sandbox": "yes"})

    app.router.add_get("/ws", login)
    server = await start_upstream("127.0.0.2", app)
    try:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, server.port)
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(_upgrade_request(gateway.host(server.port, LABEL), "/ws"))
            response = await conn.read_response(keep_interim=True)
    finally:
        await server.stop()
    assert response.status == 302
    assert response.header("Location") == "/login"
    assert response.header("X-Sandbox") == "yes"
    assert response.header("X-Request-Id")


async def test_silent_sandbox_handshake_times_out(redis: aioredis.Redis, redis_url: str) -> None:
    """A sandbox that accepts TCP but never answers the upgrade: 504, not a hang."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]
    overrides = {"upstream": {"response_timeout_seconds": 0.3}}
    try:
        async with (
            running_gateway(redis_url, overrides) as gateway,
            route_writer(redis_url) as writer,
        ):
            await writer.create(SANDBOX, address="127.0.0.2")
            await writer.expose(SANDBOX, port)
            async with RawConnection.open("127.0.0.1", gateway.port) as conn:
                await conn.send(_upgrade_request(gateway.host(port, LABEL), "/ws"))
                response = await conn.read_response(keep_interim=True)
    finally:
        server.close()
        await server.wait_closed()
    assert response.status == 504
    assert response.header("X-Gateway-Error") == "upstream_timeout"


async def test_new_client_session_refuses_redirects_and_adds_no_headers() -> None:
    """The proxy-configured client (what the gateway should hold): a 302 answer to the
    upgrade is returned, not followed, and a handshake carries only what was passed."""
    seen: list[tuple[str, dict[str, str]]] = []
    app = web.Application()

    async def login(request: web.Request) -> web.Response:
        seen.append((request.path, dict(request.headers)))
        raise web.HTTPFound("/elsewhere", headers={"X-Sandbox": "yes"})

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append((request.path, dict(request.headers)))
        return web.Response(text="followed")

    app.router.add_get("/ws", login)
    app.router.add_get("/elsewhere", elsewhere)
    server = await start_upstream("127.0.0.2", app)
    target = model.Upstream(
        address="127.0.0.2", port=server.port, incarnation="i", host_rewrite=False
    )
    session = websocket.new_client_session(connect_seconds=1.0)
    try:
        answer = await websocket.open_sandbox_socket(
            session, target, "/ws", [("Host", "h"), ("Cookie", "c=1")], protocols=[],
            max_message_bytes=0, connect_seconds=1.0, response_seconds=5.0,
        )  # fmt: skip
    finally:
        await session.close()
        await server.stop()
    assert isinstance(answer, web.Response)
    assert answer.status == 302
    assert answer.headers["Location"] == "/elsewhere"
    assert answer.headers["X-Sandbox"] == "yes"
    assert [path for path, _ in seen] == ["/ws"]
    names = {k.lower() for k in seen[0][1]}
    assert not names & {"user-agent", "accept", "accept-encoding"}


async def test_a_client_close_is_answered_with_its_own_code_and_reason(
    gateway: GatewayHandle, host: str, upstream: Upstream
) -> None:
    """RFC 6455 section 5.5.1: the close frame answering the client's echoes its code and
    reason (the standard echo itself answers 1000; the gateway answers for it)."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(_upgrade_request(host, "/ws"))
        status, _, _, _ = await conn.read_head()
        assert status == 101
        await conn.send(_masked_frame(0x8, (4000).to_bytes(2, "big") + b"bye"))
        opcode, payload = await _read_frame(conn)
    assert (opcode, payload) == (0x8, (4000).to_bytes(2, "big") + b"bye")
    await wait_until(lambda: upstream.app[OPEN_WEBSOCKETS].close_codes == [4000])


async def test_the_client_gets_its_101_only_after_the_sandbox_accepted(
    gateway: GatewayHandle, writer: RouteWriter
) -> None:
    """The sandbox holds its handshake answer: the client hears nothing meanwhile, and
    gets the 101 (with the sandbox's protocol) once the sandbox accepted."""
    accept = asyncio.Event()
    ended: list[int | None] = []
    app = web.Application()

    async def held(request: web.Request) -> web.WebSocketResponse:
        await accept.wait()
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for _ in ws:
            pass
        ended.append(ws.close_code)
        return ws

    app.router.add_get("/ws", held)
    server = await start_upstream("127.0.0.2", app)
    try:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, server.port)
        request = _upgrade_request(gateway.host(server.port, LABEL), "/ws")
        request = request.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: chat\r\n\r\n", 1)
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(request)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await conn.reader.read(1)  # nothing before the sandbox accepts
            accept.set()
            status, _, headers, _ = await conn.read_head()
            await conn.send(_masked_frame(0x8, (1000).to_bytes(2, "big")))
        await wait_until(lambda: ended == [1000], what="the sandbox to see the close")
    finally:
        await server.stop()
    assert status == 101
    assert dict((k.lower(), v) for k, v in headers)["sec-websocket-protocol"] == "chat"
