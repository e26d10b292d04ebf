"""``gateway serve``: wires the pieces together and owns their lifecycle.

Start order: Redis (embedded or given) -> listeners bound (port 0 resolves here) -> the
table settings written -> watcher and housekeeping tasks -> the ready line. Stop order is
the reverse; every task created here is cancelled and awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import ipaddress
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import http_exceptions, web, web_protocol

from gateway import compiled, embedded, errors
from gateway.accesslog import AccessLog
from gateway.config import Config, ConfigError, Endpoint
from gateway.control import api
from gateway.listener import Listener, ListenerPolicy
from gateway.metrics import Metrics
from gateway.proxy import websocket
from gateway.proxy.front import Front
from gateway.proxy.handler import EdgeHandler, EdgeSettings
from gateway.proxy.sessions import ActiveSessions
from gateway.proxy.upstream import UpstreamPool, UpstreamTimeouts
from gateway.routing import schema, store
from gateway.routing.cache import RouteCache
from gateway.routing.model import Sandbox
from gateway.routing.watcher import InvalidationWatcher, reraise_swallowed_cancel

log = logging.getLogger("gateway.server")


# The public listener's aiohttp connections log here.
edge_log = logging.getLogger("gateway.edge")


class _EdgeConnection(web_protocol.RequestHandler):
    """aiohttp's handler of a connection the front handed over, which answers a request
    its parser refuses with the gateway's own page (``EdgeHandler.refused_head``: a
    request id, a code, 431 where it applies) rather than aiohttp's plain-text 400, and
    logs it at INFO in one line: aiohttp logs it at ERROR with a traceback, and on a
    public listener any client could flood the log with those.

    ``handle_error`` is aiohttp's hook for every error answer, undocumented like the
    front's ``set_parser``: ``tests/integration/test_proxy_front.py`` pins the pages, so
    an aiohttp that changes it fails there."""

    def __init__(self, manager: web.Server, *, edge: EdgeHandler, **options: Any) -> None:
        super().__init__(manager, **options)
        self._edge = edge

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 400 and isinstance(exc, http_exceptions.HttpProcessingError):
            edge_log.info("refused a request from %s: %r", request.remote, exc.message)
            return self._edge.refused_head(request, exc)
        return super().handle_error(request, status, exc, message)


# How often serve checks that the table settings are still in Redis (it rewrites them
# after Redis lost its data, e.g. a restart without persistence).
SETTINGS_CHECK_SECONDS = 5.0
# aiohttp's defaults (8190) refuse the large cookies some dev tools set.
MAX_HEADER_FIELD_BYTES = 16 * 1024
# Header fields per request (aiohttp's default): more is an attack, not a browser.
MAX_REQUEST_HEADERS = 128
# Pending connections the kernel queues per listener (aiohttp's 128 drops bursts).
LISTEN_BACKLOG = 1024


def check_admin_binding(config: Config) -> None:
    """Without a token the admin API must stay on loopback."""
    host = config.admin_endpoint.host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not config.admin_token:
        raise ConfigError(
            f"admin_listen: {config.admin_listen} is not loopback; set GATEWAY_ADMIN_TOKEN "
            "to expose the admin API beyond this machine"
        )


@contextlib.asynccontextmanager
async def redis_for(config: Config) -> AsyncIterator[str]:
    """The Redis URL to use: the configured one, or an embedded server for the duration."""
    if config.redis.url:
        yield config.redis.url
        return
    state_dir = Path(config.state_dir) if config.state_dir else embedded.default_state_dir()
    server = await embedded.EmbeddedRedis.start(state_dir)
    try:
        yield server.url
    finally:
        await server.stop()


async def serve(config: Config, *, on_ready: Callable[[dict[str, str]], None]) -> None:
    """Run the gateway until SIGTERM or SIGINT, then drain (a second signal: stop now)."""
    check_admin_binding(config)
    stop, hard_stop = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (hard_stop if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    async with redis_for(config) as url, run_gateway(config, url) as running:
        # What exists now lives as long as the process: out of the collector's sight, a
        # full collection no longer walks it (https://docs.python.org/3/library/gc.html#gc.freeze).
        gc.freeze()
        on_ready(
            {
                "event": "ready",
                "listen": str(running.listen),
                "admin": str(running.admin),
                "redis": url,
                "build": compiled.describe_build(),
            }
        )
        await stop.wait()
        await running.drain(hard_stop)


@dataclass(slots=True)
class Running:
    """A started gateway: its bound addresses and what a drain needs to reach."""

    listen: Endpoint
    admin: Endpoint
    redis_url: str
    config: Config
    health: api.Health
    handler: EdgeHandler
    front: Front
    public_server: asyncio.AbstractServer
    public_runner: web.ServerRunner
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def drain(self, hard_stop: asyncio.Event) -> None:
        """Leave the balancer's rotation without failing a request (docs/operations.md).

        /readyz fails at once; traffic is still served for ``drain_delay_seconds`` with
        ``Connection: close``; then no new connections are accepted, WebSockets are
        closed with 1012 and in-flight requests get ``drain_grace_seconds`` to finish.
        ``hard_stop`` (a second signal) cuts every wait short.
        """
        server_config = self.config.server
        self.health.draining = True
        self.handler.draining = True
        log.info("draining: /readyz now fails; serving for %ss", server_config.drain_delay_seconds)
        await _wait_or(hard_stop, server_config.drain_delay_seconds)
        self.public_server.close()
        await self.handler.sessions.restart_websockets("the gateway is restarting; reconnect")
        edge = self.public_runner.server
        if edge is not None and not hard_stop.is_set():
            # web.Server.shutdown closes idle keep-alive connections and waits for the
            # in-flight handlers (ServerRunner.shutdown does nothing of the kind); the
            # front does the same for the connections it serves itself.
            grace = server_config.drain_grace_seconds
            edge.pre_shutdown()
            self.front.close_idle()
            shutdown = asyncio.ensure_future(_shut_down(edge, self.front, grace))
            interrupted = asyncio.ensure_future(hard_stop.wait())
            await asyncio.wait(
                [shutdown, interrupted],
                timeout=server_config.drain_grace_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for waiter in (shutdown, interrupted):
                waiter.cancel()
            await asyncio.gather(shutdown, interrupted, return_exceptions=True)
        log.info("drained")


async def _shut_down(edge: web.Server, front: Front, grace_seconds: float) -> None:
    await asyncio.gather(edge.shutdown(grace_seconds), front.wait_idle(grace_seconds))


async def _wait_or(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


@contextlib.asynccontextmanager
async def run_gateway(config: Config, redis_url: str) -> AsyncIterator[Running]:
    """The gateway on ``redis_url``, running for the duration of the ``async with``."""
    client = store.open_client(redis_url, timeout_seconds=config.redis.write_timeout_seconds)
    await _refuse_other_schema(client)
    metrics = Metrics()
    cache = _route_cache(config, client, metrics)
    pool = _upstream_pool(config, metrics)
    ws_client = websocket.new_client_session(
        connect_seconds=config.upstream.connect_timeout_seconds
    )
    sessions = ActiveSessions()
    access_log = AccessLog(include_query=config.access_log.include_query)
    sinks = [metrics.observe, access_log.sink] if config.access_log.enabled else [metrics.observe]
    handler = EdgeHandler(
        _edge_settings(config), cache=cache, pool=pool, websocket_client=ws_client,
        sessions=sessions, sinks=sinks,
    )  # fmt: skip
    connection_options: dict[str, Any] = {
        "auto_decompress": False,
        "max_field_size": MAX_HEADER_FIELD_BYTES,
        "max_line_size": MAX_HEADER_FIELD_BYTES,
        "max_headers": MAX_REQUEST_HEADERS,
        "keepalive_timeout": config.server.keepalive_idle_seconds,
        "access_log": None,
        "logger": edge_log,
    }
    edge = web.Server(handler, handler_cancellation=True, **connection_options)
    hand_over = functools.partial(
        _EdgeConnection, edge, edge=handler, loop=asyncio.get_running_loop(), **connection_options
    )
    front = Front(
        handler, hand_over, keepalive_idle_seconds=config.server.keepalive_idle_seconds,
        read_idle_seconds=config.upstream.read_idle_timeout_seconds,
        max_headers=MAX_REQUEST_HEADERS,
    )  # fmt: skip
    listener = Listener(front, _listener_policy(config))
    handler.listener = listener
    public_runner = web.ServerRunner(
        edge, handle_signals=False, shutdown_timeout=config.server.drain_grace_seconds
    )
    health = api.Health(started=False)
    writer = store.RouteWriter(client, timeout_seconds=config.redis.write_timeout_seconds)
    admin_runner = web.AppRunner(
        api.create_app(writer, token=config.admin_token, health=health, metrics=metrics),
        handle_signals=False,
        access_log=None,
    )
    _register_gauges(metrics, cache, sessions, listener, health)
    public_server: asyncio.AbstractServer | None = None
    running: Running | None = None
    try:
        await public_runner.setup()
        reuse = config.server.reuse_port
        public_server, listen = await _bind_public(
            listener, config.listen_endpoint, reuse_port=reuse
        )
        admin = await _bind(admin_runner, config.admin_endpoint, reuse_port=reuse)
        handler.listeners = [(listen.host, listen.port), (admin.host, admin.port)]
        settings = _table_settings(config, listen, admin)
        await store.write_settings(client, settings)
        running = Running(
            listen, admin, redis_url, config, health, handler, front, public_server,
            public_runner,
        )  # fmt: skip
        _start_tasks(
            running, client=client, cache=cache, settings=settings, metrics=metrics,
            access_log=access_log,
        )  # fmt: skip
        health.started = True  # /readyz: settings written, watcher running
        yield running
    finally:
        if public_server is not None:
            public_server.close()
        await sessions.stop_all("the gateway is shutting down")
        for task in running.tasks if running else ():
            task.cancel()
        for task in list(running.tasks) if running else ():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await public_runner.cleanup()
        await admin_runner.cleanup()
        await cache.close()
        await pool.close()
        await ws_client.close()
        await client.aclose()


def _start_tasks(
    running: Running,
    *,
    client: store.Client,
    cache: RouteCache,
    settings: schema.TableSettings,
    metrics: Metrics,
    access_log: AccessLog,
) -> None:
    """The background work of a started gateway; each task is cancelled at shutdown."""
    lag = metrics.histogram(
        "gateway_invalidation_lag_seconds", "From Redis publishing an invalidation to applying it"
    )
    _spawn(running, InvalidationWatcher(
        client, cache, heartbeat_interval_seconds=running.config.cache.heartbeat_interval_seconds,
        observe_lag=lag,
    ).run())  # fmt: skip
    _spawn(running, _keep_settings(client, settings))
    if running.config.access_log.enabled:
        _spawn(running, access_log.run())
    if running.config.metrics_dir:
        _spawn(running, metrics.publish(Path(running.config.metrics_dir)))
    cache.listeners.append(_enforcer(running, cache, running.handler.sessions))


def _route_cache(config: Config, client: store.Client, metrics: Metrics) -> RouteCache:
    reader = store.RouteReader(client, timeout_seconds=config.redis.lookup_timeout_seconds)
    observe = metrics.histogram(
        "gateway_redis_lookup_seconds", "Route reads from Redis on cache misses (failed too)"
    )

    async def timed_get(label: str) -> Sandbox | None:
        started = time.monotonic()
        try:
            return await reader.get(label)
        finally:
            observe(time.monotonic() - started)

    return RouteCache(
        timed_get,
        max_entries=config.cache.max_entries,
        positive_ttl_seconds=config.cache.positive_ttl_seconds,
        negative_ttl_seconds=config.cache.negative_ttl_seconds,
        stale_budget_seconds=config.redis.stale_budget_seconds,
    )


def _upstream_pool(config: Config, metrics: Metrics) -> UpstreamPool:
    up = config.upstream
    observe_connect = metrics.histogram(
        "gateway_upstream_connect_seconds", "New TCP connects to sandboxes"
    )
    return UpstreamPool(
        UpstreamTimeouts(
            connect_seconds=up.connect_timeout_seconds,
            connect_retry_window_seconds=up.connect_retry_window_seconds,
            response_seconds=up.response_timeout_seconds,
            read_idle_seconds=up.read_idle_timeout_seconds,
            pool_idle_seconds=up.pool_idle_seconds,
        ),
        observe_connect=observe_connect,
    )


def _edge_settings(config: Config) -> EdgeSettings:
    up = config.upstream
    return EdgeSettings(
        domains=config.domains,
        sandbox_networks=config.sandbox_networks,
        trusted_networks=config.trusted_networks,
        read_idle_seconds=up.read_idle_timeout_seconds,
        connect_seconds=up.connect_timeout_seconds,
        websocket_max_message_bytes=up.websocket_max_message_bytes,
        health_path=config.server.health_path,
        misses_per_window=config.limits.misses_per_window,
        miss_window_seconds=config.limits.miss_window_seconds,
        connections_per_sandbox=config.limits.connections_per_sandbox,
    )


def _listener_policy(config: Config) -> ListenerPolicy:
    return ListenerPolicy(
        header_timeout_seconds=config.server.header_timeout_seconds,
        max_connections=config.server.max_connections,
        proxy_protocol=config.server.proxy_protocol,
        proxy_header_timeout_seconds=config.server.proxy_header_timeout_seconds,
        trusted_networks=config.trusted_networks,
    )


def _register_gauges(
    metrics: Metrics,
    cache: RouteCache,
    sessions: ActiveSessions,
    listener: Listener,
    health: api.Health,
) -> None:
    stats = cache.stats
    for name, documentation, read in (
        ("gateway_route_cache_hits", "Lookups answered from the cache", lambda: stats.hits),
        ("gateway_route_cache_misses", "Lookups that read Redis", lambda: stats.misses),
        ("gateway_route_cache_stale_serves", "Stale routes served while Redis was down",
         lambda: stats.stale_serves),
        ("gateway_route_store_errors", "Failed route reads", lambda: stats.store_errors),
        ("gateway_route_cache_flushes", "Whole-cache flushes (resubscribes)",
         lambda: stats.flushes),
        ("gateway_route_invalidations", "Invalidations received", lambda: stats.invalidations),
        ("gateway_connections_refused", "Connections over max_connections",
         lambda: listener.refused),
        ("gateway_header_timeouts", "Connections closed by the header timeout",
         lambda: listener.header_timeouts),
    ):  # fmt: skip
        metrics.counter(name, documentation, read)
    metrics.gauge("gateway_route_cache_entries", "Cached labels", lambda: len(cache))
    metrics.gauge("gateway_connections", "Open client connections", lambda: listener.active)
    metrics.gauge("gateway_sessions", "Open streams and WebSockets", sessions.count)
    metrics.gauge("gateway_websockets", "Open WebSockets", sessions.count_websockets)
    metrics.gauge(
        "gateway_streams", "Open HTTP exchanges",
        lambda: sessions.count() - sessions.count_websockets(),
    )  # fmt: skip
    metrics.gauge(
        "gateway_route_subscription_up", "1 while invalidations are received",
        lambda: 1.0 if cache.subscribed else 0.0,
    )  # fmt: skip
    metrics.gauge("gateway_draining", "1 while draining", lambda: 1.0 if health.draining else 0.0)


async def _bind_public(
    listener: Listener, endpoint: Endpoint, *, reuse_port: bool
) -> tuple[asyncio.AbstractServer, Endpoint]:
    # Our own create_server, not aiohttp's TCPSite: every connection goes through the
    # Listener (header timeout, connection cap, PROXY protocol).
    server = await asyncio.get_running_loop().create_server(
        listener, endpoint.host, endpoint.port, backlog=LISTEN_BACKLOG, reuse_port=reuse_port
    )
    return server, Endpoint(endpoint.host, int(server.sockets[0].getsockname()[1]))


async def _bind(runner: web.BaseRunner, endpoint: Endpoint, *, reuse_port: bool) -> Endpoint:
    await runner.setup()
    site = web.TCPSite(
        runner, endpoint.host, endpoint.port, backlog=LISTEN_BACKLOG, reuse_port=reuse_port
    )
    await site.start()
    port = runner.addresses[0][1]  # the real port when 0 was asked for
    return Endpoint(endpoint.host, int(port))


def _table_settings(config: Config, listen: Endpoint, admin: Endpoint) -> schema.TableSettings:
    template = config.routing.public_url_template
    if template is None:
        suffix = "" if listen.port == 80 else f":{listen.port}"
        template = f"http://{{port}}-{{label}}.{config.domains[0]}{suffix}"
    return schema.TableSettings(
        label_length=config.routing.url_id_length,
        url_template=template,
        sandbox_networks=config.routing.sandbox_networks,
        quarantine_seconds=config.routing.quarantine_seconds,
        events_max_length=config.routing.events_max_length,
        gateway_listeners=(str(listen), str(admin)),
    )


async def _refuse_other_schema(client: store.Client) -> None:
    try:
        await store.read_settings(client)
    except errors.TableNotInitialised:
        return


async def _keep_settings(client: store.Client, settings: schema.TableSettings) -> None:
    while True:
        await asyncio.sleep(SETTINGS_CHECK_SECONDS)
        with contextlib.suppress(errors.StoreUnavailable):
            with store.redis_errors("checking table settings"):
                async with asyncio.timeout(2.0):
                    present = await client.exists(schema.META_KEY)
            reraise_swallowed_cancel()
            if not present:
                log.warning("table settings missing from Redis; writing them again")
                await store.write_settings(client, settings)
        reraise_swallowed_cancel()


def _enforcer(
    running: Running, cache: RouteCache, sessions: ActiveSessions
) -> Callable[[str | None], None]:
    """A cache listener that ends sessions whose route an invalidation took away."""

    async def enforce(labels: list[str]) -> None:
        for label in labels:
            try:
                record = await cache.lookup(label)
            except errors.EdgeError:
                continue  # Redis unreachable: cached routes stand for the stale budget
            await sessions.enforce(label, record)

    def on_change(label: str | None) -> None:
        labels = sessions.labels() if label is None else [label] if sessions.has(label) else []
        if labels:
            _spawn(running, enforce(labels))

    return on_change


def _spawn(running: Running, coroutine: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coroutine)
    running.tasks.add(task)
    task.add_done_callback(running.tasks.discard)


def print_ready(line: dict[str, str]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
