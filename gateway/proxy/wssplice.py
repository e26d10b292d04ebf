"""A WebSocket through the front: the sandbox's handshake first, then a byte splice.

Order (DESIGN.md section 7): the upgrade goes to the sandbox first, with the client's
own key, version and subprotocols (and no extensions: none is negotiated, so frames
carry no compression and a message's size is its size); only a valid 101 from the
sandbox is passed on to the client. Any other answer is relayed as an ordinary HTTP
response with its status and headers and a body of the gateway's, never as a 101
followed by a close.

After the 101 the frames are copied as bytes, in each socket's callbacks, with no
message objects and no Task: ``wsframes.FrameReader`` follows the frame boundaries of
each direction so the gateway can still enforce the message size limit (1009 to
both sides), pass close frames on (their code kept; 1005/1006/1015 never on the wire),
answer a client's close with its own code and reason, end a session with 1001 (route
closed) or 1012 (drain) between two frames, and turn a side that breaks the protocol
(1002) or goes away without a close (1011 to the other side) into a clean close.

Flow control: each side is read only while the other side's socket can take more.
There is no idle timeout: an idle WebSocket is a normal one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import typing
from collections.abc import Callable

import httptools

from gateway import errors, headers
from gateway.headers import HeaderPairs
from gateway.proxy import wsframes
from gateway.proxy.http import Answer, RequestPlan, request_head
from gateway.proxy.upstream import UpstreamPool
from gateway.proxy.wsframes import Boundary, Broken, Close, FrameReader, TooBig

log = logging.getLogger("gateway.websocket")

# How long a gateway-initiated close waits for the peers' answers before the TCP
# connections are closed anyway (lifecycle enforcement must end sessions within 2 s).
CLOSE_GRACE_SECONDS = 1.0
# The sandbox's answer to the upgrade, its fields together: past this it is broken.
MAX_HANDSHAKE_HEAD_BYTES = 64 * 1024
# A client frame with more than this still to come is "large" (see keep_spare).
LARGE_FRAME_BYTES = 256 * 1024
_HANDSHAKE, _OPEN, _ENDED = range(3)


class Owner(typing.Protocol):
    """What the splice needs of the exchange it came from (``exchange.Exchange``)."""

    def refuse(self, error: errors.EdgeError) -> None: ...
    def answer_and_close(self, answer: Answer) -> None: ...
    def upgraded(self, head: bytes, protocol: asyncio.Protocol) -> None: ...
    def websocket_ended(self, *, closed: bool, bytes_in: int, bytes_out: int) -> None: ...
    def abort_client(self) -> None: ...
    def pause_client(self) -> None: ...
    def resume_client(self) -> None: ...
    def write_client(self, data: bytes) -> None: ...
    def close_client(self) -> None: ...


class WebSocketSplice(asyncio.Protocol):
    """One WebSocket: the client side's protocol after the 101 (see the module docstring).

    Contract: ``start()`` opens the sandbox connection and sends the upgrade; from
    then on the owner hears exactly one of ``refuse``, ``answer_and_close`` or
    ``upgraded``, and after ``upgraded`` exactly one ``websocket_ended``.
    """

    def __init__(
        self,
        owner: Owner,
        plan: RequestPlan,
        request_headers: HeaderPairs,
        *,
        pool: UpstreamPool,
        request_id: str,
        public_host: str,
        max_message_bytes: int,
    ) -> None:
        self._owner = owner
        self._plan = plan
        self._key = headers.first_value(request_headers, "sec-websocket-key") or ""
        self._offered = _protocols(request_headers)
        self._pool = pool
        self._request_id = request_id
        self._public_host = public_host
        self._client = _Side(
            "client",
            owner.write_client,
            masked=False,
            reader=FrameReader(masked=True, max_message_bytes=max_message_bytes),
        )
        self._far = _Side(
            "sandbox",
            self._write_sandbox,
            masked=True,
            reader=FrameReader(masked=False, max_message_bytes=max_message_bytes),
        )
        self._sandbox: _SandboxSide | None = None
        self._state = _HANDSHAKE
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._ended: asyncio.Future[None] | None = None

    # Handshake ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            sandbox = await self._pool.connect(self._plan.target, lambda: _SandboxSide(self))
        except errors.EdgeError as exc:
            self._task = None
            self._owner.refuse(exc)
            return
        self._task = None
        if self._state == _ENDED:  # the client went away meanwhile
            sandbox.close()
            return
        self._sandbox = sandbox
        passed = [
            (name, value)
            for name, value in self._plan.upstream_headers
            if name.lower() != "sec-websocket-extensions"
        ]
        passed += [("Connection", "Upgrade"), ("Upgrade", "websocket")]
        sandbox.write(request_head("GET", self._plan.path, passed))
        seconds = self._pool.timeouts.response_seconds
        self._timer = asyncio.get_running_loop().call_later(seconds, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self._fail_handshake(
            errors.UpstreamTimeout("the sandbox did not accept the WebSocket in time")
        )

    def _end_handshake(self) -> bool:
        """Give up the handshake (timer, connect, sandbox connection); False if it had
        ended already."""
        if self._state != _HANDSHAKE:
            return False
        self._state = _ENDED
        self._cancel_timer()
        if self._task is not None:
            self._task.cancel()
        if self._sandbox is not None:
            self._sandbox.close()
        return True

    def _fail_handshake(self, error: errors.EdgeError) -> None:
        if self._end_handshake():
            self._owner.refuse(error)

    def sandbox_answered(self, status: int, sandbox_headers: HeaderPairs) -> None:
        """The sandbox's final answer to the upgrade, other than a 101: relayed."""
        if not self._end_handshake():
            return
        fields, text = wsframes.refusal(status, sandbox_headers, public_host=self._public_host)
        fields += [
            ("Content-Type", "text/plain; charset=utf-8"),
            (headers.REQUEST_ID, self._request_id),
        ]
        self._owner.answer_and_close(Answer(status, fields, text.encode()))

    def sandbox_accepted(self, sandbox_headers: HeaderPairs, rest: bytes) -> None:
        """The sandbox's 101 (``rest``: what followed it): checked, then passed on."""
        if self._state != _HANDSHAKE:
            return
        why = self._invalid_101(sandbox_headers)
        if why is not None:
            self._fail_handshake(
                errors.UpstreamProtocolError(f"the WebSocket handshake failed: {why}")
            )
            return
        self._cancel_timer()
        self._state = _OPEN
        lines = [
            "HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {wsframes.accept_key(self._key)}",
        ]  # fmt: skip
        chosen = headers.first_value(sandbox_headers, "sec-websocket-protocol")
        if chosen:
            lines.append(f"Sec-WebSocket-Protocol: {chosen}")
        lines.append(f"{headers.REQUEST_ID}: {self._request_id}")
        self._owner.upgraded(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), self)
        if rest:
            self.sandbox_data(rest)

    def _invalid_101(self, sandbox_headers: HeaderPairs) -> str | None:
        upgrade = (headers.first_value(sandbox_headers, "upgrade") or "").strip().lower()
        if upgrade != "websocket":
            return "the 101 does not upgrade to websocket"
        if headers.first_value(sandbox_headers, "sec-websocket-accept") != wsframes.accept_key(
            self._key
        ):
            return "the 101 has a wrong Sec-WebSocket-Accept"
        if headers.first_value(sandbox_headers, "sec-websocket-extensions"):
            return "the 101 accepts an extension that was not offered"
        chosen = headers.first_value(sandbox_headers, "sec-websocket-protocol")
        if chosen and chosen.strip() not in self._offered:
            return f"the 101 chose the subprotocol {chosen!r}, which was not offered"
        return None

    # The client side (this protocol replaces the front's after the 101) -------------

    def data_received(self, data: bytes) -> None:
        self._frames_from(self._client, data)

    def eof_received(self) -> bool | None:
        self._lost(self._client)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(self._client)

    def pause_writing(self) -> None:
        if self._sandbox is not None:
            self._sandbox.pause_reading()

    def resume_writing(self) -> None:
        if self._sandbox is not None:
            self._sandbox.resume_reading()

    # The sandbox side -----------------------------------------------------------------

    def sandbox_data(self, data: bytes) -> None:
        if self._state == _OPEN:
            self._frames_from(self._far, data)

    def sandbox_paused(self) -> None:
        self._owner.pause_client()

    def sandbox_resumed(self) -> None:
        self._owner.resume_client()

    def sandbox_lost(self) -> None:
        if self._state == _HANDSHAKE:
            self._fail_handshake(errors.UpstreamProtocolError("the sandbox closed the connection"))
        else:
            self._lost(self._far)

    # Ending from outside --------------------------------------------------------------

    async def close_going_away(self, reason: str) -> None:
        await self._close_from_outside(wsframes.GOING_AWAY, reason)

    async def close_for_restart(self, reason: str) -> None:
        """1012 "service restart": the client should reconnect (to another replica)."""
        await self._close_from_outside(wsframes.SERVICE_RESTART, reason)

    async def _close_from_outside(self, code: int, reason: str) -> None:
        if self._end_handshake():
            self._owner.abort_client()
            return
        if self._state == _ENDED:
            return
        message = wsframes.close_reason(reason)
        self._close(self._client, code, message)
        self._close(self._far, code, message)
        ended = self._ended = self._ended or asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(ended), CLOSE_GRACE_SECONDS)
        except TimeoutError:
            self._finish(True)

    def abandon(self) -> None:
        """The client went away before the 101: drop the sandbox side."""
        self._end_handshake()

    # Closing --------------------------------------------------------------------------

    def _other(self, side: _Side) -> _Side:
        return self._far if side is self._client else self._client

    def _frames_from(self, source: _Side, data: bytes) -> None:
        reader = source.reader
        passed, event = reader.feed(data)
        destination = self._other(source)
        if passed and destination.sent is None and not destination.gone:
            destination.write(passed)
        if source is self._client and self._sandbox is not None and not destination.gone:
            if reader.frame_remaining > LARGE_FRAME_BYTES:
                self._sandbox.keep_spare()
            elif reader.at_boundary:
                self._sandbox.drop_spare()
        if event is not None:
            self._on_event(source, event)

    def _on_event(self, source: _Side, event: wsframes.Event) -> None:
        destination = self._other(source)
        if isinstance(event, Boundary):
            # The frame that a close for ``destination`` waited for has ended.
            frame, destination.pending = destination.pending, None
            if frame is not None:
                destination.write(frame)
        elif isinstance(event, Close):
            source.closed = event
            if destination.sent is None and source.sent is None:
                # ``source`` starts the close: on to the other side, code and reason kept.
                self._close(destination, wsframes.wire_code(event.code), event.reason)
            elif destination.sent is None and destination.closed is not None:
                # The answer to a close ``destination`` started: it hears its own code
                # and reason back (RFC 6455 section 5.5.1; the standard echo server
                # answers 1000 whatever it got).
                asked = destination.closed
                self._close(destination, wsframes.wire_code(asked.code), asked.reason)
        elif isinstance(event, TooBig):
            self._close(self._client, wsframes.TOO_BIG, b"message too big")
            self._close(self._far, wsframes.TOO_BIG, b"message too big")
            self._arm_grace()
        elif isinstance(event, Broken):
            log.info("a WebSocket %s broke the protocol: %s", source.name, event.why)
            self._close(source, wsframes.PROTOCOL_ERROR, event.why.encode()[:120])
            self._close(destination, wsframes.INTERNAL_ERROR, source.lost_reason)
            self._arm_grace()
        self._end_if_done()

    def _lost(self, side: _Side) -> None:
        """``side``'s TCP connection ended; without a close of its own first, the other
        side gets 1011."""
        if side.gone:
            return
        side.gone = True
        if self._state != _OPEN:
            return
        # Nothing waits for the gone side's buffer any more: let the other side talk.
        if side is self._far:
            self._owner.resume_client()
        elif self._sandbox is not None:
            self._sandbox.resume_reading()
        if side.closed is None:
            side.closed = Close(1006, b"")
            self._close(self._other(side), wsframes.INTERNAL_ERROR, side.lost_reason)
        # The other side's answer is awaited (a while): closing its socket while it still
        # sends would reset the connection, and a reset can destroy the close frame
        # just sent before it is read.
        self._arm_grace()
        self._end_if_done()

    def _close(self, side: _Side, code: int, reason: bytes) -> None:
        """Send ``side`` a close frame, between two frames of the other side's."""
        if side.sent is not None or side.gone:
            return
        side.sent = code
        frame = wsframes.close_frame(code, reason, masked=side.masked)
        towards = self._other(side).reader  # the frames travelling to ``side``
        if towards.at_boundary:
            side.write(frame)
        else:
            side.pending = frame
            towards.stop_at_boundary()

    def _end_if_done(self) -> None:
        """Close the TCP connections once each side has closed or gone."""
        if self._state == _OPEN and self._client.settled and self._far.settled:
            self._finish(False)

    def _arm_grace(self) -> None:
        """End the session after ``CLOSE_GRACE_SECONDS`` whatever the peers answer."""
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(CLOSE_GRACE_SECONDS, self._finish, False)

    def _write_sandbox(self, data: bytes) -> None:
        if self._sandbox is not None:
            self._sandbox.write(data)

    def _finish(self, abort: bool) -> None:
        if self._state == _ENDED:
            return
        self._state = _ENDED
        self._cancel_timer()
        if self._sandbox is not None:
            if abort:
                self._sandbox.abort()
            else:
                self._sandbox.close()
        if abort:
            self._owner.abort_client()
        else:
            self._owner.close_client()
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
        self._owner.websocket_ended(
            closed=self._client.sent is not None and self._client.pending is None,
            bytes_in=self._client.reader.payload_bytes,
            bytes_out=self._far.reader.payload_bytes,
        )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Side:
    """One end of the splice: how the gateway writes to it, and where its close stands."""

    __slots__ = ("closed", "gone", "masked", "name", "pending", "reader", "sent", "write")

    def __init__(
        self, name: str, write: Callable[[bytes], None], *, masked: bool, reader: FrameReader
    ) -> None:
        self.name = name
        self.write = write
        self.masked = masked  # frames the gateway sends it are masked (it is a server)
        self.reader = reader  # the frames it sends
        self.sent: int | None = None  # the close code the gateway sent it
        self.closed: Close | None = None  # the close it sent (1006: it went away)
        self.pending: bytes | None = None  # a close for it, waiting for a frame boundary
        self.gone = False

    @property
    def lost_reason(self) -> bytes:
        return f"{self.name} connection lost".encode()

    @property
    def settled(self) -> bool:
        """Nothing more to wait for from it: its connection is gone, or closes went both
        ways."""
        return self.gone or (self.sent is not None and self.closed is not None and not self.pending)


