"""The HTTP/1.1 client that talks to sandboxes: asyncio protocols + llhttp (httptools).

The one module that knows how bytes reach a sandbox, behind a small interface with two
ways of reading an answer:

- awaiting: ``UpstreamPool.request(target, head, body)`` returns an ``UpstreamResponse``
  once its head is in; its body is read with ``read_chunk()`` (aiohttp's path);
- pushed: ``UpstreamPool.begin(target, consumer)`` / ``connect_and_begin`` bind a
  response to a ``ResponseConsumer`` whose methods the connection calls as the answer
  arrives, with no Task, future or coroutine per request (the front's path, where
  those are most of a small request's cost: docs/performance.md).

Socket and parser errors are translated into the gateway's ``Upstream*`` errors here and
nowhere else.

Why not aiohttp's ClientSession: for a proxy it adds headers, follows redirects, keeps a
cookie jar, decompresses, retries non-replayable requests and costs most of the CPU of a
proxied request (shared/research/aiohttp-proxy-facts.md sections 0 and 5). This client
sends exactly the head the forwarder built and returns the sandbox's bytes unchanged.

Pooling: idle keep-alive connections are kept per (incarnation, port), so a sandbox
address recycled to another tenant (a new incarnation) never reuses a connection, and
are dropped after ``pool_idle_seconds`` (below the 5 s idle timeout of Node and uvicorn
dev servers, so a request rarely lands on a connection the server is closing).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass

import httptools
from mypy_extensions import trait

from gateway import errors
from gateway.routing.model import Upstream

# Response bytes buffered per connection before the sandbox socket is paused.
HIGH_WATER_BYTES: typing.Final = 256 * 1024
# A response head (status line and headers) larger than this is a broken sandbox, not a
# reason to buffer without end (the listener allows 16 KiB per request field).
MAX_RESPONSE_HEAD_BYTES: typing.Final = 256 * 1024
LOW_WATER_BYTES: typing.Final = 64 * 1024
# A bound on the distinct answer heads the pool knows (UpstreamPool._known_answer).
MAX_KNOWN_HEADS: typing.Final = 1024
# Request body bytes the sandbox socket's buffer may hold before the client is paused:
# above one read of the client (256 KiB), so an upload is not paused on every read.
WRITE_HIGH_WATER_BYTES: typing.Final = 512 * 1024
_CONNECT_RETRY_STEP_SECONDS: typing.Final = 0.05
EXPECT_CONTINUE_WAIT_SECONDS: typing.Final = 1.0
# A static: compiled, each ``time.monotonic()`` would look the function up in the module.
_monotonic: typing.Final = time.monotonic


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    connect_seconds: float
    connect_retry_window_seconds: float
    response_seconds: float
    read_idle_seconds: float
    pool_idle_seconds: float


@trait
class ResponseConsumer:
    """Where a pushed ``UpstreamResponse`` reports, called from the connection's callbacks.

    Contract: ``response_head`` once the final head is in (``status``, ``headers``);
    then ``response_body`` per piece of body; then exactly one of ``response_end`` (the
    body is complete; ``release()`` may be called from inside it) or
    ``response_failed`` (also before the head). ``response_flush`` after each batch of
    bytes from the sandbox has been parsed, so a consumer can write what one read
    brought in one write. ``sandbox_write_paused``/``resumed`` follow the sandbox
    socket's write buffer (request body flow control).
    """

    @abc.abstractmethod
    def response_head(self, response: UpstreamResponse) -> None: ...

    @abc.abstractmethod
    def response_body(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def response_end(self, response: UpstreamResponse) -> None: ...

    @abc.abstractmethod
    def response_failed(self, error: errors.EdgeError) -> None: ...

    @abc.abstractmethod
    def response_flush(self) -> None: ...

    @abc.abstractmethod
    def sandbox_write_paused(self) -> None: ...

    @abc.abstractmethod
    def sandbox_write_resumed(self) -> None: ...


class RequestBody(typing.Protocol):
    """A request body for the awaiting way, read piece by piece."""

    async def read(self) -> bytes:
        """The next piece; ``b""`` once the body is complete."""


class _HeadTooLarge(Exception):
    """Raised inside a parser callback: the response head passed MAX_RESPONSE_HEAD_BYTES."""


class _KnownAnswer:
    """An answer's ``head`` that a parser read whole, with its ``Content-Length`` body,
    from one read, and what llhttp found in it. llhttp parses the same bytes at the
    start of a message the same way, so a later read of the same size that starts with
    ``head`` is the same head with a body of that length. Shared by the pool's
    connections (``UpstreamPool._known_answer``)."""

    __slots__ = ("head", "keep_alive", "raw", "reason", "size", "status")

    def __init__(self, head: bytes, response: UpstreamResponse) -> None:
        self.head = head
        self.size = len(head) + response.body_received  # the head and its body
        self.status = response.status
        self.reason = response._reason
        self.raw = tuple(response._raw_headers)
        self.keep_alive = response.keep_alive


class _Connection(asyncio.Protocol):
    """One TCP connection to a sandbox, carrying one request/response at a time.

    A sandbox mostly answers a connection's requests with one head (a dev server's
    assets, a polled endpoint): the second time a whole answer arrives in one read with
    the head the last one had, it becomes the connection's ``_KnownAnswer``, and a read
    of its size that starts with its head is taken without the parser (its callbacks
    were a tenth of a small request's instructions, docs/performance.md).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._response: UpstreamResponse | None = None
        # One parser for the connection's life: llhttp parses one response after
        # another. Replaced only after a HEAD (llhttp would wait for the body its
        # Content-Length announces).
        self._parser: httptools.HttpResponseParser | None = None
        self._parser_spent = True
        # The head of a consumer's response ended in the current read (see data_received).
        self._head_just_parsed = False
        # A pushed response's Content-Length body bytes still to come, past the parser.
        self._body_left = 0
        self._known: _KnownAnswer | None = None
        # The last parsed final head (status, reason, fields): a head seen twice in a
        # row is worth knowing (``_learn``).
        self._last_status = 0
        self._last_reason = b""
        self._last_raw: list[tuple[bytes, bytes]] = []
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._lost = asyncio.get_running_loop().create_future()

    # asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports don't subclass asyncio.Transport, but implement it.
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None or self._parser is None:
            # Bytes with no request outstanding: the sandbox broke HTTP; never reuse.
            self._abort()
            return
        consumer = response.consumer
        if self._body_left:
            self._pass_body(response, data)
            return
        known = self._known
        fresh = not response.began  # this read begins the response
        if (
            fresh and known is not None and len(data) == known.size
            and not response._head_only and data.startswith(known.head)
        ):  # fmt: skip
            self._take_known(response, known, data)
            return
        response.began = True
        try:
            self._parser.feed_data(data)
            if consumer is not None:
                consumer.response_flush()
                if self._head_just_parsed:
                    self._head_just_parsed = False
                    # Framing is read only for a body still to come: most small
                    # responses arrive whole in the read that holds their head.
                    length = 0 if response.complete else response._content_length()
                    if length:
                        self._body_left = length - response.body_received
                        self._parser_spent = True  # llhttp still counts that body: no reuse
            if fresh and response.complete:
                self._learn(response, data)
        except httptools.HttpParserUpgrade:
            response._fail(errors.UpstreamProtocolError("the sandbox switched protocols"))
            self._abort()
        except httptools.HttpParserError as exc:
            # (A callback's exception arrives wrapped, as the error's __context__.)
            if isinstance(exc.__context__, _HeadTooLarge):
                message = "the sandbox sent a response head without end"
            else:
                message = f"the sandbox broke HTTP: {exc}"
            response._fail(errors.UpstreamProtocolError(message))
            self._abort()

    def _take_known(self, response: UpstreamResponse, known: _KnownAnswer, data: bytes) -> None:
        """``data`` is ``known``'s head and its whole body: the parser's callbacks, made
        here (the parser stays at the start of a message, where it was)."""
        response.began = True
        response._reason = known.reason
        response._raw_headers = list(known.raw)
        response._pool.known_answers += 1
        response._headers_done(known.status, known.keep_alive)
        if len(data) > len(known.head):
            response._feed(data[len(known.head) :])
        self._finish_message(keep_alive_ok=True)

    def _learn(self, response: UpstreamResponse, data: bytes) -> None:
        """Know the answer ``response`` (complete, and begun by ``data``) when its head
        is the last parsed one's too, came whole in ``data`` with a Content-Length body,
        and is exactly the bytes its parts give back (so its end is where llhttp found
        it)."""
        status, reason, raw = response.status, response._reason, response._raw_headers
        if status != self._last_status or reason != self._last_reason or raw != self._last_raw:
            self._last_status, self._last_reason, self._last_raw = status, reason, raw
            return
        if response.no_body or status < 200:
            return  # a HEAD's or a 204's length is not its body's
        length, coding = response._framing()
        if coding is not None or length is None or length != response.body_received:
            return
        head = b"HTTP/1.1 %d %b\r\n%b\r\n" % (
            status, reason, b"".join([b"%b: %b\r\n" % field for field in raw])
        )  # fmt: skip
        if len(data) == len(head) + length and data.startswith(head):
            self._known = response._pool._known_answer(head, response)

    def _pass_body(self, response: UpstreamResponse, data: bytes) -> None:
        """The rest of a Content-Length body, pushed without the parser: after the first
        read, only a count is needed to find its end (and no copy of every chunk)."""
        consumer = response.consumer
        assert consumer is not None
        left = self._body_left
        if len(data) < left:
            self._body_left = left - len(data)
            response.body_received += len(data)
            consumer.response_body(data)
            consumer.response_flush()
            return
        self._body_left = 0
        response.body_received += left
        consumer.response_body(data[:left] if len(data) > left else data)
        self._finish_message(keep_alive_ok=True)
        if len(data) > left:
            self._abort()  # bytes past the body, with no request outstanding

    def eof_received(self) -> bool | None:
        self._on_gone(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_gone(exc)
        self._can_write.set()
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._can_write.clear()
        if self._response is not None and self._response.consumer is not None:
            self._response.consumer.sandbox_write_paused()

    def resume_writing(self) -> None:
        self._can_write.set()
        if self._response is not None and self._response.consumer is not None:
            self._response.consumer.sandbox_write_resumed()

    # httptools callbacks --------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        response = self._response
        assert response is not None
        response._reason += status
        response._count_head(len(status))

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self._response
        assert response is not None
        response._raw_headers.append((name, value))
        response._count_head(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        response, parser = self._response, self._parser
        assert response is not None and parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200:
            # 100 Continue and 103 Early Hints are interim: drop them, keep parsing. A
            # 101 without our asking is a protocol break (handled by HttpParserUpgrade).
            response._interim(status)
            return
        response._headers_done(status, parser.should_keep_alive())
        if response.no_body:
            self._finish_message(keep_alive_ok=True)
        elif response.consumer is not None:
            self._head_just_parsed = True

    def on_body(self, body: bytes) -> None:
        response = self._response
        assert response is not None
        response._feed(body)

    def on_message_complete(self) -> None:
        response = self._response
        if response is not None and response.status >= 200:
            self._finish_message(keep_alive_ok=True)

    # Used by the pool and the response ------------------------------------------------

    def start(self, response: UpstreamResponse) -> None:
        self._response = response
        if self._parser_spent:
            self._parser = httptools.HttpResponseParser(self)
        self._parser_spent = response.no_body
        response._connection = self
        response.reused = self.reused

    def write_now(self, data: bytes) -> bool:
        """Write without waiting; False if the connection is gone (nothing was sent)."""
        if self.closed or self.transport is None:
            return False
        self.transport.write(data)
        return True

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    async def write(self, data: bytes, *, idle_seconds: float) -> None:
        if self.closed or self.transport is None:
            raise errors.UpstreamProtocolError("the sandbox closed the connection")
        self.transport.write(data)
        if not self._can_write.is_set():
            try:
                async with asyncio.timeout(idle_seconds):
                    await self._can_write.wait()
            except TimeoutError:
                raise errors.UpstreamTimeout("the sandbox stopped reading the body") from None

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _finish_message(self, *, keep_alive_ok: bool) -> None:
        response = self._response
        assert response is not None
        self._response = None
        response._complete(keep_alive_ok and response.keep_alive)

    def _on_gone(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        if response is not None and not response.complete:
            response._connection_ended(exc)

    def _abort(self) -> None:
        self.closed = True
        self._parser_spent = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """A sandbox's response: status and headers first, then the body in chunks.

    Contract: ``read_chunk()`` returns body bytes as they arrive and ``b""`` once the body
    is complete; it raises ``errors.UpstreamProtocolError`` if the sandbox ends the body
    early (the forwarder then aborts the downstream connection) and
    ``errors.UpstreamTimeout`` after ``read_idle`` seconds of silence. ``release()``
    returns the connection to the pool (or closes it) and must be called exactly once.
    """

    def __init__(
        self,
        pool: UpstreamPool,
        target: Upstream,
        *,
        head_only: bool,
        consumer: ResponseConsumer | None = None,
    ) -> None:
        """With a ``consumer``, the answer is pushed to it (see ``ResponseConsumer``) and
        ``read_chunk`` is not used; without one, it is buffered for ``read_chunk``."""
        self._pool = pool
        self._target = target  # whose pool the connection goes back to
        self._head_only = head_only
        self.consumer = consumer
        self._connection: _Connection | None = None
        self._reason = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: errors.EdgeError | None = None
        # Only the awaiting way needs these three (each costs per request).
        self._chunks: collections.deque[bytes] | None = None
        self._head_ready: asyncio.Future[None] | None = None
        self._continue: asyncio.Event | None = None
        if consumer is None:
            self._chunks = collections.deque()
            self._head_ready = asyncio.get_running_loop().create_future()
            self._continue = asyncio.Event()
        self.status = 0
        self.keep_alive = False
        self.complete = False
        self.began = False  # a read of the answer has arrived
        self.body_received = 0
        self.got_bytes = False
        self.request_sent = False  # the whole request went out (else: never reuse)
        # On a pooled connection: the sandbox may have closed it as the request went out
        # (nothing processed; a bodiless request may be sent again on a new one).
        self.reused = False

    @property
    def no_body(self) -> bool:
        return self._head_only or self.status in (204, 304)

    @property
    def reason(self) -> str:
        return self._reason.decode("latin-1")

    @property
    def reason_bytes(self) -> bytes:
        """The reason phrase as the sandbox sent it."""
        return self._reason

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The fields as the sandbox sent them (do not change the list)."""
        return self._raw_headers

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self._raw_headers]

    async def read_chunk(self, *, idle_seconds: float) -> bytes:
        chunks = self._chunks
        assert chunks is not None, "read_chunk is for a response without a consumer"
        while not chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            timer = _fail_later(waiter, idle_seconds, "the sandbox stopped sending the body")
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        chunk = chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered < LOW_WATER_BYTES and self._connection is not None:
            self._connection.resume_reading()
        return chunk

    def take_buffered(self) -> bytes:
        """Every body byte that has arrived and not been read yet (``b""`` if none).

        Lets the forwarder send a small answer that is already complete in one write.
        """
        chunks = self._chunks
        if not chunks:
            return b""
        data = b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._connection is not None:
            self._connection.resume_reading()
        return data

    def write(self, data: bytes) -> bool:
        """Send request bytes now (pushed way); False if the connection is gone."""
        return self._connection is not None and self._connection.write_now(data)

    def pause_reading(self) -> None:
        """Stop reading the sandbox (pushed way: the client is not keeping up)."""
        if self._connection is not None:
            self._connection.pause_reading()

    def resume_reading(self) -> None:
        if self._connection is not None:
            self._connection.resume_reading()

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        reusable = self.complete and self.keep_alive and self.request_sent
        if reusable and not connection.closed and self._error is None:
            self._pool._put_idle(self._target, connection)
        else:
            connection._abort()

    # Called by the connection ---------------------------------------------------------

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
            raise _HeadTooLarge

    def _interim(self, status: int) -> None:
        self._reason = b""
        self._raw_headers.clear()
        self._head_bytes = 0
        if status == 100 and self._continue is not None:
            self._continue.set()

    def _headers_done(self, status: int, keep_alive: bool) -> None:
        self.status = status
        self.keep_alive = keep_alive
        self.got_bytes = True
        if self.consumer is not None:
            self.consumer.response_head(self)
            return
        assert self._continue is not None and self._head_ready is not None
        self._continue.set()  # a final answer instead of 100: the body must not be sent
        if not self._head_ready.done():
            self._head_ready.set_result(None)

    def _feed(self, body: bytes) -> None:
        self.body_received += len(body)
        if self.consumer is not None:
            self.consumer.response_body(body)
            return
        assert self._chunks is not None
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER_BYTES:
            self.pause_reading()
        self._wake()

    def _complete(self, keep_alive: bool) -> None:
        self.complete = True
        self.keep_alive = keep_alive
        if self.consumer is not None:
            self.consumer.response_end(self)
            return
        self._wake()

    def _fail(self, error: errors.EdgeError) -> None:
        if self.complete or self._error is not None:
            return
        self._error = error
        if self.consumer is not None:
            self.consumer.response_failed(error)
            return
        assert self._continue is not None and self._head_ready is not None
        if not self._head_ready.done():
            self._head_ready.set_exception(error)
            self._head_ready.exception()  # retrieved here; re-raised by the awaiting request()
        self._continue.set()
        self._wake()

    def _connection_ended(self, exc: Exception | None) -> None:
        if self.status and not self._raw_headers_expect_more():
            self._complete(keep_alive=False)
            return
        detail = f": {exc}" if exc else ""
        self._fail(errors.UpstreamProtocolError(f"the sandbox closed the connection{detail}"))

    def _content_length(self) -> int:
        """The Content-Length of a response without Transfer-Encoding, else 0 (such a
        body is always parsed)."""
        length, coding = self._framing()
        return 0 if coding is not None or length is None else length

    def _raw_headers_expect_more(self) -> bool:
        # A response with neither Content-Length nor chunked framing ends at close.
        length, coding = self._framing()
        return length is not None or (coding is not None and b"chunked" in coding.lower())

    def _framing(self) -> tuple[int | None, bytes | None]:
        """The Content-Length and the Transfer-Encoding values (joined) the sandbox sent,
        None for an absent one (llhttp has refused duplicate lengths and non-digits)."""
        length: int | None = None
        coding: bytes | None = None
        for name, value in self._raw_headers:
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                coding = value if coding is None else coding + b"," + value
        return length, coding

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _fail_later(future: asyncio.Future[None], seconds: float, message: str) -> asyncio.TimerHandle:
    """Fail ``future`` with ``UpstreamTimeout(message)`` unless it is done in ``seconds``.

    One timer handle instead of ``asyncio.timeout()``, and no closure per call: the
    request path waits like this on every request, and both show up in profiles
    (docs/performance.md).
    """
    return asyncio.get_running_loop().call_later(seconds, _expire, future, message)


def _expire(future: asyncio.Future[None], message: str) -> None:
    if not future.done():
        future.set_exception(errors.UpstreamTimeout(message))


_P = typing.TypeVar("_P", bound=asyncio.BaseProtocol)


class UpstreamPool:
    """Connections to sandboxes, pooled per (incarnation, port)."""

    def __init__(
        self, timeouts: UpstreamTimeouts, *, observe_connect: Callable[[float], None] | None = None
    ) -> None:
        self._timeouts = timeouts
        # Called with the seconds each new TCP connect to a sandbox took.
        self._observe_connect = observe_connect
        # Idle connections by incarnation, then port: two lookups of a str and an int are
        # cheaper than one of a (str, int) tuple, which compiled code builds per lookup.
        self._idle: dict[str, dict[int, list[_Connection]]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._sweeping = False  # the sweeper runs
        self.known_answers = 0  # answers taken as a connection's _KnownAnswer
        self._known_heads: dict[bytes, _KnownAnswer] = {}

    async def request(
        self,
        target: Upstream,
        head: bytes,
        body: RequestBody | None,
        *,
        chunked: bool,
        head_only: bool,
        expect_continue: bool = False,
    ) -> UpstreamResponse:
        """Send ``head`` (and ``body``) to ``target``; return once the response head is in.

        Args:
            head: the complete request head, ending in CRLF CRLF.
            body: the request body, or None for none.
            chunked: frame ``body`` with chunked encoding (the head says so).
            head_only: a HEAD request (the response has no body whatever it says).
            expect_continue: wait for the sandbox's 100 Continue before sending ``body``.

        Raises:
            errors.UpstreamRefused, errors.UpstreamTimeout, errors.UpstreamProtocolError.
        """
        connection = self._take_idle(target) or await self._connect(target)
        response = UpstreamResponse(self, target, head_only=head_only)
        head_ready = response._head_ready
        assert head_ready is not None
        connection.start(response)
        try:
            await connection.write(head, idle_seconds=self._timeouts.read_idle_seconds)
            if body is not None:
                await self._send_body_until_answer(
                    connection, response, body, chunked, expect_continue
                )
            else:
                response.request_sent = True
            # Awaited here rather than in a helper: one coroutine frame less to resume
            # on every request (docs/performance.md).
            timer = _fail_later(
                head_ready, self._timeouts.response_seconds, "the sandbox did not answer in time"
            )
            try:
                await head_ready
            finally:
                timer.cancel()
        except errors.UpstreamProtocolError:
            response.release()
            if not (connection.reused and body is None and not response.got_bytes):
                raise
        except BaseException:
            response.release()
            raise
        else:
            return response
        # The sandbox closed an idle keep-alive connection just as we reused it; nothing
        # was processed, so a bodiless request is safe to send again. (Awaited outside
        # the handler: see gateway/compiled.py on awaits in except and finally.)
        return await self.request(target, head, None, chunked=False, head_only=head_only)

    def begin(
        self, target: Upstream, consumer: ResponseConsumer, *, head_only: bool
    ) -> UpstreamResponse | None:
        """A pushed response on an idle pooled connection to ``target``, or None if
        there is none (then ``connect_and_begin``). The caller writes the request with
        ``response.write`` and times the answer itself."""
        connection = self._take_idle(target)
        return None if connection is None else self._bind(connection, target, consumer, head_only)

    async def connect_and_begin(
        self, target: Upstream, consumer: ResponseConsumer, *, head_only: bool
    ) -> UpstreamResponse:
        """As ``begin``, on a new connection.

        Raises:
            errors.UpstreamRefused, errors.UpstreamTimeout.
        """
        connection = await self._connect(target)
        return self._bind(connection, target, consumer, head_only)

    def _bind(
        self, connection: _Connection, target: Upstream, consumer: ResponseConsumer, head_only: bool
    ) -> UpstreamResponse:
        response = UpstreamResponse(self, target, head_only=head_only, consumer=consumer)
        connection.start(response)
        return response

    @property
    def timeouts(self) -> UpstreamTimeouts:
        return self._timeouts

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()  # (maybe before it ran: then its finally never does)
            self._sweeping = False
        for by_port in self._idle.values():
            for connections in by_port.values():
                for connection in connections:
                    connection._abort()
        self._idle.clear()

    def idle_count(self) -> int:
        return sum(len(c) for by_port in self._idle.values() for c in by_port.values())

    # Private methods ------------------------------------------------------------------

    async def _send_body_until_answer(
        self,
        connection: _Connection,
        response: UpstreamResponse,
        body: RequestBody,
        chunked: bool,
        expect_continue: bool,
    ) -> None:
        """Send ``body``, unless the sandbox answers first.

        A sandbox may answer before it has read the whole body (413, 401, a redirect) and
        then stop reading or close: that answer is what the client must get, not a 502
        for the failed rest of the upload, and not a wait for the idle timeout.
        """
        sender = asyncio.get_running_loop().create_task(
            self._send_body(connection, response, body, chunked, expect_continue)
        )
        assert response._head_ready is not None
        try:
            await asyncio.wait((sender, response._head_ready), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # The client went away: stop sending (the cancelled sender ends on its own;
            # nothing is awaited in a handler, see gateway/compiled.py).
            sender.cancel()
            raise
        if not sender.done():
            # The sandbox answered (or broke the protocol) mid-body: stop sending; the
            # connection won't be reused.
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
        if sender.cancelled():
            return
        failure = sender.exception()
        if failure is not None and not response.status:
            raise failure
        # else: sent, or failed after a final answer arrived (relay that answer).

    async def _send_body(
        self,
        connection: _Connection,
        response: UpstreamResponse,
        body: RequestBody,
        chunked: bool,
        expect_continue: bool,
    ) -> None:
        idle = self._timeouts.read_idle_seconds
        if expect_continue and response._continue is not None:
            # Servers may ignore Expect; RFC 9110 section 10.1.1 lets a client go ahead
            # after a while without the 100.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXPECT_CONTINUE_WAIT_SECONDS):
                    await response._continue.wait()
            if response.status >= 200 or response._error is not None:
                return  # the sandbox answered without wanting the body
        while chunk := await body.read():
            if response.status >= 200 or connection.closed:
                return  # an early final answer: stop sending (the connection won't be reused)
            if chunked:
                await connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk), idle_seconds=idle)
            else:
                await connection.write(chunk, idle_seconds=idle)
        if chunked:
            await connection.write(b"0\r\n\r\n", idle_seconds=idle)
        response.request_sent = True

    async def _connect(self, target: Upstream) -> _Connection:
        return await self.connect(target, _Connection)

    async def connect(self, target: Upstream, protocol: Callable[[], _P]) -> _P:
        """A new TCP connection to ``target`` with ``protocol``, never pooled (the
        WebSocket splice's; the pool's own go through here too).

        Raises:
            errors.UpstreamRefused, errors.UpstreamTimeout.
        """
        loop = asyncio.get_running_loop()
        deadline = _monotonic() + self._timeouts.connect_retry_window_seconds
        while True:
            try:
                started = _monotonic()
                async with asyncio.timeout(self._timeouts.connect_seconds):
                    _, connection = await loop.create_connection(
                        protocol, target.address, target.port
                    )
                if self._observe_connect is not None:
                    self._observe_connect(_monotonic() - started)
                return connection
            except TimeoutError:
                raise errors.UpstreamTimeout(
                    f"connecting to port {target.port} of the sandbox timed out"
                ) from None
            except ConnectionRefusedError:
                if _monotonic() + _CONNECT_RETRY_STEP_SECONDS > deadline:
                    raise errors.UpstreamRefused(
                        f"nothing is listening on port {target.port}"
                    ) from None
            except OSError as exc:
                raise errors.UpstreamRefused(
                    f"port {target.port} of the sandbox is unreachable: {exc.strerror}"
                ) from None
            # Refused with time left: the sandbox's server may be starting. (Awaited
            # outside the handler: see gateway/compiled.py.)
            await asyncio.sleep(_CONNECT_RETRY_STEP_SECONDS)

    def _known_answer(self, head: bytes, response: UpstreamResponse) -> _KnownAnswer:
        """The one ``_KnownAnswer`` of ``head`` (``response``'s): connections that repeat
        an answer share its fields' objects, so comparing two answers' fields (as the
        front does, exchange.RelayedFields) is mostly comparing identities."""
        known = self._known_heads.get(head)
        if known is None:
            if len(self._known_heads) >= MAX_KNOWN_HEADS:
                self._known_heads.clear()
            known = self._known_heads[head] = _KnownAnswer(head, response)
        return known

    def _take_idle(self, target: Upstream) -> _Connection | None:
        by_port = self._idle.get(target.incarnation)
        connections = None if by_port is None else by_port.get(target.port)
        limit = _monotonic() - self._timeouts.pool_idle_seconds
        while connections:
            connection = connections.pop()
            if not connection.closed and connection.idle_since > limit:
                connection.reused = True
                return connection
            connection._abort()
        return None

    def _put_idle(self, target: Upstream, connection: _Connection) -> None:
        connection.idle_since = _monotonic()
        # (not setdefault: its default would be made every time)
        by_port = self._idle.get(target.incarnation)
        if by_port is None:
            by_port = self._idle[target.incarnation] = {}
        idle = by_port.get(target.port)
        if idle is None:
            idle = by_port[target.port] = []
        idle.append(connection)
        if not self._sweeping:  # (not Task.done(): a generic call per request)
            self._sweeping = True
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close idle connections past their time, so a quiet pool holds no sockets."""
        try:
            while self._idle:
                await asyncio.sleep(self._timeouts.pool_idle_seconds)
                limit = _monotonic() - self._timeouts.pool_idle_seconds
                for incarnation, by_port in list(self._idle.items()):
                    for port, connections in list(by_port.items()):
                        keep = []
                        for connection in connections:
                            if connection.closed or connection.idle_since <= limit:
                                connection._abort()
                            else:
                                keep.append(connection)
                        if keep:
                            by_port[port] = keep
                        else:
                            del by_port[port]
                    if not by_port:
                        del self._idle[incarnation]
        finally:
            self._sweeping = False
