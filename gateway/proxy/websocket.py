"""Relay a WebSocket between a client and a sandbox.

Order matters (DESIGN.md section 7): the sandbox handshake completes first; only then is
the client accepted, with the subprotocol the sandbox chose. A sandbox that refuses the
upgrade is answered as an ordinary HTTP response (its own status), never as a 101
followed by a close.

Messages are relayed one by one: text (as bytes, never decoded), binary, ping and pong
with their payloads, and close frames with their codes and reasons. Codes that must not
go on the wire (1005 "no status", 1006 "abnormal", 1015 "TLS") are mapped to 1000 or
1011. The client side is read only in the handler task (aiohttp's rule); the sandbox
side in a child task.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Literal

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp._websocket.models import WSMessageNoDecodeText
from yarl import URL

from gateway import errors
from gateway.proxy.accounting import RequestRecord
from gateway.routing.model import Upstream

GOING_AWAY = 1001
SandboxSocket = aiohttp.ClientWebSocketResponse[Literal[False]]
_HANDSHAKE_HEADERS = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)


@dataclass(slots=True)
class WebSocketSession:
    """A live relay; ``close_going_away`` ends it from outside (lifecycle, drain)."""

    client: web.WebSocketResponse
    sandbox: SandboxSocket

    async def close_going_away(self, reason: str) -> None:
        message = reason.encode()[:120]  # a close reason must fit one control frame
        with contextlib.suppress(Exception):
            await self.sandbox.close(code=GOING_AWAY, message=message)
        with contextlib.suppress(Exception):
            await self.client.close(code=GOING_AWAY, message=message)


def wire_code(code: int | None) -> int:
    """A close code that may be sent: absent -> 1000; 1005/1006/1015 -> 1011 or 1000."""
    if code is None or code in (0, 1005):
        return 1000
    if code in (1006, 1015):
        return 1011
    return code


async def open_sandbox_socket(
    session: aiohttp.ClientSession,
    target: Upstream,
    path: str,
    upstream_headers: list[tuple[str, str]],
    *,
    protocols: list[str],
    max_message_bytes: int,
    connect_seconds: float,
) -> SandboxSocket | web.Response:
    """The sandbox's side of the socket, or the sandbox's refusal as an HTTP response.

    Raises:
        errors.UpstreamRefused, errors.UpstreamTimeout, errors.UpstreamProtocolError.
    """
    host = f"[{target.address}]" if ":" in target.address else target.address
    url = URL(f"http://{host}:{target.port}{path}", encoded=True)
    passed = [(k, v) for k, v in upstream_headers if k.lower() not in _HANDSHAKE_HEADERS]
    try:
        return await session.ws_connect(
            url,
            protocols=protocols,
            headers=passed,
            autoping=False,
            autoclose=False,
            max_msg_size=max_message_bytes,
            compress=0,
            decode_text=False,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
        )
    except aiohttp.WSServerHandshakeError as exc:
        # The sandbox's own answer (e.g. 403 from a dev server's host check) goes back.
        return web.Response(
            status=exc.status, text=f"the sandbox refused the upgrade: {exc.message}"
        )
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, ConnectionRefusedError):
            raise errors.UpstreamRefused(f"nothing is listening on port {target.port}") from None
        raise errors.UpstreamRefused(f"port {target.port} is unreachable: {exc}") from None
    except TimeoutError:
        raise errors.UpstreamTimeout("the sandbox did not accept the WebSocket in time") from None
    except aiohttp.ClientError as exc:
        raise errors.UpstreamProtocolError(f"the WebSocket handshake failed: {exc}") from None


async def relay(session: WebSocketSession, record: RequestRecord) -> None:
    """Pump both ways until either side closes; the close is passed on with its code."""
    pump = asyncio.create_task(_sandbox_to_client(session, record))
    try:
        await _client_to_sandbox(session, record)
    finally:
        if not pump.done():
            # The client side ended first; give the sandbox's close answer a moment.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(pump), 2.0)
            pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump
        with contextlib.suppress(Exception):
            await session.sandbox.close()


async def _client_to_sandbox(session: WebSocketSession, record: RequestRecord) -> None:
    client, sandbox = session.client, session.sandbox
    while True:
        message = await client.receive()
        kind = message.type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            record.bytes_in += len(message.data)
            await sandbox.send_frame(_as_bytes(message.data), kind)
        elif kind is WSMsgType.PING:
            await sandbox.ping(message.data)
        elif kind is WSMsgType.PONG:
            await sandbox.pong(message.data)
        elif kind is WSMsgType.CLOSE:
            await sandbox.close(code=wire_code(message.data), message=_reason(message.extra))
            return
        else:  # CLOSING, CLOSED, ERROR: the client is gone
            code = 1009 if _too_big(message) else 1011
            await sandbox.close(code=code, message=b"client connection lost")
            return


async def _sandbox_to_client(session: WebSocketSession, record: RequestRecord) -> None:
    client, sandbox = session.client, session.sandbox
    while True:
        message = await sandbox.receive()
        kind = message.type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            record.bytes_out += len(message.data)
            await client.send_frame(_as_bytes(message.data), kind)
        elif kind is WSMsgType.PING:
            await client.ping(message.data)
        elif kind is WSMsgType.PONG:
            await client.pong(message.data)
        elif kind is WSMsgType.CLOSE:
            await client.close(code=wire_code(message.data), message=_reason(message.extra))
            return
        else:
            code = 1009 if _too_big(message) else 1011
            await client.close(code=code, message=b"sandbox connection lost")
            return


def _as_bytes(data: object) -> bytes:
    return data if isinstance(data, bytes) else str(data).encode()


def _reason(extra: object) -> bytes:
    if isinstance(extra, bytes):
        return extra
    return extra.encode() if isinstance(extra, str) else b""


def _too_big(message: WSMessageNoDecodeText) -> bool:
    return (
        message.type is WSMsgType.ERROR
        and isinstance(message.data, aiohttp.WebSocketError)
        and message.data.code == 1009
    )
