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
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp._websocket.models import WSMessageNoDecodeText
from yarl import URL

from gateway import errors
from gateway.proxy import wsframes
from gateway.proxy.accounting import RequestRecord
from gateway.proxy.wsframes import GOING_AWAY, SERVICE_RESTART, close_reason, wire_code
from gateway.routing.model import Upstream

MAX_HEADER_FIELD_BYTES = 16 * 1024
_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding")
# After the client side ended, how long the sandbox side may take to finish closing.
CLOSE_GRACE_SECONDS = 5.0
_ENDED = frozenset({WSMsgType.CLOSING, WSMsgType.CLOSED})
_DATA = frozenset({WSMsgType.TEXT, WSMsgType.BINARY})
_SEND_ERRORS = (ConnectionError, RuntimeError, aiohttp.ClientError)
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
    """A live relay; ``close_going_away`` ends it from outside (lifecycle, drain).

    Ending a relay is one closing sequence run at most once, in a task of its own
    (``start_closing``): the handler task is cancelled when the client's connection
    drops, and that must not cut short a close being passed on to the sandbox. Once
    ``closing`` is set, a pump that reads CLOSING/CLOSED takes it as its cue to stop
    quietly instead of reporting a lost connection.
    """

    client: web.WebSocketResponse
    sandbox: SandboxSocket
    closing: bool = False
    closer: asyncio.Task[None] | None = None

    def start_closing(self, sequence: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``sequence`` unless a closing sequence already runs; return the one that does."""
        if self.closer is None:
            self.closing = True
            self.closer = asyncio.get_running_loop().create_task(sequence)
        else:
            sequence.close()  # never started
        return self.closer

    async def end(self, sequence: Coroutine[Any, Any, None]) -> None:
        """``start_closing`` and wait for it (shielded: a cancelled caller leaves it running)."""
        await asyncio.shield(self.start_closing(sequence))

    async def close_going_away(self, reason: str) -> None:
        message = close_reason(reason)
        await self.end(_close_both(self, GOING_AWAY, message))

    async def close_for_restart(self, reason: str) -> None:
        """1012 "service restart": the client should reconnect (to another replica)."""
        await self.end(_close_both(self, SERVICE_RESTART, close_reason(reason)))


def new_client_session(*, connect_seconds: float) -> aiohttp.ClientSession:
    """The aiohttp client for the sandbox side of WebSockets, configured for a proxy.

    aiohttp's defaults would follow a sandbox's redirect of the upgrade (to any address:
    an SSRF around the sandbox-network check, carrying the client's cookies), add
    User-Agent/Accept/Accept-Encoding the client never sent, keep a cookie jar, and pool
    connections by ip:port across tenants. Here: redirects are refused (the sandbox's
    3xx goes back to the client as its answer), no headers are added, no jar, and no
    pooling (a WebSocket holds its connection for its whole life anyway).
    """
    redirects = aiohttp.TraceConfig()
    redirects.on_request_redirect.append(_refuse_redirect)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_seconds),
        trace_configs=[redirects],
        max_line_size=MAX_HEADER_FIELD_BYTES,
        max_field_size=MAX_HEADER_FIELD_BYTES,
    )


class _Redirected(Exception):
    """The sandbox answered the upgrade with a redirect (never followed)."""

    def __init__(self, status: int, headers: list[tuple[str, str]]) -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers


async def _refuse_redirect(
    session: aiohttp.ClientSession,
    context: object,
    params: aiohttp.TraceRequestRedirectParams,
) -> None:
    response = params.response
    answer = _Redirected(response.status, list(response.headers.items()))
    response.close()
    raise answer


async def open_sandbox_socket(
    session: aiohttp.ClientSession,
    target: Upstream,
    path: str,
    upstream_headers: list[tuple[str, str]],
    *,
    protocols: list[str],
    max_message_bytes: int,
    connect_seconds: float,
    response_seconds: float,
) -> SandboxSocket | web.Response:
    """The sandbox's side of the socket, or the sandbox's refusal as an HTTP response.

    ``max_message_bytes`` is the largest message allowed (0: no limit); the handshake
    (connect included) must complete within ``response_seconds``.

    Raises:
        errors.UpstreamRefused, errors.UpstreamTimeout, errors.UpstreamProtocolError.
    """
    host = f"[{target.address}]" if ":" in target.address else target.address
    url = URL(f"http://{host}:{target.port}{path}", encoded=True)
    passed = [(k, v) for k, v in upstream_headers if k.lower() not in _HANDSHAKE_HEADERS]
    try:
        async with asyncio.timeout(response_seconds):
            return await session.ws_connect(
                url,
                protocols=protocols,
                headers=passed,
                autoping=False,
                autoclose=False,
                max_msg_size=aiohttp_message_limit(max_message_bytes),
                compress=0,
                decode_text=False,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_GRACE_SECONDS),
            )
    except aiohttp.WSServerHandshakeError as exc:
        # The sandbox's own answer (e.g. 403 from a dev server's host check) goes back
        # with its headers; its body is not kept by aiohttp.
        return _refusal(exc.status, list((exc.headers or {}).items()), upstream_headers)
    except _Redirected as exc:  # e.g. to a login page: relayed, never followed
        return _refusal(exc.status, exc.headers, upstream_headers)
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, ConnectionRefusedError):
            raise errors.UpstreamRefused(f"nothing is listening on port {target.port}") from None
        raise errors.UpstreamRefused(f"port {target.port} is unreachable: {exc}") from None
    except TimeoutError:
        raise errors.UpstreamTimeout("the sandbox did not accept the WebSocket in time") from None
    except aiohttp.ClientError as exc:
        raise errors.UpstreamProtocolError(f"the WebSocket handshake failed: {exc}") from None


def _refusal(
    status: int, sandbox_headers: list[tuple[str, str]], upstream_headers: list[tuple[str, str]]
) -> web.Response:
    # The public host is the X-Forwarded-Host the gateway itself set (cookie scoping).
    public_host = next((v for n, v in upstream_headers if n == "X-Forwarded-Host"), "")
    fields, text = wsframes.refusal(status, sandbox_headers, public_host=public_host)
    refusal = web.Response(status=status, text=text)
    for name, value in fields:
        refusal.headers.add(name, value)
    return refusal


def aiohttp_message_limit(max_message_bytes: int) -> int:
    """aiohttp's ``max_msg_size`` for a largest allowed message of ``max_message_bytes``.

    aiohttp refuses a message whose size reaches ``max_msg_size``; the configured value
    is the largest size that passes, so one more. 0 (no limit) stays 0.
    """
    return max_message_bytes + 1 if max_message_bytes > 0 else 0


async def relay(session: WebSocketSession, record: RequestRecord) -> None:
    """Pump both ways until either side closes; the close is passed on with its code.

    A close from one side is forwarded to the other, and the first side's closing
    handshake is completed with its own code echoed back. A side that goes away without
    a close frame (1006) or breaks the protocol ends the other side with 1011 (1009 for
    a message over the size limit).
    """
    pump = asyncio.create_task(_sandbox_to_client(session, record))
    try:
        await _client_to_sandbox(session, record)
    finally:
        if session.closer is None and not pump.done():
            # The handler was cancelled: the client's connection went away.
            session.start_closing(_close_sandbox(session, 1011, b"client connection lost"))
        if session.closer is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(session.closer), CLOSE_GRACE_SECONDS)
        if not pump.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(pump), CLOSE_GRACE_SECONDS)
            pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump
        if session.closer is not None and not session.closer.done():
            session.closer.cancel()
        with contextlib.suppress(Exception):
            await session.sandbox.close(code=1011, message=b"relay ended")


async def _client_to_sandbox(session: WebSocketSession, record: RequestRecord) -> None:
    client, sandbox = session.client, session.sandbox
    while True:
        message = await client.receive()
        kind = message.type
        if session.closing and kind in _ENDED:
            return  # the other pump, or the outside, is closing both sides
        if kind in _DATA:
            record.bytes_in += len(message.data)
        try:
            if await _pass_on(message, sandbox):
                continue
            if kind is WSMsgType.CLOSE:
                code, reason = wire_code(message.data), _reason(message.extra)
                await session.end(_forward_client_close(session, code, reason))
                return
            else:  # CLOSED, ERROR: the client went away or broke the protocol
                if _too_big(message):
                    await session.end(_close_sandbox(session, 1009, b"message too big"))
                else:
                    await session.end(_close_sandbox(session, 1011, b"client connection lost"))
                return
        except _SEND_ERRORS:
            await session.end(_close_both(session, 1011, b"sandbox connection lost"))
            return


async def _sandbox_to_client(session: WebSocketSession, record: RequestRecord) -> None:
    client, sandbox = session.client, session.sandbox
    while True:
        message = await sandbox.receive()
        kind = message.type
        if session.closing and kind in _ENDED:
            return
        if kind in _DATA:
            record.bytes_out += len(message.data)
        try:
            if await _pass_on(message, client):
                continue
            if kind is WSMsgType.CLOSE:
                code, reason = wire_code(message.data), _reason(message.extra)
                await session.end(_forward_sandbox_close(session, code, reason))
                return
            else:  # CLOSED, ERROR: the sandbox went away (1006) or broke the protocol
                if _too_big(message):
                    await session.end(_close_client(session, 1009, b"message too big"))
                else:
                    await session.end(_close_client(session, 1011, b"sandbox connection lost"))
                return
        except _SEND_ERRORS:
            await session.end(_close_both(session, 1011, b"client connection lost"))
            return


async def _pass_on(
    message: WSMessageNoDecodeText, target: web.WebSocketResponse | SandboxSocket
) -> bool:
    """Send a data, ping or pong message on to ``target`` as it came; False for the rest
    (closes and errors, which each direction handles in its own way)."""
    kind = message.type
    if kind in _DATA:
        await target.send_frame(_as_bytes(message.data), kind)
    elif kind is WSMsgType.PING:
        await target.ping(message.data)
    elif kind is WSMsgType.PONG:
        await target.pong(message.data)
    else:
        return False
    return True


# Closing sequences (each runs in the session's closer task; none raises) --------------


async def _forward_client_close(session: WebSocketSession, code: int, reason: bytes) -> None:
    """The client closed: close the sandbox, then answer the client with its own code
    and reason (RFC 6455 section 5.5.1's echo; aiohttp does not expose the reason of the
    sandbox's answer, and a sandbox such as aiohttp's answers 1000 whatever it got)."""
    with contextlib.suppress(Exception):
        await session.sandbox.close(code=code, message=reason)
    with contextlib.suppress(Exception):
        await session.client.close(code=code, message=reason)


async def _forward_sandbox_close(session: WebSocketSession, code: int, reason: bytes) -> None:
    """The sandbox closed: close the client, then answer the sandbox (its code echoed)."""
    with contextlib.suppress(Exception):
        await session.client.close(code=code, message=reason)
    with contextlib.suppress(Exception):
        await session.sandbox.close(code=code)


async def _close_sandbox(session: WebSocketSession, code: int, reason: bytes) -> None:
    with contextlib.suppress(Exception):
        await session.sandbox.close(code=code, message=reason)


async def _close_client(session: WebSocketSession, code: int, reason: bytes) -> None:
    with contextlib.suppress(Exception):
        await session.client.close(code=code, message=reason)


async def _close_both(session: WebSocketSession, code: int, reason: bytes) -> None:
    """Both sides with one code: the client first (it must hear promptly; the sandbox's
    close answer may take a moment)."""
    await _close_client(session, code, reason)
    await _close_sandbox(session, code, reason)


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
