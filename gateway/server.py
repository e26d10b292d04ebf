"""``gateway serve``: wires the pieces together and owns their lifecycle.

Start order: Redis (embedded or given) -> listeners bound (port 0 resolves here) -> the
table settings written -> watcher and housekeeping tasks -> the ready line. Stop order is
the reverse; every task created here is cancelled and awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway import embedded, errors
from gateway.config import Config, ConfigError, Endpoint
from gateway.control import api
from gateway.proxy.handler import EdgeHandler, EdgeSettings
from gateway.proxy.sessions import ActiveSessions
from gateway.proxy.upstream import UpstreamPool, UpstreamTimeouts
from gateway.routing import schema, store
from gateway.routing.cache import RouteCache
from gateway.routing.watcher import InvalidationWatcher

log = logging.getLogger("gateway.server")

# How often serve checks that the table settings are still in Redis (it rewrites them
# after Redis lost its data, e.g. a restart without persistence).
SETTINGS_CHECK_SECONDS = 5.0
# aiohttp's defaults (8190) refuse the large cookies some dev tools set.
MAX_HEADER_FIELD_BYTES = 16 * 1024
# Above any load balancer's idle timeout (AWS ALB 60 s, GCP 600 s), so the LB closes first.
KEEPALIVE_IDLE_SECONDS = 620.0


@dataclass(slots=True)
class Running:
    """The bound addresses of a started gateway."""

    listen: Endpoint
    admin: Endpoint
    redis_url: str
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)


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
    """Run the gateway until SIGTERM or SIGINT."""
    check_admin_binding(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with redis_for(config) as url, run_gateway(config, url) as running:
        on_ready(
            {
                "event": "ready",
                "listen": str(running.listen),
                "admin": str(running.admin),
                "redis": url,
            }
        )
        await stop.wait()


@contextlib.asynccontextmanager
async def run_gateway(config: Config, redis_url: str) -> AsyncIterator[Running]:
    """The gateway on ``redis_url``, running for the duration of the ``async with``."""
    client = store.open_redis(redis_url, timeout_seconds=config.redis.write_timeout_seconds)
    await _refuse_other_schema(client)
    cache = RouteCache(
        store.RouteReader(client, timeout_seconds=config.redis.lookup_timeout_seconds).get,
        max_entries=config.cache.max_entries,
        positive_ttl_seconds=config.cache.positive_ttl_seconds,
        negative_ttl_seconds=config.cache.negative_ttl_seconds,
        stale_budget_seconds=config.redis.stale_budget_seconds,
    )
    up = config.upstream
    pool = UpstreamPool(
        UpstreamTimeouts(
            connect_seconds=up.connect_timeout_seconds,
            connect_retry_window_seconds=up.connect_retry_window_seconds,
            response_seconds=up.response_timeout_seconds,
            read_idle_seconds=up.read_idle_timeout_seconds,
            pool_idle_seconds=up.pool_idle_seconds,
        )
    )
    ws_client = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=up.connect_timeout_seconds),
    )
    sessions = ActiveSessions()
    handler = EdgeHandler(
        EdgeSettings(
            domains=config.domains,
            sandbox_networks=config.sandbox_networks,
            trusted_networks=config.trusted_networks,
            read_idle_seconds=up.read_idle_timeout_seconds,
            connect_seconds=up.connect_timeout_seconds,
            websocket_max_message_bytes=up.websocket_max_message_bytes,
        ),
        cache=cache, pool=pool, websocket_client=ws_client, sessions=sessions,
    )  # fmt: skip
    public_runner = web.ServerRunner(
        web.Server(
            handler,
            handler_cancellation=True,
            auto_decompress=False,
            max_field_size=MAX_HEADER_FIELD_BYTES,
            max_line_size=MAX_HEADER_FIELD_BYTES,
            keepalive_timeout=KEEPALIVE_IDLE_SECONDS,
            access_log=None,
        ),
        handle_signals=False,
        shutdown_timeout=2.0,
    )
    writer = store.RouteWriter(client, timeout_seconds=config.redis.write_timeout_seconds)
    admin_runner = web.AppRunner(
        api.create_app(writer, token=config.admin_token, health=api.Health(), cache=cache),
        handle_signals=False,
        access_log=None,
    )
    running: Running | None = None
    try:
        listen = await _bind(public_runner, config.listen_endpoint)
        admin = await _bind(admin_runner, config.admin_endpoint)
        handler.listeners = [(listen.host, listen.port), (admin.host, admin.port)]
        settings = _table_settings(config, listen, admin)
        await store.write_settings(client, settings)
        running = Running(listen, admin, redis_url)
        _spawn(running, InvalidationWatcher(
            client, cache, heartbeat_interval_seconds=config.cache.heartbeat_interval_seconds
        ).run())  # fmt: skip
        _spawn(running, _keep_settings(client, settings))
        cache.listeners.append(_enforcer(running, cache, sessions))
        yield running
    finally:
        await sessions.stop_all("the gateway is shutting down")
        for task in running.tasks if running else ():
            task.cancel()
        for task in list(running.tasks) if running else ():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await public_runner.cleanup()
        await admin_runner.cleanup()
        await pool.close()
        await ws_client.close()
        await client.aclose()


async def _bind(runner: web.BaseRunner, endpoint: Endpoint) -> Endpoint:
    await runner.setup()
    site = web.TCPSite(runner, endpoint.host, endpoint.port, backlog=1024)
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


async def _refuse_other_schema(client: store.Redis) -> None:
    try:
        await store.read_settings(client)
    except errors.TableNotInitialised:
        return


async def _keep_settings(client: store.Redis, settings: schema.TableSettings) -> None:
    while True:
        await asyncio.sleep(SETTINGS_CHECK_SECONDS)
        with contextlib.suppress(errors.StoreUnavailable):
            with store.redis_errors("checking table settings"):
                async with asyncio.timeout(2.0):
                    present = await client.exists(schema.META_KEY)
            if not present:
                log.warning("table settings missing from Redis; writing them again")
                await store.write_settings(client, settings)


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
