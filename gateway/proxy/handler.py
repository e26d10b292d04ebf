"""The public listener's request story: host -> route -> forward, or a precise answer.

    parse the Host (no Redis) -> look the label up (cache, then Redis) -> resolve (pure)
    -> check the address again (SSRF) -> forward HTTP or relay a WebSocket -> account.

Every deliberate failure is an ``errors.EdgeError`` and is rendered in one place
(``_answer_error``). One ``RequestRecord`` per request goes to the sinks at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import http_exceptions, web

from gateway import errors, headers, hostnames
from gateway.headers import HeaderPairs
from gateway.listener import Listener
from gateway.missbudget import MISS_CODES, MissBudget
from gateway.proxy import http, pages, websocket
from gateway.proxy.accounting import RequestRecord, Sink
from gateway.proxy.connlimit import ConnectionLimiter, effective_limit
from gateway.proxy.http import Answer, RequestPlan, UpstreamFields, forward_http, header_lines
from gateway.proxy.sessions import ActiveSessions, Session, Stop
from gateway.proxy.upstream import UpstreamPool
from gateway.routing import model, rules
from gateway.routing.cache import Miss, RouteCache

log = logging.getLogger("gateway.proxy")


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    domains: tuple[str, ...]
    sandbox_networks: tuple[rules.IPNetwork, ...]
    trusted_networks: tuple[rules.IPNetwork, ...]
    read_idle_seconds: float
    connect_seconds: float
    websocket_max_message_bytes: int
    # A health path for balancers that can only probe the serving port; answered only
    # for Hosts outside the sandbox domains, so it never shadows a sandbox's own path.
    health_path: str | None = None
    # The per-client miss budget (gateway/missbudget.py); 0 turns it off.
    misses_per_window: int = 0
    miss_window_seconds: float = 0.0
    # Default per-sandbox connection limit (gateway/proxy/connlimit.py); 0: none.
    connections_per_sandbox: int = 0


class HeadFacts(UpstreamFields):
    """What a request's header fields and TCP peer decide, whatever its method and target.

    Pure functions of (fields, peer, settings), so a keep-alive connection that sends the
    same header block again (browsers and test suites mostly do) reuses them: the front
    keeps one per connection (``EdgeHandler.facts``). The parts that can fail, or that
    depend on the method or the route, are computed on first use and remembered.
    """

    __slots__ = (
        "_settings", "_target", "_upgrade", "_upstream", "client", "host", "request_headers",
        "routed", "trusted_id",
    )  # fmt: skip

    def __init__(self, settings: EdgeSettings, request_headers: HeaderPairs, peer_ip: str) -> None:
        trusted = settings.trusted_networks
        self._settings = settings
        self.request_headers = request_headers
        self.host = headers.first_value(request_headers, "host")
        self.client = headers.resolve_client(peer_ip, request_headers, trusted_networks=trusted)
        self.trusted_id = headers.trusted_request_id(
            request_headers, peer_ip, trusted_networks=trusted
        )
        self._target: hostnames.HostTarget | None = None
        self._upgrade: dict[str, str | None] = {}
        self._upstream: dict[int | None, tuple[list[tuple[str, str]], bytes]] = {}
        # The last route these fields took: (record, upstream, connection limit).
        self.routed: tuple[model.Sandbox | None, model.Upstream, int] | None = None

    def target(self) -> hostnames.HostTarget:
        """The sandbox and port the Host names (raises as ``hostnames.parse_host``)."""
        if self._target is None:
            self._target = hostnames.parse_host(self.host, self._settings.domains)
        return self._target

    def upgrade(self, method: str) -> str | None:
        if method not in self._upgrade:
            self._upgrade[method] = headers.upgrade_kind(self.request_headers, method=method)
        return self._upgrade[method]

    def upstream_headers(
        self, request_id: str, host_rewrite_port: int | None
    ) -> list[tuple[str, str]]:
        """``headers.upstream_request_headers`` for this block (a new list each time)."""
        return [*self._upstream_base(host_rewrite_port)[0], (headers.REQUEST_ID, request_id)]

    def upstream_block(self, host_rewrite_port: int | None) -> bytes:
        """``upstream_headers`` but the request id, as encoded header lines."""
        return self._upstream_base(host_rewrite_port)[1]

    def _upstream_base(self, host_rewrite_port: int | None) -> tuple[list[tuple[str, str]], bytes]:
        base = self._upstream.get(host_rewrite_port)
        if base is None:
            fields = headers.upstream_request_headers(
                self.request_headers, client=self.client, public_host=self.host or "",
                request_id=None, host_rewrite_port=host_rewrite_port,
            )  # fmt: skip
            base = self._upstream[host_rewrite_port] = (fields, header_lines(fields))
        return base


class PendingPlan:
    """A request whose route needs a lookup first (``EdgeHandler.plan_now``). A plain
    class: a compiled dataclass keeps an interpreted ``__init__`` (gateway/compiled.py)."""

    __slots__ = ("facts", "raw_path", "request_id", "websocket")

    def __init__(self, raw_path: str, facts: HeadFacts, request_id: str, websocket: bool):
        self.raw_path = raw_path
        self.facts = facts
        self.request_id = request_id
        self.websocket = websocket

    @property
    def label(self) -> str:
        return self.facts.target().label


class EdgeHandler:
    """The aiohttp low-level handler of the public listener."""

    def __init__(
        self,
        settings: EdgeSettings,
        *,
        cache: RouteCache,
        pool: UpstreamPool,
        websocket_client: aiohttp.ClientSession,
        sessions: ActiveSessions,
        sinks: Sequence[Sink] = (),
    ) -> None:
        self._settings = settings
        self._cache = cache
        self._pool = pool
        self._ws_client = websocket_client
        self.sessions = sessions
        self.sinks = list(sinks)
        # Gateway listeners, filled in once they are bound (port 0 resolves late).
        self.listeners: list[rules.Endpoint] = []
        # The connection wrapper of the public listener (header timeout), when there is one.
        self.listener: Listener | None = None
        self.draining = False
        self._allowed_addresses: dict[tuple[str, int], bool] = {}
        self._misses = MissBudget(settings.misses_per_window, settings.miss_window_seconds)
        self.connections = ConnectionLimiter()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        request_headers = _text_headers(request.raw_headers)
        facts = self.facts(request_headers, _peer_ip(request))
        record = self.new_record(request.method, request.raw_path, facts)
        if self.listener is not None:
            self.listener.request_started(request.transport)
        if self.draining:
            _close_after(request)
        try:
            if request.version not in _SERVED_VERSIONS:
                raise _unserved_version(request)
            response = await self._route(request, facts, record)
        except errors.EdgeError as exc:
            response = _answer_response(self.error_page(exc, record, request_headers), request)
        except asyncio.CancelledError:
            if not record.closed:
                record.outcome = "client_gone"
            raise
        finally:
            if self.listener is not None:
                self.listener.request_finished(request.transport)
            self.account(record)
        if self.draining:
            # Keep-alive clients and balancers move on to another replica.
            response.force_close()
        return response

    def refused_head(
        self, request: web.BaseRequest, error: http_exceptions.HttpProcessingError
    ) -> web.StreamResponse:
        """The answer to a head aiohttp's parser refused (``error``): the gateway's page,
        431 for a line over the limit or too many fields, else 400, with the connection
        closed; accounted like every answer. ``request`` is aiohttp's stand-in, with no
        fields: the page is JSON, the client the peer."""
        refusal: errors.EdgeError
        if isinstance(error, http_exceptions.LineTooLong) or error.message == _TOO_MANY_FIELDS:
            refusal = errors.HeadFieldsTooLarge(
                "a line of the request head is too long, or it has too many header fields"
            )
        else:
            refusal = errors.UnparsableRequest("the HTTP/1.1 parser refused this request")
        facts = self.facts([], _peer_ip(request))
        record = self.new_record(request.method, request.raw_path, facts)
        response = _answer_response(self.error_page(refusal, record, []), request)
        response.force_close()
        self.account(record)
        return response

    def account(self, record: RequestRecord) -> None:
        """Close ``record`` (the request is answered or abandoned) and hand it to the sinks:
        the access log and the metrics."""
        record.finish()
        for sink in self.sinks:
            sink(record)

    @property
    def pool(self) -> UpstreamPool:
        return self._pool

    @property
    def websocket_max_message_bytes(self) -> int:
        return self._settings.websocket_max_message_bytes

    # Private methods ------------------------------------------------------------------

    def facts(self, request_headers: HeaderPairs, peer_ip: str) -> HeadFacts:
        """What ``request_headers`` from ``peer_ip`` decide (see ``HeadFacts``)."""
        return HeadFacts(self._settings, request_headers, peer_ip)

    def new_record(self, method: str, raw_path: str, facts: HeadFacts) -> RequestRecord:
        """The accounting record of a request that just arrived (its id and client decided
        here): a trusted proxy's well-formed X-Request-Id is kept, else a fresh one."""
        request_id = facts.trusted_id or headers.new_request_id()
        record = RequestRecord(request_id=request_id, method=method, path=raw_path)
        record.client_ip = facts.client.ip
        return record

    async def plan(
        self, method: str, raw_path: str, facts: HeadFacts, record: RequestRecord
    ) -> RequestPlan | Answer:
        """Decide what to do with a request: where to send it, or what to answer itself.

        Shared by both HTTP front ends (``gateway.proxy.front`` and aiohttp's), so they
        cannot drift apart. Fills in ``record`` (host, client, label, port).

        Returns:
            a ``RequestPlan`` with ``websocket`` set for a WebSocket upgrade, or an
            ``Answer`` (the health path).

        Raises:
            errors.EdgeError: the request is refused; render it with ``error_page``.
        """
        decided = self.plan_now(method, raw_path, facts, record)
        if isinstance(decided, PendingPlan):
            return self.finish_plan(decided, await self.lookup(decided.label))
        return decided

    def plan_now(
        self, method: str, raw_path: str, facts: HeadFacts, record: RequestRecord
    ) -> RequestPlan | Answer | PendingPlan:
        """``plan`` without waiting: a label the cache cannot answer now gives a
        ``PendingPlan``; look its label up and pass both to ``finish_plan``."""
        host = facts.host
        record.host = host or ""
        client = facts.client
        try:
            target = facts.target()
        except (errors.UnknownHost, errors.InvalidHost) as exc:
            # The health path never shadows a sandbox's own: only a Host outside the
            # sandbox domains (an IP literal, the balancer's name), or none at all (an
            # HTTP/1.0 probe), gets it.
            outside = isinstance(exc, errors.UnknownHost) or host is None
            if outside and self._is_health_probe(method, raw_path):
                return self._health(record)
            raise
        record.label, record.port = target.label, target.port
        if self._misses.spent(client.ip):
            raise errors.RateLimited("too many requests for unknown sandboxes or ports")
        hostnames.check_absolute_target(raw_path, host)
        upgrade = facts.upgrade(method)
        if upgrade is not None and upgrade != "websocket":
            raise errors.UnsupportedUpgrade(
                f"upgrade to {upgrade!r} is not supported; only WebSocket is",
                label=target.label, port=target.port,
            )  # fmt: skip
        websocket = upgrade == "websocket"
        sandbox = self._cache.fresh(target.label)
        if isinstance(sandbox, Miss):
            return PendingPlan(raw_path, facts, record.request_id, websocket)
        return self._routed(raw_path, facts, record.request_id, websocket, sandbox)

    def finish_plan(self, pending: PendingPlan, sandbox: model.Sandbox | None) -> RequestPlan:
        """The plan of ``pending`` once its label's record (None: no such sandbox) is known.

        Raises:
            errors.EdgeError: the record does not route the request.
        """
        return self._routed(
            pending.raw_path, pending.facts, pending.request_id, pending.websocket, sandbox
        )

    def _routed(
        self,
        raw_path: str,
        facts: HeadFacts,
        request_id: str,
        websocket: bool,
        sandbox: model.Sandbox | None,
    ) -> RequestPlan:
        target = facts.target()
        remembered = facts.routed
        if remembered is not None and remembered[0] is sandbox:
            # The same cached record as the last request with these fields: it routes the
            # same way (records are immutable; a change is a new object).
            _, upstream, limit = remembered
        else:
            upstream = model.resolve(sandbox, target.port, label=target.label)
            self._check_dial(upstream, target.label)
            limit = effective_limit(
                sandbox.limits if sandbox else {}, self._settings.connections_per_sandbox
            )
            facts.routed = (sandbox, upstream, limit)
        return RequestPlan(
            target=upstream, path=_origin_form(raw_path), fields=facts, request_id=request_id,
            websocket=websocket, connection_limit=limit,
        )  # fmt: skip

    def error_page(
        self, error: errors.EdgeError, record: RequestRecord, request_headers: HeaderPairs
    ) -> Answer:
        """The answer to a refused request (its error page); ``record`` says so."""
        # Errors raised below the handler don't know the target; the handler does. Each
        # part separately: a host error may know the port but not the (invalid) label.
        if error.label is None:
            error.label = record.label
        if error.port is None:
            error.port = record.port
        record.outcome = "gateway_error"
        record.code = error.code
        if error.code in MISS_CODES:
            self._misses.miss(record.client_ip)
        record.status = error.status
        page = pages.render(
            error, request_id=record.request_id, html_wanted=headers.wants_html(request_headers)
        )
        return Answer(page.status, page.headers, page.body)

    async def _route(
        self, request: web.BaseRequest, facts: HeadFacts, record: RequestRecord
    ) -> web.StreamResponse:
        decided = await self.plan(request.method, request.raw_path, facts, record)
        if isinstance(decided, Answer):
            return _answer_response(decided, request)
        if decided.websocket:
            return await self._websocket(request, decided, record)
        return await self._http(request, decided, record)

    @contextlib.contextmanager
    def forwarding(
        self, plan: RequestPlan, record: RequestRecord, transport: asyncio.Transport | None
    ) -> Iterator[None]:
        """``hold_exchange`` .. ``release_exchange`` around a ``with`` block, ending the
        exchange by resetting the client's ``transport``."""
        session = self.hold_exchange(plan, record, reset_client(transport, plan.target.port))
        try:
            yield
        finally:
            self.release_exchange(session)

    def hold_exchange(
        self, plan: RequestPlan, record: RequestRecord, stop: Stop, *, restart: Stop | None = None
    ) -> Session:
        """For one HTTP exchange: hold a connection slot of the sandbox and register the
        exchange, so a close, pause or terminate ends it (``stop``; a WebSocket's
        ``restart`` asks its client to reconnect, in a drain). Both fronts forward
        between this and ``release_exchange``.

        Raises:
            errors.RateLimited: the sandbox holds its limit of connections.
        """
        target = plan.target
        label = record.label or ""
        self.connections.acquire(label, plan.connection_limit, port=target.port)
        return self.sessions.add(Session(label, target.port, target.incarnation, stop, restart))

    def release_exchange(self, session: Session) -> None:
        self.sessions.remove(session)
        self.connections.release(session.label)

    async def lookup(self, label: str) -> model.Sandbox | None:
        """The record of ``label`` from Redis (through the cache), for ``finish_plan``."""
        return await self._cache.lookup(label)

    async def _http(
        self, request: web.BaseRequest, plan: RequestPlan, record: RequestRecord
    ) -> web.StreamResponse:
        with self.forwarding(plan, record, request.transport):
            return await forward_http(
                request, plan, pool=self._pool,
                read_idle_seconds=self._settings.read_idle_seconds, record=record,
            )  # fmt: skip

    async def _websocket(
        self, request: web.BaseRequest, plan: RequestPlan, record: RequestRecord
    ) -> web.StreamResponse:
        record.kind = "websocket"
        label = record.label or ""
        # Held from before the sandbox connect to the end of the relay.
        with self.connections.hold(label, plan.connection_limit, port=plan.target.port):
            return await self._websocket_held(request, plan, record)

    async def _websocket_held(
        self, request: web.BaseRequest, plan: RequestPlan, record: RequestRecord
    ) -> web.StreamResponse:
        protocols = _requested_protocols(request)
        sandbox_side = await websocket.open_sandbox_socket(
            self._ws_client, plan.target, plan.path, plan.upstream_headers,
            protocols=protocols, max_message_bytes=self._settings.websocket_max_message_bytes,
            connect_seconds=self._settings.connect_seconds,
            response_seconds=self._pool.timeouts.response_seconds,
        )  # fmt: skip
        if isinstance(sandbox_side, web.Response):
            record.status = sandbox_side.status
            sandbox_side.headers[headers.REQUEST_ID] = record.request_id
            return sandbox_side
        client_side = web.WebSocketResponse(
            protocols=(sandbox_side.protocol,) if sandbox_side.protocol else (),
            autoping=False, autoclose=False, compress=False, decode_text=False,
            max_msg_size=websocket.aiohttp_message_limit(
                self._settings.websocket_max_message_bytes
            ),
        )  # fmt: skip
        client_side.headers[headers.REQUEST_ID] = record.request_id
        try:
            await client_side.prepare(request)
        except BaseException as exc:
            failure: BaseException | None = exc  # closed below: no await in a handler
        else:
            failure = None
        if failure is not None:
            await sandbox_side.close()
            raise failure
        record.status = 101
        session = websocket.WebSocketSession(client_side, sandbox_side)
        target = plan.target
        with self.sessions.track(
            record.label or "", target.port, target.incarnation, session.close_going_away,
            restart=session.close_for_restart,
        ):  # fmt: skip
            try:
                await websocket.relay(session, record)
            finally:
                # A session that ended with a close frame to the client ended normally,
                # even if the client's connection drops (cancelling us) right after.
                record.closed = client_side.close_code is not None
        return client_side

    def _is_health_probe(self, method: str, raw_path: str) -> bool:
        path = self._settings.health_path
        return path is not None and raw_path.partition("?")[0] == path and method in ("GET", "HEAD")

    def _health(self, record: RequestRecord) -> Answer:
        status = 503 if self.draining else 200
        record.status = status
        body = json.dumps({"status": "draining" if self.draining else "ok"}).encode()
        return Answer(
            status,
            [("Content-Type", "application/json; charset=utf-8"),
             (headers.REQUEST_ID, record.request_id)],
            body,
        )  # fmt: skip

    def _check_dial(self, upstream: model.Upstream, label: str) -> None:
        """Defence in depth: the record may have been written by another control plane."""
        # Remembered per address, never per incarnation: a record rewritten with a new
        # address but the old incarnation must be judged again.
        # Judged once per (address, port): parsing addresses on every request shows up
        # in profiles (docs/performance.md).
        key = (upstream.address, upstream.port)
        allowed = self._allowed_addresses.get(key)
        if allowed is None:
            ip = ipaddress.ip_address(upstream.address)
            allowed = any(ip in net for net in self._settings.sandbox_networks)
            allowed = allowed and not rules.is_gateway_listener(*key, self.listeners)
            if len(self._allowed_addresses) > 100_000:
                self._allowed_addresses.clear()
            self._allowed_addresses[key] = allowed
        if not allowed:
            log.warning("refused route of %s to %s:%s", label, upstream.address, upstream.port)
            raise errors.UpstreamRefused(
                f"the route of sandbox {label} points outside the sandbox networks",
                label=label, port=upstream.port,
            )  # fmt: skip


