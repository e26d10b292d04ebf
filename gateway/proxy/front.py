"""The public listener's HTTP/1.1 front: the common request, served without aiohttp.

Most traffic through a preview gateway is bodiless requests (GET, HEAD, DELETE, ...) on
kept-alive connections, and aiohttp's request and response machinery is the largest part
of what such a request costs (docs/performance.md). ``FrontProtocol`` serves those itself
and hands everything else to aiohttp, so there is one implementation of each hard part:

- A request head (up to the first CRLF CRLF, at most ``MAX_HEAD_BYTES``) is parsed with
  httptools (llhttp, the parser under aiohttp too). It is served here when it is
  complete or has a plain ``Content-Length`` body (no ``Transfer-Encoding``), expects
  no ``100 Continue``, says HTTP/1.0 or HTTP/1.1, and every line ends in CRLF; an
  upgrade only if it is a well-formed WebSocket handshake (``gateway.proxy.wssplice``
  takes the connection over after the 101).
- A request line naming another protocol version (HTTP/2.0, HTTP/0.9, RTSP/1.0, ...)
  is answered here with a 505 and the connection closes: aiohttp would serve it and
  echo the version in its status line.
- Anything else (a chunked body, another upgrade, a head the strict parser refuses,
  bare CR or LF, an oversized head, more than ``max_headers`` fields) hands the
  connection to aiohttp's ``RequestHandler`` for the rest of its life: the bytes from the
  start of that request on are replayed into it, so aiohttp answers exactly as it would
  have from the first byte.
- One request at a time: pipelined requests wait in the buffer (reading paused past
  ``MAX_HEAD_BYTES``) until the answer before them is complete, then go in order.
- Each request served here is an ``exchange.Exchange``: planned with ``EdgeHandler``
  (``new_record``, ``plan_now``, ``error_page``, the same rules aiohttp's path uses),
  then answered or forwarded from the sockets' callbacks (see that module).
- Idle keep-alive connections close after ``keepalive_idle_seconds``; ``Front.close_idle``
  closes idle ones in a drain, and requests during a drain are answered with
  ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import typing
from collections.abc import Callable

import httptools
from aiohttp import web_protocol

from gateway import errors
from gateway.listener import Reader
from gateway.proxy import wsframes
from gateway.proxy.accounting import RequestRecord
from gateway.proxy.exchange import Client, Exchange, RelayedFields, Request, Watchdog
from gateway.proxy.handler import EdgeHandler, HeadFacts

# A head longer than this goes to aiohttp, which applies its own field limits (16 KiB a
# line) and answers 400 itself; also the most buffered while a request is served.
MAX_HEAD_BYTES: typing.Final = 16 * 1024
# An answer's bytes the client's socket buffer may hold before the sandbox is paused:
# above a read of the sandbox (256 KiB), so a stream is not paused on every read.
WRITE_HIGH_WATER_BYTES: typing.Final = 512 * 1024


class _Head:
    """What httptools found in one request head (filled in by its callbacks)."""

    __slots__ = (
        "complete", "connection", "length", "max_headers", "raw", "refuse", "url", "ws_keys",
        "ws_version",
    )  # fmt: skip

    def __init__(self, max_headers: int) -> None:
        self.max_headers = max_headers
        self.length = 0  # Content-Length; llhttp refuses duplicates and non-digits
        self.url = b""
        self.raw: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.refuse = False  # a header that only aiohttp's path handles
        self.connection: set[bytes] = set()  # the tokens of Connection, lowercase
        self.ws_keys: list[bytes] = []  # Sec-WebSocket-Key values
        self.ws_version: list[bytes] = []  # Sec-WebSocket-Version values

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
        if lower in (b"transfer-encoding", b"expect") or (
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
        elif lower == b"sec-websocket-key":
            self.ws_keys.append(value)
        elif lower == b"sec-websocket-version":
            self.ws_version.append(value)
        self.raw.append((name, value))
        if len(self.raw) > self.max_headers:
            self.refuse = True  # aiohttp refuses it with the same limit

    def on_message_complete(self) -> None:
        self.complete = True

    def is_websocket_handshake(self, method: bytes, *, http11: bool) -> bool:
        """A WebSocket opening handshake the splice can take (RFC 6455 section 4.2.1);
        any other upgrade, or a malformed one, is aiohttp's to answer."""
        return (
            method == b"GET" and http11 and not self.length
            and len(self.ws_keys) == 1 and self.ws_version == [b"13"]
            and wsframes.is_valid_key(self.ws_keys[0].decode("latin-1"))
        )  # fmt: skip