class _SandboxSide(asyncio.Protocol):
    """The sandbox connection: its 101 (parsed with llhttp), then frames for the splice."""

    def __init__(self, splice: WebSocketSplice) -> None:
        self._splice = splice
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._spare: socket.socket | None = None  # a duplicate, while writes wait

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            self._splice.sandbox_data(data)
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._parser = None
            offset = upgrade.args[0] if upgrade.args else len(data)
            if parser.get_status_code() == 101:
                self._splice.sandbox_accepted(self._headers, data[offset:])
            else:
                self._splice.sandbox_answered(parser.get_status_code(), self._headers)
        except httptools.HttpParserError as exc:
            self._parser = None
            error = errors.UpstreamProtocolError(f"the sandbox broke HTTP: {exc}")
            self._splice._fail_handshake(error)

    def eof_received(self) -> bool | None:
        self._splice.sandbox_lost()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._spare is not None:
            # A reset found by a write loses what the sandbox sent before it (typically
            # its close frame, refusing the message being written); the spare still has it.
            rest = _read_what_is_left(self._spare)
            self._close_spare()
            if rest:
                self.data_received(rest)
        self._splice.sandbox_lost()

    def pause_writing(self) -> None:
        self._splice.sandbox_paused()

    def resume_writing(self) -> None:
        self._splice.sandbox_resumed()

    def keep_spare(self) -> None:
        """Hold a duplicate of the socket while a large frame is written to the sandbox.

        A sandbox that refuses a message that big closes while it is still arriving,
        and its kernel resets the connection over the unread bytes; the write that
        meets the reset makes the loop drop the socket with the sandbox's close frame
        still unread in it. The duplicate keeps that frame readable (``connection_lost``).
        """
        transport = self._transport
        if self._spare is not None or transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.fileno() >= 0:
            self._spare = socket.socket(fileno=os.dup(sock.fileno()))

    def drop_spare(self) -> None:
        self._close_spare()

    def _close_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()

    # httptools callbacks --------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HANDSHAKE_HEAD_BYTES:
            raise errors.UpstreamProtocolError("the sandbox sent a response head without end")
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._headers = []  # interim (100, 103): dropped
        elif status != 101:
            self._parser = None
            self._splice.sandbox_answered(status, self._headers)

    # Used by the splice ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _read_what_is_left(sock: socket.socket) -> bytes:
    """Everything still queued on a (non-blocking) socket, up to its EOF or error."""
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _protocols(request_headers: HeaderPairs) -> frozenset[str]:
    values = (v for n, v in request_headers if n.lower() == "sec-websocket-protocol")
    return frozenset(p.strip() for value in values for p in value.split(",") if p.strip())