def reset_client(transport: asyncio.Transport | None, port: int) -> Stop:
    """The ``stop`` of an HTTP exchange: reset the client's connection (a broken transfer
    is the only honest end once the answer has begun)."""

    async def stop(reason: str) -> None:
        log.info("ending a stream to %s: %s", port, reason)
        if transport is not None:
            transport.abort()

    return stop


def _text_headers(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    # surrogateescape keeps any byte the client sent; the forwarder encodes it back.
    return [
        (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for k, v in raw
    ]


def _answer_response(answer: Answer, request: web.BaseRequest) -> web.Response:
    response = http.AnswerResponse(status=answer.status, body=answer.body)
    for name, value in answer.headers:
        response.headers[name] = value
    if request.method == "HEAD":
        response.body = b""
    return response


_SERVED_VERSIONS = (aiohttp.HttpVersion11, aiohttp.HttpVersion10)
# aiohttp's parser says so (a BadHttpMessage) when a head has more than max_headers fields.
_TOO_MANY_FIELDS = "Too many headers received"


def _unserved_version(request: web.BaseRequest) -> errors.UnsupportedHttpVersion:
    """The 505 for a request of another version (on a connection handed over to aiohttp;
    the front answers a first one itself), with ``request`` marked to be answered as
    HTTP/1.1 and closed: aiohttp writes the request's own version in its status line."""
    error = errors.UnsupportedHttpVersion.naming(f"HTTP/{request.version[0]}.{request.version[1]}")
    request._version = aiohttp.HttpVersion11  # read by aiohttp's StreamResponse._write_headers
    request._cache.pop("version", None)  # the reified property
    _close_after(request)
    return error


def _close_after(request: web.BaseRequest) -> None:
    """Answer ``request`` with ``Connection: close`` and end its connection afterwards.

    ``response.force_close()`` after the handler only reaches answers aiohttp has not sent
    yet (the gateway's own pages); a relayed answer's head goes out inside the forwarder,
    where aiohttp derives ``Connection`` from the request's keep-alive. So the request
    itself is marked as closing (aiohttp has no public way to do it).
    """
    # Through Any: compiled, a read of ``_message`` is checked against its annotation (a
    # NamedTuple, so a tuple), which the C parser's RawRequestMessage is not.
    untyped: typing.Any = request
    untyped._message = untyped._message._replace(should_close=True)
    request._cache.pop("keep_alive", None)


def _peer_ip(request: web.BaseRequest) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "0.0.0.0"


def _origin_form(raw_path: str) -> str:
    """The request target as the sandbox gets it: absolute-form reduced to origin-form."""
    if raw_path.startswith("/"):
        return raw_path
    scheme_end = raw_path.find("://")
    if scheme_end < 0:
        return raw_path
    rest = raw_path[scheme_end + 3 :]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    target = rest[cut:]
    return target if target.startswith("/") else "/" + target


def _requested_protocols(request: web.BaseRequest) -> list[str]:
    values = request.headers.getall("Sec-WebSocket-Protocol", [])
    return [p.strip() for value in values for p in value.split(",") if p.strip()]