class _RequestLine:
    """The request target, for a head whose fields are ``_Known`` already."""

    __slots__ = ("url",)

    def __init__(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url


class _Known:
    """The last header block served on a connection, with what it decided."""

    __slots__ = ("block", "facts", "head", "plain")

    def __init__(self, block: bytes, head: _Head, facts: HeadFacts, *, plain: bool) -> None:
        self.block = block
        self.head = head
        self.facts = facts
        # Complete, with no body and no upgrade: a request line whose method and
        # target llhttp takes as they are (``_plain_line``) needs no parse with it.
        self.plain = plain


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
        """``fallback`` makes the protocol a connection is handed to (aiohttp's handler,
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
        if self._busy == 1:  # (an Event's clear() is a generic call: only when it was set)
            self._quiet.clear()

    def _request_ended(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._quiet.set()


class FrontProtocol(asyncio.Protocol, Client, Reader):
    """One client connection; see the module docstring."""

    def __init__(self, front: Front) -> None:
        self._front = front
        # Kept: on Python 3.11 each asyncio.get_running_loop() is a getpid syscall (it
        # checks for a fork), which a request would otherwise make twice.
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer_ip = "0.0.0.0"
        self._buffer = bytearray()
        self._delegate: asyncio.Protocol | None = None
        self._exchange: Exchange | None = None
        self._known: _Known | None = None
        self.relayed: RelayedFields | None = None
        self._line = _RequestLine()
        self._line_parser: httptools.HttpRequestParser | None = None
        self._watchdog: Watchdog | None = None
        # Keep-alive idleness: the time the connection went idle (None: it is not), and
        # a timer that moves on to it rather than being re-armed on every request.
        self._idle_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._eof = False
        self.busy = False

    # asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports don't subclass asyncio.Transport, but implement it.
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer_ip = str(peer[0])
        self._front.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.data_received(data)
            return
        self._idle_since = None
        exchange = self._exchange
        if exchange is not None and exchange.wants_body:
            data = exchange.request_body(data)
        if not self._buffer and not self.busy and data.endswith(b"\r\n\r\n"):
            # The common read: one whole head and nothing more, served from ``data``
            # itself (the buffer would cost an append, a copy and a clear). A known one
            # needs no search for its end (bytes.find is a generic call, with its
            # arguments parsed from a tuple).
            request = self._known_request(data)
            if request is None and data.find(b"\r\n\r\n") + 4 == len(data):
                request = self._new_request(data)
                if request is None:
                    self._buffer += data
                    self._hand_over()
                    return
            if request is not None:
                self._begin(request).start()
                return
        self._buffer += data
        if self.busy:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self.pause_reading()
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
        if self._exchange is not None:
            self._exchange.client_eof()
        # Keep the transport open for an answer in progress (a client may half-close
        # after its request); otherwise there is nothing more to do.
        return True if self.busy else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._front.connections.discard(self)
        self._cancel_idle_timer()
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._delegate is not None:
            self._delegate.connection_lost(exc)
        elif self._exchange is not None:
            self._exchange.client_lost()

    def pause_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.pause_writing()
        elif self._exchange is not None:
            self._exchange.client_write_paused()

    def resume_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.resume_writing()
        elif self._exchange is not None:
            self._exchange.client_write_resumed()

    # Used by Front and the exchange ---------------------------------------------------

    def buffered(self) -> bytes:
        """What has arrived and not been served yet (for tests and debugging)."""
        return bytes(self._buffer)

    def close_if_idle(self) -> None:
        if not self.busy and self._delegate is None and self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def switch_to(self, protocol: asyncio.Protocol) -> None:
        """Every byte from here on (buffered ones first) is ``protocol``'s: aiohttp's
        after a hand-over, a WebSocket splice's after a 101."""
        self._delegate = protocol
        data, self._buffer = bytes(self._buffer), bytearray()
        self.resume_reading()
        if data:
            protocol.data_received(data)
        if self._eof:
            protocol.eof_received()

    def exchange_done(self, record: RequestRecord, keep_alive: bool) -> None:
        """The request is answered (or abandoned): account, then the next one or close."""
        handler = self._front.handler
        handler.account(record)
        if handler.listener is not None:
            # Bytes of the next request already in: its head is due within the header
            # timeout from now (the listener only times heads from their first read).
            handler.listener.request_finished(self.transport, head_begun=bool(self._buffer))
        self.busy = False
        self._exchange = None
        self._front._request_ended()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not keep_alive or handler.draining:
            transport.close()
            return
        self.resume_reading()
        if self._buffer:
            # The next pipelined request, on the next loop turn (not deeper in the stack).
            self._loop.call_soon(self._continue)
        elif self._eof:
            transport.close()
        else:
            loop = self._loop
            self._idle_since = loop.time()
            if self._idle_timer is None:
                self._idle_timer = loop.call_at(
                    self._idle_since + self._front.keepalive_idle_seconds, self._close_if_still_idle
                )

    # Requests -------------------------------------------------------------------------

    def _next_request(self) -> None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            # A head split inside a CRLF ends in CR for now: not a bare one yet.
            partial = buffer[:-1] if buffer.endswith(b"\r") else buffer
            if len(buffer) > MAX_HEAD_BYTES or _has_bare_cr_or_lf(partial):
                self._hand_over()
            elif self._eof and self.transport is not None:
                self.transport.close()  # the client is done sending: this head can't complete
            return
        request = self._request_of(bytes(buffer[: end + 4]))
        if request is None:
            self._hand_over()
            return
        del buffer[: end + 4]
        exchange = self._begin(request)
        if buffer and exchange.wants_body:
            self._buffer = bytearray(exchange.request_body(bytes(buffer)))
        exchange.start()

    def _begin(self, request: Request) -> Exchange:
        """The exchange for ``request``, whose head has been taken from the input."""
        self.busy = True
        self._front._request_began()
        handler = self._front.handler
        if handler.listener is not None:
            handler.listener.request_started(self.transport)
        if self._watchdog is None:
            self._watchdog = Watchdog(self._loop)
        exchange = self._exchange = Exchange(
            self, handler, request, read_idle_seconds=self._front.read_idle_seconds,
            watchdog=self._watchdog,
        )  # fmt: skip
        return exchange

    def _request_of(self, head: bytes) -> Request | None:
        """The request in ``head`` (one whole head) if the front serves it, else None
        (aiohttp's)."""
        return self._known_request(head) or self._new_request(head)

    def _known_request(self, head: bytes) -> Request | None:
        """The request in ``head`` (one whole head) when its header block is the last
        one served, which was complete with no body and no upgrade, and its line is
        plain (``_plain_line``): then llhttp has nothing to add. Else None."""
        known = self._known
        if known is None or not known.plain or len(head) > MAX_HEAD_BYTES:
            return None
        if not head.endswith(known.block):
            return None
        # A plain line holds one CRLF, at its end: so the block starts where it ends.
        line = head[: len(head) - len(known.block)]
        taken = _plain_line(line)
        if taken is None:
            return None
        return Request(
            taken[0], taken[1], known.facts, body_length=0,
            keep_alive=self._may_keep_alive(known.head, http10=False),
            http10=False, line=line,
        )  # fmt: skip

    def _may_keep_alive(self, parsed: _Head, *, http10: bool) -> bool:
        """Whether the connection may serve a request after this one: the head allows
        it, the client has not half-closed, and the gateway is not draining."""
        return parsed.keep_alive(http10) and not self._eof and not self._front.handler.draining

    def _new_request(self, head: bytes) -> Request | None:
        """``_request_of`` for a head ``_known_request`` did not take: parsed by llhttp."""
        if len(head) > MAX_HEAD_BYTES:
            return None
        # The header block (everything after the request line): when it is the one the
        # last request had, what it decides is known already (``_Known``); llhttp still
        # checks the whole head, but without a Python call per field.
        line_end = head.find(b"\r\n") + 2
        block = head[line_end:]
        known = self._known if self._known is not None and self._known.block == block else None
        # A known block passed this check when it was new: only the request line is new.
        # llhttp refuses a CR or LF inside a request line but skips them before one, so
        # only a head's first byte needs a look (tests/unit/test_front.py holds llhttp to
        # that; a search of the line was 3 % of a request's instructions).
        if _has_bare_cr_or_lf(head) if known is None else head[0] in (0x0D, 0x0A):
            return None
        handler = self._front.handler
        line: _Head | _RequestLine
        if known is not None:
            parsed, line = known.head, self._line
            line.url = b""
            # One parser for such heads while each ends its message (llhttp starts the
            # next one then): making a parser costs a lookup per callback it might call.
            parser = self._line_parser or httptools.HttpRequestParser(line)
        else:
            parsed = line = _Head(self._front.max_headers)
            parser = httptools.HttpRequestParser(parsed)
        upgrade = refuse = False
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            upgrade = True
        except httptools.HttpParserError:
            refuse = True  # aiohttp's path answers malformed requests
        if known is not None:
            # A body, an upgrade or an error leaves llhttp mid-message: a new one next time.
            self._line_parser = None if parsed.length or upgrade or refuse else parser
        method = parser.get_method()
        # The version as the line ends, not get_http_version() (a new string per call):
        # only HTTP/1.0 and 1.1 are served here, where llhttp takes any digit pair, other
        # protocol names (RTSP/1.0) and version-less HTTP/0.9 lines.
        # (A line shorter than that has no version; compiled, a negative start is an error.)
        version = head[line_end - 11 : line_end - 2] if line_end >= 11 else b""
        http10 = version == b" HTTP/1.0"
        if not (http10 or version == b" HTTP/1.1"):
            return self._unserved_version(head[:line_end])
        if (
            refuse
            or parsed.refuse
            or (upgrade and not parsed.is_websocket_handshake(method, http11=not http10))
            or not (parsed.complete or parsed.length or upgrade)
            or method == b"CONNECT"
        ):
            return None
        if known is None:
            request_headers = [
                (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                for k, v in parsed.raw
            ]
            facts = handler.facts(request_headers, self.peer_ip)
            plain = parsed.complete and not parsed.length and not upgrade
            known = self._known = _Known(block, parsed, facts, plain=plain)
        url = line.url
        # "{method} {url} HTTP/1.1" with single spaces (12: two spaces, the version, CRLF).
        canonical = not http10 and line_end == len(method) + len(url) + 12
        return Request(
            method.decode("ascii"),
            # surrogateescape keeps any byte the client sent; request_head encodes it back.
            url.decode("utf-8", "surrogateescape"),
            known.facts,
            body_length=parsed.length,
            keep_alive=self._may_keep_alive(parsed, http10=http10),
            http10=http10,
            line=head[:line_end] if canonical else b"",
        )

    def _unserved_version(self, line: bytes) -> Request | None:
        """The request of ``line`` refused with a 505 (``Connection: close``) when it names
        another protocol version (``_other_protocol``), else None (aiohttp's). Its
        header fields are not read: the page is JSON, the client the peer."""
        other = _other_protocol(line)
        if other is None:
            return None
        method, target, protocol = other
        return Request(
            method, target, self._front.handler.facts([], self.peer_ip), body_length=0,
            keep_alive=False, http10=False,
            refusal=errors.UnsupportedHttpVersion.naming(protocol),
        )  # fmt: skip

    def _hand_over(self) -> None:
        """Give the connection to aiohttp from the start of the current request on."""
        assert self.transport is not None
        self._front.handed_over += 1
        delegate = self._front.fallback()
        delegate.connection_made(self.transport)
        self.switch_to(delegate)

    def _continue(self) -> None:
        transport = self.transport
        if not self.busy and self._delegate is None and transport and not transport.is_closing():
            self._next_request()

    def _close_if_still_idle(self) -> None:
        self._idle_timer = None
        since = self._idle_since
        if since is None or self.busy or self.transport is None:
            return  # in use again: the next idle moment arms a new timer
        loop = self._loop
        due = since + self._front.keepalive_idle_seconds
        if due > loop.time():
            self._idle_timer = loop.call_at(due, self._close_if_still_idle)
        else:
            self.transport.close()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


# A plain request line's start ("{method} /") and its method (``_plain_line``).
_PLAIN_STARTS: typing.Final = tuple(
    (f"{method} /".encode("ascii"), method)
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE")
)
# Every byte llhttp takes in a target as itself; any other byte to another one (XOR 1).
_TARGET_BYTES: typing.Final = bytes(b if 0x21 <= b <= 0x7E else b ^ 1 for b in range(256))


def _plain_line(line: bytes) -> tuple[str, str] | None:
    """The method and target of ``line`` when it is ``{method} {target} HTTP/1.1`` and
    CRLF, with a method of ``_PLAIN_STARTS`` and an origin-form target of printable
    ASCII: llhttp takes each such line as it is (tests/unit/test_front.py holds it to
    that), so with a known header block it needs no parse (a third of a small request's
    head handling). Else None: llhttp's to parse.

    (Compiled, ``startswith``, ``endswith`` and ``translate`` on bytes are C calls, where
    ``find``, ``isascii`` or ``isprintable`` would each be a generic method call.)"""
    if not line.endswith(b" HTTP/1.1\r\n"):
        return None
    for start, method in _PLAIN_STARTS:
        if line.startswith(start):
            # (the start ends in "/" and the end begins with " ": they can't overlap)
            target = line[len(start) - 1 : -11]
            if target.translate(_TARGET_BYTES) != target:
                return None  # a control byte, a space, DEL or an 8-bit byte
            return method, target.decode("ascii")
    return None


# A request line with a protocol version (or none, HTTP/0.9) and nothing odd about it.
_VERSIONED_LINE: typing.Final = re.compile(rb"([A-Z]+) ([!-~]+)(?: ([A-Z]+/[0-9]\.[0-9]))?\r\n")


def _other_protocol(line: bytes) -> tuple[str, str, str] | None:
    """The method, target and protocol of a request line (with its CRLF) that names a
    protocol other than HTTP/1.0 and HTTP/1.1: ``NAME/d.d`` as its third word
    (``HTTP/2.0``, ``HTTP/1.2``, ``RTSP/1.0``, and the HTTP/2 preface's ``PRI *
    HTTP/2.0``), or no third word (an HTTP/0.9 request, ``GET /a``, is ``HTTP/0.9``).
    None for HTTP/1.x and for lines too odd to say (malformed: aiohttp's to refuse)."""
    match = _VERSIONED_LINE.fullmatch(line)
    if match is None:
        return None
    method, target, protocol = match.groups()
    if protocol in (b"HTTP/1.0", b"HTTP/1.1"):
        return None
    return method.decode(), target.decode(), (protocol or b"HTTP/0.9").decode()


def _has_bare_cr_or_lf(data: bytes | bytearray) -> bool:
    """Whether a line ends in anything but CRLF (parsers disagree on those: desync)."""
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf
