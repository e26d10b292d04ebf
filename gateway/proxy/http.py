"""Forward one HTTP request to a sandbox and stream the answer back, byte for byte.

Contract of ``forward_http``:
- The request goes out with the client's method, raw target (origin-form) and headers as
  built by ``headers.upstream_request_headers``; its body streams with the client's own
  framing (Content-Length kept; chunked re-framed), nothing buffered.
- A failure before the response head is sent raises an ``EdgeError`` (the handler renders
  it). A failure after it cannot become a 502: the downstream connection is aborted, so
  the client sees a broken transfer, never a silently truncated 200.
- There is no total timeout: streams run while bytes flow; only silences are bounded.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass

from aiohttp import hdrs, web
from multidict import CIMultiDict
from mypy_extensions import trait

from gateway import errors, headers
from gateway.proxy.accounting import RequestRecord
from gateway.proxy.upstream import UpstreamPool, UpstreamResponse
from gateway.routing.model import Upstream

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class RelayedResponse(web.StreamResponse):
    """A response head that says only what the sandbox said (plus Date, framing, the id).

    aiohttp's ``StreamResponse`` fills in ``Content-Type: application/octet-stream`` and
    ``Server`` when they are missing; for a proxy both are lies (a browser sniffs a body
    without a type, but downloads an octet-stream), so they are taken out again when the
    sandbox sent none. ``Date`` stays: RFC 9110 section 6.6.1 lets a recipient add it.
    """

    async def _prepare_headers(self) -> None:
        had_type = hdrs.CONTENT_TYPE in self.headers
        had_server = hdrs.SERVER in self.headers
        await super()._prepare_headers()
        if not had_type:
            self.headers.popall(hdrs.CONTENT_TYPE, None)
        if not had_server:
            self.headers.popall(hdrs.SERVER, None)


class AnswerResponse(web.Response):
    """One of the gateway's own answers on aiohttp's path, without the ``Server`` field
    aiohttp adds (``Python/3.11 aiohttp/3.14``): versions help an attacker, and the
    front's answers carry none either (catalogue TEN-12)."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall(hdrs.SERVER, None)


@trait
class UpstreamFields:
    """The header fields a request sends its sandbox (``handler.HeadFacts``); a mypyc
    trait, so that compiled calls through it are C calls (``exchange.Client``)."""

    @abc.abstractmethod
    def upstream_headers(
        self, request_id: str, host_rewrite_port: int | None
    ) -> list[tuple[str, str]]: ...

    @abc.abstractmethod
    def upstream_block(self, host_rewrite_port: int | None) -> bytes: ...


class RequestPlan:
    """What the handler decided to send: the target and the upstream request headers.

    A plain class, built per request: not frozen (a frozen init costs a setattr call
    per field), not a dataclass (compiled, its ``__init__`` would stay interpreted:
    gateway/compiled.py).
    """

    __slots__ = ("connection_limit", "fields", "path", "request_id", "target", "websocket")

    def __init__(
        self,
        target: Upstream,
        path: str,
        fields: UpstreamFields,
        request_id: str,
        *,
        websocket: bool = False,
        connection_limit: int = 0,
    ) -> None:
        self.target = target
        self.path = path
        self.fields = fields
        self.request_id = request_id
        self.websocket = websocket  # a WebSocket upgrade, to be relayed, not forwarded
        # Upstream connections this sandbox may hold at once (gateway/proxy/connlimit.py).
        self.connection_limit = connection_limit

    @property
    def upstream_headers(self) -> list[tuple[str, str]]:
        """The header fields for the sandbox, the request id last (a new list)."""
        return self.fields.upstream_headers(self.request_id, self._rewrite_port)

    @property
    def upstream_block(self) -> bytes:
        """``upstream_headers`` but the request id, as encoded lines (for ``request_head``)."""
        return self.fields.upstream_block(self._rewrite_port)

    @property
    def _rewrite_port(self) -> int | None:
        return self.target.port if self.target.host_rewrite else None


@dataclass(frozen=True, slots=True)
class Answer:
    """A response the gateway gives itself (the health path), without a sandbox."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


async def forward_http(
    request: web.BaseRequest,
    plan: RequestPlan,
    *,
    pool: UpstreamPool,
    read_idle_seconds: float,
    record: RequestRecord,
) -> web.StreamResponse:
    """Forward ``request`` as planned; see the module docstring for the contract.

    Raises:
        errors.UpstreamRefused, errors.UpstreamTimeout, errors.UpstreamProtocolError:
            before the response head went out.
    """
    expect = request.headers.get("Expect", "").lower() == "100-continue"
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    has_body = chunked or int(request.headers.get("Content-Length", "0") or "0") > 0
    outgoing = list(plan.upstream_headers)
    if chunked:
        outgoing.append(("Transfer-Encoding", "chunked"))
    if expect and has_body:
        outgoing.append(("Expect", "100-continue"))
    head = request_head(request.method, plan.path, outgoing)
    body = _ClientBody(request, record, send_continue=expect) if has_body else None
    sent = time.monotonic()
    upstream = await pool.request(
        plan.target, head, body, chunked=chunked, head_only=request.method == "HEAD",
        expect_continue=expect and has_body,
    )  # fmt: skip
    record.upstream_seconds = time.monotonic() - sent
    try:
        record.status = upstream.status
        return await _relay_response(request, upstream, read_idle_seconds, record)
    finally:
        upstream.release()


async def _relay_response(
    request: web.BaseRequest,
    upstream: UpstreamResponse,
    read_idle_seconds: float,
    record: RequestRecord,
) -> web.StreamResponse:
    response = RelayedResponse(
        status=upstream.status,
        reason=headers.relayable_reason(upstream.reason),
        headers=CIMultiDict(
            headers.downstream_response_headers(
                upstream.headers, public_host=request.headers.get("Host", "")
            )
        ),
    )
    response.headers[headers.REQUEST_ID] = record.request_id
    try:
        await response.prepare(request)
        while chunk := await upstream.read_chunk(idle_seconds=read_idle_seconds):
            record.bytes_out += len(chunk)
            await response.write(chunk)
        await response.write_eof()
    except errors.EdgeError as exc:
        # The head is gone; the only honest signal left is a broken connection.
        record.aborted(exc.code)
        abort_downstream(request)
    except ConnectionResetError:
        # The client went away mid-answer (aiohttp's ClientConnectionResetError is one):
        # nothing to tell anyone; the caller's release() drops the sandbox connection.
        record.outcome = "client_gone"
    return response


def abort_downstream(request: web.BaseRequest) -> None:
    """Reset the client's connection (no terminating chunk, no keep-alive)."""
    if request.transport is not None:
        request.transport.abort()


class _ClientBody:
    """The client's request body as the sandbox gets it (``upstream.RequestBody``),
    counted into the record; sends the client its 100 Continue before the first read."""

    def __init__(self, request: web.BaseRequest, record: RequestRecord, *, send_continue: bool):
        self._request = request
        self._record = record
        self._send_continue = send_continue

    async def read(self) -> bytes:
        if self._send_continue:
            # The sandbox asked for the body (or didn't answer in time): tell the client.
            self._send_continue = False
            await self._request.writer.write(_CONTINUE)
        chunk = await self._request.content.readany()
        self._record.bytes_in += len(chunk)
        return chunk


def request_head(
    method: str, path: str, header_list: list[tuple[str, str]], *, block: bytes = b""
) -> bytes:
    """A request head to the sandbox; ``block``: header lines encoded already
    (``header_lines``), sent before ``header_list``."""
    start = f"{method} {path} HTTP/1.1\r\n".encode("utf-8", "surrogateescape")
    return start + block + header_lines(header_list) + b"\r\n"


def header_lines(header_list: list[tuple[str, str]]) -> bytes:
    """``name: value`` lines, each ending in CRLF.

    Header text came from the parser as UTF-8 with surrogateescape, so encoding it back
    the same way restores the client's bytes exactly.
    """
    return "".join([f"{name}: {value}\r\n" for name, value in header_list]).encode(
        "utf-8", "surrogateescape"
    )
