"""The public listener's HTTP/1.1 front: the common request, served without aiohttp.

Most traffic through a preview gateway is bodiless requests (GET, HEAD, DELETE, ...) on
kept-alive connections, and aiohttp's request and response machinery is the largest part
of what such a request costs (docs/performance.md). ``FrontProtocol`` serves those itself
and hands everything else to aiohttp, so there is one implementation of each hard part:

- A request head (up to the first CRLF CRLF, at most ``MAX_HEAD_BYTES``) is parsed with
  httptools (llhttp, the parser under aiohttp too). It is served here when it is
  complete or has a plain ``Content-Length`` body (no ``Transfer-Encoding``),
  asks for no upgrade, expects no ``100 Continue``, says HTTP/1.0 or HTTP/1.1, and every
  line ends in CRLF.
- Anything else (a body, a WebSocket or other upgrade, a head the strict parser refuses,
  bare CR or LF, an oversized head, more than ``max_headers`` fields) hands the
  connection to aiohttp's ``RequestHandler`` for the rest of its life: the bytes from the
  start of that request on are replayed into it, so aiohttp answers exactly as it would
  have from the first byte.
- One request at a time: pipelined requests wait in the buffer (reading paused past
  ``MAX_HEAD_BYTES``) until the answer before them is complete, then go in order.
- Routing, refusals and accounting are ``EdgeHandler``'s (``new_record``, ``plan``,
  ``error_page``), the same calls aiohttp's path makes.
- The answer streams as it arrives; one that is complete when its head arrives goes out
  in a single write. After the head is out, a failure aborts the connection (never a
  short complete answer). A client that stops reading for ``read_idle_seconds`` while
  an answer waits for it is cut off; the sandbox is not read meanwhile (memory bounded).
- Idle keep-alive connections close after ``keepalive_idle_seconds``; ``Front.drain``
  closes idle ones and answers the rest with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import logging
import time
import typing
from collections.abc import Callable
from http import HTTPStatus

import httptools
from aiohttp import web_protocol

from gateway import errors, headers
from gateway.headers import HeaderPairs
from gateway.proxy.accounting import RequestRecord
from gateway.proxy.handler import EdgeHandler
from gateway.proxy.http import Answer, RequestPlan, request_head
from gateway.proxy.pages import Page
from gateway.proxy.upstream import UpstreamResponse

log = logging.getLogger("gateway.front")

# A head longer than this goes to aiohttp, which applies its own field limits (16 KiB a
# line) and answers 431/400 itself; also the most buffered while a request is served.
MAX_HEAD_BYTES = 16 * 1024
# Request body bytes held for a sandbox that reads slower than the client sends.
BODY_HIGH_WATER_BYTES = 256 * 1024
_NO_BODY_STATUSES = frozenset((204, 304))
_CRLF = b"\r\n"


class _Head:
    """What httptools found in one request head (filled in by its callbacks)."""

    __slots__ = ("complete", "connection", "length", "max_headers", "raw", "refuse", "url")

    def __init__(self, max_headers: int) -> None:
        self.max_headers = max_headers
        self.length = 0  # Content-Length; llhttp refuses duplicates and non-digits
        self.url = b""
        self.raw: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.refuse = False  # a header that only aiohttp's path handles
        self.connection: set[bytes] = set()  # the tokens of Connection, lowercase

    def keep_alive(self, http10: bool) -> bool:
        """RFC 9112 section 9.3. Not llhttp's ``should_keep_alive``: that one also
        believes ``Proxy-Connection``, which is not a standard header."""
        if http10:
            return b"keep-alive" in self.connection
        return b"close" not in self.connection

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower in (b"transfer-encoding", b"upgrade", b"expect") or (
            # A second Host: aiohttp refuses it (catalogue HOST-02); llhttp does not.
            lower == b"host" and any(n.lower() == b"host" for n, _ in self.raw)
        ):
            self.refuse = True
        elif lower == b"content-length":
            digits = value.strip()
            if digits.isdigit() and len(digits) <= 15 and (digits == b"0" or digits[0] != 48):
                self.length = int(digits)
            else:
                self.refuse = True  # odd but parseable lengths: aiohttp's call
        elif lower == b"connection":
            self.connection.update(t.strip().lower() for t in value.split(b","))
        self.raw.append((name, value))
        if len(self.raw) > self.max_headers:
            self.refuse = True  # aiohttp refuses it with the same limit

    def on_message_complete(self) -> None:
        self.complete = True


class Front:
    """The factory of ``FrontProtocol`` connections and what they share."""

    def __init__(
        self,
        handler: EdgeHandler,
        fallback: Callable[[], asyncio.Protocol],
        *,
        keepalive_idle_seconds: float,
        read_idle_seconds: float,
        max_headers: int,
    ) -> None:
        """``fallback`` makes the protocol a connection is handed to (aiohttp's server,
        configured with the same ``max_headers``)."""
        self.handler = handler
        self.max_headers = max_headers
        self.fallback = fallback
        self.keepalive_idle_seconds = keepalive_idle_seconds
        self.read_idle_seconds = read_idle_seconds
        self.connections: set[FrontProtocol] = set()
        self.handed_over = 0
        self._busy = 0
        self._quiet = asyncio.Event()
        self._quiet.set()

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    def close_idle(self) -> None:
        """Close every connection between requests (a drain); busy ones close after."""
        for connection in list(self.connections):
            connection.close_if_idle()

    async def wait_idle(self, seconds: float) -> None:
        """Wait until no request is being served here, at most ``seconds``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._quiet.wait()

    def _request_began(self) -> None:
        self._busy += 1
        self._quiet.clear()

    def _request_ended(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._quiet.set()


class FrontProtocol(asyncio.Protocol):
    """One client connection; see the module docstring."""

    def __init__(self, front: Front) -> None:
        self._front = front
        self._transport: asyncio.Transport | None = None
        self._peer_ip = "0.0.0.0"
        self._buffer = bytearray()
        self._delegate: asyncio.Protocol | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        self._eof = False
        self._body: _Body | None = None
        self.busy = False

    # asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports don't subclass asyncio.Transport, but implement it.
        self._transport = typing.cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._peer_ip = str(peer[0])
        self._front.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.data_received(data)
            return
        self._cancel_idle_timer()
        if self._body is not None and self._body.remaining:
            data = self._body.feed(data)
        self._buffer += data
        if self.busy:
            if len(self._buffer) > MAX_HEAD_BYTES and self._transport is not None:
                self._transport.pause_reading()
                self._paused = True
            return
        self._next_request()

    def eof_received(self) -> bool | None:
        delegate = self._delegate
        # aiohttp ignores a half-close and lets the transport close at once, which loses
        # the answer to an HTTP request just read; close() instead answers what it has
        # and closes after. Not after an upgrade: a WebSocket's EOF means the client is
        # gone, and only the transport closing tells aiohttp's reader so (aiohttp has no
        # public flag for an upgraded connection).
        if isinstance(delegate, web_protocol.RequestHandler) and not getattr(
            delegate, "_upgraded", True
        ):
            delegate.close()
            return True
        if self._delegate is not None:
            return self._delegate.eof_received()
        self._eof = True
        if self._body is not None:
            self._body.end_of_input()
        # Keep the transport open for an answer in progress (a client may half-close
        # after its request); otherwise there is nothing more to do.
        return True if self.busy else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._front.connections.discard(self)
        self._cancel_idle_timer()
        self._wake_writer()
        if self._delegate is not None:
            self._delegate.connection_lost(exc)
            return
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: so does the sandbox request

    def pause_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.pause_writing()
        elif self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.resume_writing()
        else:
            self._wake_writer()

    # Used by Front --------------------------------------------------------------------

    def buffered(self) -> bytes:
        """What has arrived and not been served yet (for tests and debugging)."""
        return bytes(self._buffer)

    def close_if_idle(self) -> None:
        if not self.busy and self._delegate is None and self._transport is not None:
            self._transport.close()

    # Requests -------------------------------------------------------------------------

    def _next_request(self) -> None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            # A head split inside a CRLF ends in CR for now: not a bare one yet.
            partial = buffer[:-1] if buffer.endswith(b"\r") else buffer
            if len(buffer) > MAX_HEAD_BYTES or _has_bare_cr_or_lf(partial):
                self._hand_over()
            return
        head = bytes(buffer[: end + 4])
        if len(head) > MAX_HEAD_BYTES or _has_bare_cr_or_lf(head):
            self._hand_over()
            return
        parsed = _Head(self._front.max_headers)
        parser = httptools.HttpRequestParser(parsed)
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            parsed.refuse = True  # aiohttp's path answers upgrades and malformed requests
        version = parser.get_http_version()
        if (
            parsed.refuse
            or not (parsed.complete or parsed.length)
            or version not in ("1.0", "1.1")  # llhttp takes any digit pair; aiohttp not
            or parser.get_method() == b"CONNECT"
        ):
            self._hand_over()
            return
        del buffer[: end + 4]
        self.busy = True
        self._front._request_began()
        if parsed.length:
            self._body = _Body(self, parsed.length)
            if buffer:
                self._buffer = bytearray(self._body.feed(bytes(buffer)))
        http10 = version == "1.0"
        keep_alive = parsed.keep_alive(http10) and not self._eof
        request = _Request(parser.get_method().decode("ascii"), parsed, keep_alive, http10)
        listener = self._front.handler.listener
        if listener is not None:
            listener.request_started(self._transport)
        self._task = asyncio.get_running_loop().create_task(self._serve(request))

    def _hand_over(self) -> None:
        """Give the connection to aiohttp from the start of the current request on."""
        assert self._transport is not None
        self._front.handed_over += 1
        delegate = self._delegate = self._front.fallback()
        delegate.connection_made(self._transport)
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            delegate.data_received(data)
        if self._eof:
            delegate.eof_received()
        if self._paused:
            self._paused = False
            self._transport.resume_reading()

    async def _serve(self, request: _Request) -> None:
        handler = self._front.handler
        record = handler.new_record(request.method, request.path, request.headers, self._peer_ip)
        keep_alive = request.keep_alive and not handler.draining
        try:
            try:
                decided = await handler.plan(
                    request.method, request.path, request.headers, self._peer_ip, record
                )
                if isinstance(decided, Answer):
                    keep_alive = self._answer(decided, request, keep_alive)
                else:
                    keep_alive = await self._forward(decided, request, record, keep_alive)
            except errors.EdgeError as exc:
                page = handler.error_page(exc, record, request.headers)
                keep_alive = self._answer(_page_answer(page), request, keep_alive)
        except _ClientStalled:
            record.outcome = "client_gone"
            keep_alive = False
            if self._transport is not None:
                self._transport.abort()
        except asyncio.CancelledError:
            if record.outcome == "ok":
                record.outcome = "client_gone"
            keep_alive = False
            raise
        except Exception:
            log.exception("request %s failed", record.request_id)
            keep_alive = False
            if self._transport is not None:
                self._transport.abort()
        finally:
            self._finish(record, keep_alive)

    def _finish(self, record: RequestRecord, keep_alive: bool) -> None:
        body, self._body = self._body, None
        if body is not None:
            record.bytes_in = body.received
            # An answer before the whole body arrived (a 413, say): the rest of the
            # body is still on the wire, so the connection can't carry another request.
            keep_alive = keep_alive and not body.remaining
        record.finish()
        for sink in self._front.handler.sinks:
            sink(record)
        handler = self._front.handler
        if handler.listener is not None:
            handler.listener.request_finished(self._transport)
        self.busy = False
        self._front._request_ended()
        self._task = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if not keep_alive or handler.draining:
            transport.close()
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self._buffer:
            # The next pipelined request, on the next loop turn (not deeper in the stack).
            asyncio.get_running_loop().call_soon(self._continue)
        elif self._eof:
            transport.close()
        else:
            self._idle_timer = asyncio.get_running_loop().call_later(
                self._front.keepalive_idle_seconds, self._close_idle
            )

    def _continue(self) -> None:
        transport = self._transport
        if not self.busy and self._delegate is None and transport and not transport.is_closing():
            self._next_request()

    def _answer(self, answer: Answer, request: _Request, keep_alive: bool) -> bool:
        """Send one of the gateway's own answers; returns whether to keep the connection."""
        assert self._transport is not None
        lines = [b"HTTP/1.1 %d %s" % (answer.status, _reason(answer.status))]
        lines += [_header_line(name, value) for name, value in answer.headers]
        lines.append(b"Content-Length: %d" % len(answer.body))
        lines.append(b"Date: " + _http_date())
        lines.append(_connection_line(keep_alive, request.http10) or b"")
        if not lines[-1]:
            lines.pop()
        body = b"" if request.method == "HEAD" else answer.body
        self._transport.write(_CRLF.join(lines) + b"\r\n\r\n" + body)
        return keep_alive

    async def _forward(
        self, plan: RequestPlan, request: _Request, record: RequestRecord, keep_alive: bool
    ) -> bool:
        handler = self._front.handler
        head = request_head(request.method, plan.path, plan.upstream_headers)
        with handler.forwarding(plan, record, self._transport):
            sent = time.monotonic()
            upstream = await handler.pool.request(
                plan.target, head, self._body, chunked=False, head_only=request.method == "HEAD"
            )
            record.upstream_seconds = time.monotonic() - sent
            try:
                record.status = upstream.status
                return await self._relay(upstream, request, record, keep_alive)
            finally:
                upstream.release()

    async def _relay(
        self, upstream: UpstreamResponse, request: _Request, record: RequestRecord,
        keep_alive: bool,
    ) -> bool:  # fmt: skip
        """Stream the sandbox's answer to the client; returns whether to keep the connection."""
        transport = self._transport
        assert transport is not None
        relayed = headers.downstream_response_headers(upstream.headers, public_host=record.host)
        no_body = request.method == "HEAD" or upstream.status in _NO_BODY_STATUSES
        framed = no_body or any(n.lower() == "content-length" for n, _ in relayed)
        # Without a length, an HTTP/1.1 client gets chunks; an HTTP/1.0 one gets the body
        # up to the close (it can't read chunks).
        chunked = not framed and not request.http10
        if not framed and request.http10:
            keep_alive = False
        # A sandbox's reason phrase with control bytes is not copied (catalogue UPR-05).
        reason = headers.relayable_reason(upstream.reason) or _reason(upstream.status).decode()
        lines = [b"HTTP/1.1 %d %s" % (upstream.status, reason.encode("latin-1"))]
        lines += [_header_line(name, value) for name, value in relayed]
        if not any(n.lower() == "date" for n, _ in relayed):
            lines.append(b"Date: " + _http_date())
        lines.append(b"X-Request-Id: " + record.request_id.encode("ascii"))
        if chunked:
            lines.append(b"Transfer-Encoding: chunked")
        if connection := _connection_line(keep_alive, request.http10):
            lines.append(connection)
        head = _CRLF.join(lines) + b"\r\n\r\n"
        idle = self._front.read_idle_seconds
        try:
            if no_body:
                transport.write(head)
                return keep_alive
            first = upstream.take_buffered()
            if upstream.complete:
                # The whole answer is in: one write.
                record.bytes_out += len(first)
                transport.write(head + _framed(first, chunked, last=True))
                return keep_alive
            transport.write(head + _framed(first, chunked, last=False))
            record.bytes_out += len(first)
            while chunk := await upstream.read_chunk(idle_seconds=idle):
                record.bytes_out += len(chunk)
                transport.write(_framed(chunk, chunked, last=False))
                if self._drained is not None:
                    await self._wait_drained(idle)
            if chunked:
                transport.write(b"0\r\n\r\n")
            return keep_alive
        except errors.EdgeError as exc:
            # The head is gone; the only honest signal left is a broken connection.
            record.aborted(exc.code)
            transport.abort()
            return False

    async def _wait_drained(self, seconds: float) -> None:
        drained = self._drained
        if drained is None:
            return
        try:
            async with asyncio.timeout(seconds):
                await asyncio.shield(drained)
        except TimeoutError:
            raise errors.UpstreamTimeout("the client stopped reading the answer") from None

    @property
    def read_idle_seconds(self) -> float:
        return self._front.read_idle_seconds

    def _pause_reading(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def _wake_writer(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _close_idle(self) -> None:
        self._idle_timer = None
        if not self.busy and self._transport is not None:
            self._transport.close()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


class _ClientStalled(Exception):
    """The client sent no request body bytes for ``read_idle_seconds``, or half-closed
    before the body was complete."""


class _Body:
    """A request body as it arrives, for the upstream client to send (``async for``).

    Contract: ``feed`` takes what the client sent and returns the bytes beyond the body
    (the next pipelined request); iteration yields the body in arrival order and ends
    after ``Content-Length`` bytes; a silence of ``read_idle_seconds`` raises
    ``_ClientStalled``. More than ``BODY_HIGH_WATER_BYTES`` waiting pauses the client.
    """

    def __init__(self, protocol: FrontProtocol, length: int) -> None:
        self._protocol = protocol
        self.remaining = length
        self.received = 0
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False

    def feed(self, data: bytes) -> bytes:
        take = data[: self.remaining]
        if take:
            self.remaining -= len(take)
            self.received += len(take)
            self._chunks.append(take)
            self._buffered += len(take)
            if self._buffered > BODY_HIGH_WATER_BYTES:
                self._protocol._pause_reading()
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
        return data[len(take) :]

    def end_of_input(self) -> None:
        """The client half-closed: a body still owed can never arrive."""
        self._ended = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if not self.remaining:
                raise StopAsyncIteration
            if self._ended:
                raise _ClientStalled  # cut short: the sandbox must not get a short body
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self._protocol.read_idle_seconds):
                    await waiter
            except TimeoutError:
                raise _ClientStalled from None
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered < BODY_HIGH_WATER_BYTES // 4:
            self._protocol._resume_reading()
        return chunk


class _Request:
    """A request head the front serves itself."""

    __slots__ = ("headers", "http10", "keep_alive", "method", "path")

    def __init__(self, method: str, head: _Head, keep_alive: bool, http10: bool) -> None:
        self.method = method
        # surrogateescape keeps any byte the client sent; request_head encodes it back.
        self.path = head.url.decode("utf-8", "surrogateescape")
        self.headers: HeaderPairs = [
            (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for k, v in head.raw
        ]
        self.keep_alive = keep_alive
        self.http10 = http10


def _has_bare_cr_or_lf(data: bytes | bytearray) -> bool:
    """Whether a line ends in anything but CRLF (parsers disagree on those: desync)."""
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def _framed(data: bytes, chunked: bool, *, last: bool) -> bytes:
    if not chunked:
        return data
    framed = b"%x\r\n%b\r\n" % (len(data), data) if data else b""
    return framed + b"0\r\n\r\n" if last else framed


def _header_line(name: str, value: str) -> bytes:
    return f"{name}: {value}".encode("utf-8", "surrogateescape")


def _connection_line(keep_alive: bool, http10: bool) -> bytes | None:
    """What ``Connection`` must say, as aiohttp says it: nothing for HTTP/1.1 keep-alive."""
    if not keep_alive:
        return b"Connection: close"
    return b"Connection: keep-alive" if http10 else None


def _page_answer(page: Page) -> Answer:
    return Answer(page.status, page.headers, page.body)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


class _DateHeader:
    """The Date header value, formatted once a second (RFC 9110 section 5.6.7)."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode("ascii")
        return self._value


_http_date = _DateHeader()
