"""One request the front serves: planned, then answered or forwarded, driven by callbacks.

The common request (its route in the cache, an idle pooled connection to the sandbox)
runs from the two sockets' callbacks alone: the client's head arrives, the request goes
out on the sandbox connection, the sandbox's answer is relayed as each read arrives, and
the exchange ends inside the callback that brought the last byte. No Task, future or
coroutine is made for it: on a small request those cost as much as everything else the
gateway does (docs/performance.md). Only what must wait (a Redis lookup, a new connection
to the sandbox) runs in a Task, which hands back to the callbacks when it is done.

States: PLANNING -> SENDING (a request body) -> WAITING (for the answer's head) ->
STREAMING (the answer's body) -> done. Before the head goes out, a failure is one of the
gateway's own answers (``EdgeHandler.error_page``); after it, the only honest signal is
a reset of the client's connection (never a short complete answer).

Flow control in both directions: a client that sends faster than the sandbox reads is
paused while the sandbox socket's write buffer is full; a sandbox that sends faster than
the client reads is paused while the client socket's is. Memory stays bounded by the two
socket buffers.

Timeouts: one timer per connection (``Watchdog``). WAITING: ``response_seconds`` for the
head. SENDING and STREAMING: ``read_idle_seconds`` without progress (a stalled client,
or a sandbox that stopped reading or sending: flow control turns a side that stopped
reading into one that makes no progress). No total timeout on streams.
"""

from __future__ import annotations

import abc
import asyncio
import email.utils
import functools
import logging
import time
import typing
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from mypy_extensions import trait

from gateway import errors, headers
from gateway.headers import HeaderPairs
from gateway.proxy.accounting import RequestRecord
from gateway.proxy.handler import EdgeHandler, HeadFacts, PendingPlan, reset_client
from gateway.proxy.http import Answer, RequestPlan, request_head
from gateway.proxy.sessions import Session
from gateway.proxy.upstream import ResponseConsumer, UpstreamResponse
from gateway.proxy.wssplice import WebSocketSplice
from gateway.routing.model import Sandbox

log = logging.getLogger("gateway.front")

# Request body bytes held for a sandbox not connected yet, before the client is paused.
BODY_HIGH_WATER_BYTES: typing.Final = 256 * 1024
_NO_BODY_STATUSES: typing.Final = frozenset((204, 304))
_T = typing.TypeVar("_T")
# Statics: compiled, each ``time.monotonic()`` would look the function up in the module.
_monotonic: typing.Final = time.monotonic
_wall_clock: typing.Final = time.time
# The states, one constant each: a Final int is inlined by the compiler, where names
# bound by unpacking are a lookup in the module's dict at every use.
_PLANNING: typing.Final = 0
_SENDING: typing.Final = 1
_WAITING: typing.Final = 2
_STREAMING: typing.Final = 3
_UPGRADED: typing.Final = 4
_DONE: typing.Final = 5
_REQUEST_ID: typing.Final = headers.REQUEST_ID.encode("ascii")
# The name of an exchange's one Task (a lookup or a connect), for tests and debugging.
TASK_NAME: typing.Final = "exchange-wait"


@trait
class Client:
    """What an exchange needs of the client connection it serves (``FrontProtocol``).

    A mypyc trait, as ``upstream.ResponseConsumer`` is: compiled, calls through it are
    C calls, where a ``typing.Protocol`` makes each one a generic method call.
    """

    transport: asyncio.Transport | None
    peer_ip: str
    relayed: RelayedFields | None  # the last response fields relayed on the connection

    @abc.abstractmethod
    def pause_reading(self) -> None: ...

    @abc.abstractmethod
    def resume_reading(self) -> None: ...

    @abc.abstractmethod
    def switch_to(self, protocol: asyncio.Protocol) -> None:
        """The connection is a WebSocket now: its bytes go to ``protocol``."""

    @abc.abstractmethod
    def exchange_done(self, record: RequestRecord, keep_alive: bool) -> None:
        """The exchange is over; serve the next request or close (``keep_alive``)."""


