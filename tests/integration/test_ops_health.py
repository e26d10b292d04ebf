"""Health endpoints for load balancers and orchestrators (issue 6, point 2).

``/healthz`` (alive), ``/readyz`` (this replica: started and not draining, never the
shared Redis) and ``/metrics`` on the admin listener need no token. The optional health
path on the public listener answers only for a Host outside the sandbox domains, so a
sandbox's own ``/healthz`` still reaches the sandbox.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio
import redis.asyncio as aioredis

from tests.integration.test_ops_drain import replica, route_sandbox, status_of
from tests.support.gateway import GatewayHandle, running_gateway
from tests.support.rawhttp import exchange, request_bytes
from tests.support.redis_proc import RedisProcess
from tests.support.upstreams import Upstream, echo_app, start_upstream

SANDBOX = "opshlt01"
TOKEN = "s3cret-admin-token"


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = await start_upstream("127.0.0.2", echo_app("sandbox"))
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def gateway(redis: aioredis.Redis, redis_url: str) -> AsyncIterator[GatewayHandle]:
    async with running_gateway(redis_url, {"server": {"health_path": "/healthz"}}) as handle:
        yield handle


async def _admin(url: str, *, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=3)) as response,
    ):
        return response.status, await response.text()


async def test_probes_need_no_token(redis_url: str, redis: aioredis.Redis) -> None:
    """With GATEWAY_ADMIN_TOKEN set, /healthz, /readyz and /metrics answer without it."""
    async with replica(redis_url, env={"GATEWAY_ADMIN_TOKEN": TOKEN}) as gateway:
        base = gateway.admin_url
        assert await _admin(base + "/healthz") == (200, '{"status": "ok"}')
        assert await _admin(base + "/readyz") == (200, '{"status": "ready"}')
        status, text = await _admin(base + "/metrics")
        assert status == 200 and "gateway_requests_total" in text
        # The API itself does need it.
        assert (await _admin(base + "/v1/sandboxes/nosuch"))[0] == 401
        assert (await _admin(base + "/v1/sandboxes/nosuch", token="wrong"))[0] == 401
        assert (await _admin(base + "/v1/sandboxes/nosuch", token=TOKEN))[0] == 404


async def test_readyz_ignores_a_frozen_redis() -> None:
    """A Redis that accepts connections but never answers leaves /readyz and /healthz 200."""
    private = await RedisProcess.start()
    try:
        async with running_gateway(private.url) as gateway:
            private.pause()
            try:
                # For about a second, every route lookup times out (Redis really is out of
                # reach: 503 route_store_unavailable) while the probes stay 200.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 1.0
                lookups = 0
                while loop.time() < deadline:
                    answer = await exchange(
                        "127.0.0.1", gateway.port,
                        request_bytes("GET", "/", [("Host", gateway.host(3000, f"nos{lookups}"))]),
                    )  # fmt: skip
                    lookups += 1
                    assert answer.status == 503
                    assert answer.header("X-Gateway-Error") == "route_store_unavailable"
                    assert await status_of(gateway.admin_url + "/readyz") == 200
                    assert await status_of(gateway.admin_url + "/healthz") == 200
                assert lookups >= 2
            finally:
                private.resume()
    finally:
        await private.stop()


async def test_public_health_path_outside_sandbox_domains(
    gateway: GatewayHandle, redis_url: str, upstream: Upstream
) -> None:
    """The public health path answers for an IP, a foreign name or no Host; never a sandbox's."""
    for host in ("10.0.0.5", f"127.0.0.1:{gateway.port}", "lb.internal", None):
        headers = [("Host", host)] if host is not None else []
        version = "HTTP/1.1" if host is not None else "HTTP/1.0"
        answer = await exchange(
            "127.0.0.1", gateway.port, request_bytes("GET", "/healthz", headers, version=version)
        )
        assert answer.status == 200, (host, answer.body)
        assert json.loads(answer.body) == {"status": "ok"}
        assert answer.header("X-Request-Id")
        assert answer.header("X-Gateway-Error") is None
    head = await exchange(
        "127.0.0.1", gateway.port, request_bytes("HEAD", "/healthz", [("Host", "10.0.0.5")]),
        head_request=True,
    )  # fmt: skip
    assert head.status == 200

    # Other paths and methods on a foreign Host stay what they were: unknown_host.
    for method, path in (("GET", "/"), ("GET", "/healthz/x"), ("POST", "/healthz")):
        answer = await exchange(
            "127.0.0.1", gateway.port,
            request_bytes(method, path, [("Host", "10.0.0.5"), ("Content-Length", "0")]),
        )  # fmt: skip
        assert answer.status == 404 and answer.header("X-Gateway-Error") == "unknown_host"

    # On a sandbox's Host, /healthz is the sandbox's own.
    host = await route_sandbox(redis_url, SANDBOX, upstream)
    answer = await exchange(
        "127.0.0.1", gateway.port, request_bytes("GET", "/healthz", [("Host", host)])
    )
    assert answer.status == 200
    assert json.loads(answer.body)["upstream"] == "sandbox"
    # And on a Host under the domain with no such sandbox, it is that sandbox's 404.
    missing = gateway.host(3000, "nosuch")
    answer = await exchange(
        "127.0.0.1", gateway.port, request_bytes("GET", "/healthz", [("Host", missing)])
    )
    assert answer.status == 404 and answer.header("X-Gateway-Error") == "sandbox_not_found"


async def test_public_health_path_is_off_by_default(redis: aioredis.Redis, redis_url: str) -> None:
    """Without server.health_path a foreign Host's /healthz is unknown_host."""
    async with running_gateway(redis_url) as gateway:
        answer = await exchange(
            "127.0.0.1", gateway.port, request_bytes("GET", "/healthz", [("Host", "10.0.0.5")])
        )
        assert answer.status == 404 and answer.header("X-Gateway-Error") == "unknown_host"


async def test_public_health_path_fails_while_draining(
    gateway: GatewayHandle, redis_url: str
) -> None:
    """While draining, the public health path says 503 (and closes the connection)."""
    gateway.running.handler.draining = True
    try:
        answer = await exchange(
            "127.0.0.1", gateway.port, request_bytes("GET", "/healthz", [("Host", "10.0.0.5")])
        )
    finally:
        gateway.running.handler.draining = False
    assert answer.status == 503
    assert json.loads(answer.body) == {"status": "draining"}
    assert answer.header("Connection") == "close"