class Request:
    """A request head the front serves itself."""

    __slots__ = (
        "body_length", "facts", "headers", "http10", "keep_alive", "line", "method", "path",
        "refusal",
    )  # fmt: skip

    def __init__(
        self,
        method: str,
        path: str,
        facts: HeadFacts,
        *,
        body_length: int,
        keep_alive: bool,
        http10: bool,
        line: bytes = b"",
        refusal: errors.EdgeError | None = None,
    ) -> None:
        """``line``: the client's request line with its CRLF when it is exactly
        ``{method} {path} HTTP/1.1``, else empty. ``refusal``: the head itself is
        answered with this error's page, never planned or forwarded."""
        self.method = method
        self.path = path
        self.facts = facts  # what its header fields decide (shared by equal heads)
        self.headers: HeaderPairs = facts.request_headers
        self.body_length = body_length  # Content-Length; 0 for none
        self.keep_alive = keep_alive
        self.http10 = http10
        self.line = line
        self.refusal = refusal


class Watchdog:
    """The deadline timer of one client connection, shared by its exchanges in turn.

    A timer armed and cancelled for every request showed as one of the largest costs
    of a small request; this one is armed once, and when it fires before the deadline of
    the exchange then in progress (a later request's), it moves on to that deadline.
    """

    __slots__ = ("_exchange", "_timer", "_when", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop  # the connection's, for its exchanges too
        self._timer: asyncio.TimerHandle | None = None
        self._when = 0.0  # the timer's (kept: TimerHandle.when() is a generic call)
        self._exchange: Exchange | None = None

    def watch(self, exchange: Exchange, due: float) -> None:
        """Call ``exchange.on_deadline()`` at ``due`` or earlier."""
        self._exchange = exchange
        timer = self._timer
        if timer is None or self._when > due:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(due, self._fire)
            self._when = due

    def forget(self, exchange: Exchange) -> None:
        if self._exchange is exchange:
            self._exchange = None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.on_deadline()


class Exchange(ResponseConsumer):
    """One request on a front connection; see the module docstring.

    Contract: made for a request whose head is in, then ``start()``. The client
    connection passes on the request body (``request_body``), its EOF, its loss and its
    write flow control; the exchange calls ``Client.exchange_done`` exactly once.
    """

    __slots__ = (
        "_body_pending", "_body_remaining", "_chunked", "_client", "_client_held",
        "_client_paused", "_due", "_handler", "_head", "_head_sent", "_keep_alive",
        "_last_progress", "_loop", "_out", "_plan", "_read_idle", "_record", "_request",
        "_sandbox_paused", "_sent_at", "_session", "_splice", "_state", "_task", "_upstream",
        "_watchdog",
    )  # fmt: skip

    def __init__(
        self,
        client: Client,
        handler: EdgeHandler,
        request: Request,
        *,
        read_idle_seconds: float,
        watchdog: Watchdog,
    ) -> None:
        self._client = client
        self._handler = handler
        self._request = request
        self._record = handler.new_record(request.method, request.path, request.facts)
        self._keep_alive = request.keep_alive
        self._read_idle = read_idle_seconds
        # Not asyncio.get_running_loop(): on Python 3.11 each call is a getpid syscall.
        self._loop = watchdog.loop
        self._state = _PLANNING
        self._body_remaining = request.body_length
        self._body_pending: list[bytes] = []
        self._plan: RequestPlan | None = None
        self._session: Session | None = None
        self._upstream: UpstreamResponse | None = None
        self._splice: WebSocketSplice | None = None
        self._head = b""
        self._task: asyncio.Task[None] | None = None
        self._watchdog = watchdog
        self._due = 0.0  # WAITING: when the answer's head is overdue
        self._last_progress = 0.0
        self._sent_at = 0.0
        self._out: list[bytes] = []
        self._chunked = False
        self._head_sent = False
        self._sandbox_paused = False
        self._client_paused = False
        self._client_held = False

    # Driven by the front --------------------------------------------------------------

    def start(self) -> None:
        """Plan the request and answer or forward it (now, or after a lookup)."""
        request = self._request
        if request.refusal is not None:
            self.refuse(request.refusal)
            return
        try:
            decided = self._handler.plan_now(
                request.method, request.path, request.facts, self._record
            )
            if isinstance(decided, PendingPlan):
                looking_up = self._handler.lookup(decided.label)
                forward = functools.partial(self._forward_after_lookup, decided)
                self._task = self._loop.create_task(
                    self._after(looking_up, forward), name=TASK_NAME
                )
            elif isinstance(decided, Answer):
                self._answer(decided)
            else:
                self._forward(decided)
        except errors.EdgeError as exc:
            self.refuse(exc)
        except Exception:
            self._crashed()

    def request_body(self, data: bytes) -> bytes:
        """Take the body bytes in ``data``; return what follows the body (pipelined)."""
        # Sliced only when the body ends inside ``data``: compiled, a slice copies even
        # when it spans the whole object (a 256 KiB read of an upload, every time).
        if len(data) <= self._body_remaining:
            take, rest = data, b""
        else:
            take, rest = data[: self._body_remaining], data[self._body_remaining :]
        if take:
            self._body_remaining -= len(take)
            self._record.bytes_in += len(take)
            self._last_progress = self._loop.time()
            if self._state == _SENDING:
                self._send_body(take)
            elif self._state == _PLANNING:
                self._body_pending.append(take)
                if sum(map(len, self._body_pending)) > BODY_HIGH_WATER_BYTES:
                    self._hold_client()
            # else: the sandbox answered before the whole body came; the rest is dropped
        return rest

    @property
    def wants_body(self) -> bool:
        return self._body_remaining > 0

    def client_eof(self) -> None:
        """The client half-closed: a body still owed can never arrive."""
        if self._body_remaining and self._state != _DONE:
            self._client_stalled()

    def client_lost(self) -> None:
        if self._state == _DONE:
            return
        if self._task is not None:
            self._task.cancel()  # the client went away: so does the sandbox request
        if self._record.outcome == "ok":
            self._record.outcome = "client_gone"
        self._done(keep_alive=False)

    def client_write_paused(self) -> None:
        self._client_paused = True
        if self._upstream is not None:
            self._upstream.pause_reading()

    def client_write_resumed(self) -> None:
        self._client_paused = False
        self._last_progress = self._loop.time()
        if self._upstream is not None:
            self._upstream.resume_reading()

    # ResponseConsumer: called from the sandbox connection's callbacks ---------------

    def response_head(self, response: UpstreamResponse) -> None:
        record = self._record
        record.upstream_seconds = _monotonic() - self._sent_at
        record.status = response.status
        request = self._request
        relayed = self._relayed_fields(response)
        has_length, has_date = relayed.has_length, relayed.has_date
        framed = has_length or request.method == "HEAD" or response.status in _NO_BODY_STATUSES
        # Without a length, an HTTP/1.1 client gets chunks; an HTTP/1.0 one gets the body
        # up to the close (it can't read chunks).
        self._chunked = not framed and not request.http10
        if not framed and request.http10:
            self._keep_alive = False
        status_line = _relayed_status_lines.line(response.status, response.reason_bytes)
        # (Bytes formatting of bytes alone is one C call when compiled: no list of lines.)
        self._out.append(
            b"%b%b%bX-Request-Id: %b\r\n%b%b\r\n" % (
                status_line, relayed.lines,
                b"" if has_date else _http_date.line(),
                record.request_id.encode("ascii"),
                b"Transfer-Encoding: chunked\r\n" if self._chunked else b"",
                _connection_line(self._keep_alive, request.http10),
            )
        )  # fmt: skip
        self._head_sent = True
        self._state = _STREAMING
        self._last_progress = now = self._loop.time()
        self._arm(self._read_idle, now)

    def _relayed_fields(self, response: UpstreamResponse) -> RelayedFields:
        """The sandbox's fields as the client gets them, worked out once for a repeated
        set (a sandbox mostly answers one client's requests with the same fields)."""
        known = self._client.relayed
        raw, host = response.raw_headers, self._record.host
        if known is not None and known.raw == raw and known.host == host:
            # The latest list, whose fields a connection's repeated answers share
            # (upstream._KnownAnswer): the next comparison is mostly of identities.
            known.raw = raw
            return known
        fields = headers.downstream_response_headers(response.headers, public_host=host)
        known = self._client.relayed = RelayedFields(raw, host, fields)
        return known

    def response_body(self, data: bytes) -> None:
        self._record.bytes_out += len(data)
        self._out.append(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)

    def response_flush(self) -> None:
        if self._out and self._state == _STREAMING:
            self._last_progress = self._loop.time()
            self._write_out()

    def response_end(self, response: UpstreamResponse) -> None:
        if self._chunked:
            self._out.append(b"0\r\n\r\n")
        self._write_out()
        self._upstream = None
        response.release()
        self._done(self._keep_alive)

    def response_failed(self, error: errors.EdgeError) -> None:
        if self._state == _DONE:
            return
        upstream = self._drop_upstream()
        if self._head_sent:
            self._record.aborted(error.code)
            self.abort_client()
            self._done(keep_alive=False)
        elif (
            isinstance(error, errors.UpstreamProtocolError)
            and upstream is not None
            and upstream.reused
            and not upstream.got_bytes
            and not self._request.body_length
        ):
            # The sandbox closed an idle keep-alive connection just as we reused it;
            # nothing was processed, so a bodiless request is safe to send again.
            self._state = _PLANNING
            self._connect()
        else:
            self.refuse(error)

    def sandbox_write_paused(self) -> None:
        self._sandbox_paused = True
        self._hold_client()

    def sandbox_write_resumed(self) -> None:
        self._sandbox_paused = False
        self._last_progress = self._loop.time()
        self._release_client()

    # wssplice.Owner: the WebSocket splice's calls ----------------------------------

    def answer_and_close(self, answer: Answer) -> None:
        self._record.status = answer.status
        self._keep_alive = False
        self._answer(answer)

    def upgraded(self, head: bytes, protocol: asyncio.Protocol) -> None:
        self._state = _UPGRADED
        self._record.status = 101
        self.write_client(head)
        self._client.switch_to(protocol)

    def websocket_ended(self, *, closed: bool, bytes_in: int, bytes_out: int) -> None:
        record = self._record
        # A session that ended with a close frame to the client ended normally, even if
        # the client's connection dropped right after.
        record.closed = closed
        record.bytes_in, record.bytes_out = bytes_in, bytes_out
        self._done(keep_alive=False)

    def pause_client(self) -> None:
        self._client.pause_reading()

    def resume_client(self) -> None:
        self._client.resume_reading()

    def write_client(self, data: bytes) -> None:
        if self._client.transport is not None:
            self._client.transport.write(data)

    def close_client(self) -> None:
        if self._client.transport is not None:
            self._client.transport.close()

    # Private methods ------------------------------------------------------------------

    async def _after(self, waiting: Awaitable[_T], then: Callable[[_T], None]) -> None:
        """The one Task of an exchange that must wait: ``then(await waiting)``."""
        try:
            result = await waiting
            self._task = None
            then(result)
        except errors.EdgeError as exc:
            self.refuse(exc)
        except Exception:
            self._crashed()

    def _forward_after_lookup(self, pending: PendingPlan, sandbox: Sandbox | None) -> None:
        self._forward(self._handler.finish_plan(pending, sandbox))

    def _forward(self, plan: RequestPlan) -> None:
        self._plan = plan
        if plan.websocket:
            self._open_websocket(plan)
            return
        stop = reset_client(self._client.transport, plan.target.port)
        self._session = self._handler.hold_exchange(plan, self._record, stop)
        request = self._request
        # The request id is the one line not in the block: ASCII by construction
        # (headers.is_valid_request_id), so it needs no header_lines.
        request_id = plan.request_id.encode("ascii")
        block = b"%b%b: %b\r\n" % (plan.upstream_block, _REQUEST_ID, request_id)
        if request.line and plan.path == request.path:
            # The client's line is the one the sandbox gets (byte for byte): no rebuild.
            self._head = b"%b%b\r\n" % (request.line, block)
        else:
            self._head = request_head(request.method, plan.path, [], block=block)
        self._connect()

    def _open_websocket(self, plan: RequestPlan) -> None:
        record = self._record
        record.kind = "websocket"
        splice = WebSocketSplice(
            self, plan, self._request.headers, pool=self._handler.pool,
            request_id=record.request_id, public_host=record.host,
            max_message_bytes=self._handler.websocket_max_message_bytes,
        )  # fmt: skip
        # Held from before the sandbox connect to the end of the session.
        self._session = self._handler.hold_exchange(
            plan, record, splice.close_going_away, restart=splice.close_for_restart
        )
        self._splice = splice
        splice.start()

    def _connect(self) -> None:
        """Send the request on a pooled connection, or on a new one (in a Task)."""
        plan = self._plan
        assert plan is not None
        head_only = self._request.method == "HEAD"
        pool = self._handler.pool
        upstream = pool.begin(plan.target, self, head_only=head_only)
        if upstream is None:
            connecting = pool.connect_and_begin(plan.target, self, head_only=head_only)
            self._task = self._loop.create_task(self._after(connecting, self._send), name=TASK_NAME)
        else:
            self._send(upstream)

    def _send(self, upstream: UpstreamResponse) -> None:
        self._upstream = upstream
        self._sent_at = _monotonic()
        if not upstream.write(self._head):
            self.response_failed(errors.UpstreamProtocolError("the sandbox closed the connection"))
            return
        pending, self._body_pending = self._body_pending, []
        if self._body_remaining or pending:
            self._state = _SENDING
            self._last_progress = now = self._loop.time()
            self._arm(self._read_idle, now)
            self._release_client()
            for chunk in pending:
                self._send_body(chunk)
        else:
            self._sent()

    def _send_body(self, chunk: bytes) -> None:
        upstream = self._upstream
        assert upstream is not None
        upstream.write(chunk)
        if not self._body_remaining and self._state == _SENDING:
            self._sent()

    def _sent(self) -> None:
        """The whole request is out: wait for the answer."""
        assert self._upstream is not None
        self._upstream.request_sent = True
        self._state = _WAITING
        self._arm(self._handler.pool.timeouts.response_seconds, self._loop.time())

    def _arm(self, seconds: float, now: float) -> None:
        """Be woken (``on_deadline``) no later than ``seconds`` after ``now`` (the loop's
        time, which callers often have already: each read of it is a generic call)."""
        self._due = now + seconds
        self._watchdog.watch(self, self._due)

    def on_deadline(self) -> None:
        """The watchdog's call: time out if the current state's limit has passed."""
        state = self._state
        now = self._loop.time()
        if state == _WAITING:
            if now < self._due:
                self._watchdog.watch(self, self._due)
            else:
                self.response_failed(errors.UpstreamTimeout("the sandbox did not answer in time"))
            return
        if state not in (_SENDING, _STREAMING):
            return
        # Progress only notes the time; the deadline moves on to the last progress.
        due = self._last_progress + self._read_idle
        if due > now:
            self._watchdog.watch(self, due)
        elif state == _SENDING and not self._sandbox_paused:
            self._client_stalled()
        elif state == _SENDING:
            self.response_failed(errors.UpstreamTimeout("the sandbox stopped reading the body"))
        elif self._client_paused:
            self.response_failed(errors.UpstreamTimeout("the client stopped reading the answer"))
        else:
            self.response_failed(errors.UpstreamTimeout("the sandbox stopped sending the body"))

    def _hold_client(self) -> None:
        """Stop reading the client until ``_release_client`` (its body waits)."""
        if not self._client_held:
            self._client_held = True
            self._client.pause_reading()

    def _release_client(self) -> None:
        if self._client_held:
            self._client_held = False
            self._client.resume_reading()

    def _write_out(self) -> None:
        out = self._out
        transport = self._client.transport
        if transport is not None and out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _answer(self, answer: Answer) -> None:
        """Send one of the gateway's own answers."""
        request = self._request
        body = b"" if request.method == "HEAD" else answer.body
        if self._client.transport is not None:
            self._client.transport.write(
                b"%b%bContent-Length: %d\r\n%b%b\r\n%b" % (
                    _status_line(answer.status, None), _field_lines(answer.headers),
                    len(answer.body), _http_date.line(),
                    _connection_line(self._keep_alive, request.http10), body,
                )
            )  # fmt: skip
        self._done(self._keep_alive)

    def refuse(self, error: errors.EdgeError) -> None:
        """Answer with the gateway's page for ``error`` (before the answer's head)."""
        if self._state == _DONE:
            return
        self._drop_upstream()
        self._answer(self._handler.error_page(error, self._record, self._request.headers))

    def _client_stalled(self) -> None:
        """No request body byte for ``read_idle_seconds``, or a half-close before the
        body was complete: the sandbox must not get a short body."""
        self._record.outcome = "client_gone"
        self.abort_client()
        self._done(keep_alive=False)

    def _crashed(self) -> None:
        log.exception("request %s failed", self._record.request_id)
        self.abort_client()
        self._done(keep_alive=False)

    def abort_client(self) -> None:
        if self._client.transport is not None:
            self._client.transport.abort()

    def _drop_upstream(self) -> UpstreamResponse | None:
        """Let go of the sandbox connection (an unfinished one is closed, never pooled)."""
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.release()
        return upstream

    def _done(self, keep_alive: bool) -> None:
        if self._state == _DONE:
            return
        self._state = _DONE
        self._watchdog.forget(self)
        self._drop_upstream()
        if self._splice is not None:
            self._splice.abandon()
        if self._session is not None:
            self._handler.release_exchange(self._session)
            self._session = None
        # An answer before the whole body arrived (a 413, say): the rest of the body is
        # still on the wire, so the connection can't carry another request.
        self._client.exchange_done(self._record, keep_alive and not self._body_remaining)


class RelayedFields:
    """A sandbox's response fields (``raw``, for ``host``) as relayed to the client.

    ``raw`` is an answer's own list (``UpstreamResponse.raw_headers``: no one changes it
    once the head is in)."""

    __slots__ = ("has_date", "has_length", "host", "lines", "raw")

    def __init__(self, raw: list[tuple[bytes, bytes]], host: str, fields: HeaderPairs) -> None:
        self.raw = raw
        self.host = host
        self.lines = _field_lines(fields)
        names = {name.lower() for name, _ in fields}
        self.has_length = "content-length" in names
        self.has_date = "date" in names


def _status_line(status: int, reason: bytes | None) -> bytes:
    """``HTTP/1.1 {status} {reason}`` and CRLF; the standard reason when it is None."""
    return b"HTTP/1.1 %d %s\r\n" % (status, _reason(status) if reason is None else reason)


# A sandbox answers with a few status lines, and checking and encoding the reason was a
# twentieth of a small request. Bounded, since the reasons are the sandboxes' to choose.
class _StatusLines:
    """The status lines relayed for sandboxes' answers, by status and reason phrase: the
    reason phrase unless it has control bytes, then the standard one (catalogue UPR-05).
    The last one is kept beside the table: a sandbox mostly answers 200 OK."""

    MAX_LINES: typing.Final = 256

    def __init__(self) -> None:
        self._lines: dict[tuple[int, bytes], bytes] = {}
        self._last_status = 0
        self._last_reason = b""
        self._last_line = b""

    def line(self, status: int, reason: bytes) -> bytes:
        if status == self._last_status and reason == self._last_reason:
            return self._last_line
        key = (status, reason)
        line = self._lines.get(key)
        if line is None:
            if len(self._lines) >= self.MAX_LINES:
                self._lines.clear()
            relayable = headers.relayable_reason(reason.decode("latin-1"))
            line = _status_line(status, relayable.encode("latin-1") if relayable else None)
            self._lines[key] = line
        self._last_status, self._last_reason, self._last_line = status, reason, line
        return line


_relayed_status_lines: typing.Final = _StatusLines()


def _field_lines(fields: HeaderPairs) -> bytes:
    """Header lines in latin-1: what the sandbox sent was decoded so (``UpstreamResponse``),
    so this gives back its bytes exactly; the gateway's own headers are ASCII."""
    return "".join([f"{name}: {value}\r\n" for name, value in fields]).encode("latin-1")


def _connection_line(keep_alive: bool, http10: bool) -> bytes:
    """The ``Connection`` line with its CRLF, as aiohttp says it: none (b"") for
    HTTP/1.1 keep-alive."""
    if not keep_alive:
        return b"Connection: close\r\n"
    return b"Connection: keep-alive\r\n" if http10 else b""


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


class _DateHeader:
    """The Date header line, formatted once a second (RFC 9110 section 5.6.7)."""

    def __init__(self) -> None:
        self._second = 0
        self._line = b""

    def line(self) -> bytes:
        """``Date: {now}`` and CRLF."""
        now = int(_wall_clock())
        if now != self._second:
            self._second = now
            self._line = b"Date: %b\r\n" % email.utils.formatdate(now, usegmt=True).encode()
        return self._line


_http_date: typing.Final = _DateHeader()
