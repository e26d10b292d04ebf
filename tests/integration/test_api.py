"""The admin HTTP API of a running gateway: every /v1 route, its statuses and its errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.routing import schema
from tests.integration.test_store import unchanged
from tests.support.gateway import GatewayHandle, running_gateway

TOKEN = "s3cret"


@pytest_asyncio.fixture
async def gateway(redis_url: str, redis: aioredis.Redis) -> AsyncIterator[GatewayHandle]:
    """A whole gateway without an admin token, on an empty table."""
    async with running_gateway(redis_url) as handle:
        yield handle


@pytest_asyncio.fixture
async def guarded(redis_url: str, redis: aioredis.Redis) -> AsyncIterator[GatewayHandle]:
    """A whole gateway whose admin API wants ``Bearer s3cret``."""
    async with running_gateway(redis_url, {"admin_token": TOKEN}) as handle:
        yield handle


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def call(
    http: aiohttp.ClientSession,
    gateway: GatewayHandle,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One admin request; returns the status and the JSON body (asserting it is JSON)."""
    data = raw if raw is not None else None
    kwargs: dict[str, Any] = {"headers": headers or {}}
    if data is not None:
        kwargs["data"] = data
    elif body is not None:
        kwargs["json"] = body
    async with http.request(method, gateway.admin_url + path, **kwargs) as response:
        text = await response.text()
        assert "Traceback" not in text
        assert response.content_type == "application/json", text
        return response.status, await response.json()


def assert_error(body: Any, code: str, *words: str) -> None:
    """An error body is exactly {"error": {"code", "message"}}, the message naming the problem."""
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    for word in words:
        assert word in body["error"]["message"], body


async def make_sandbox(http: aiohttp.ClientSession, gateway: GatewayHandle, **extra: Any) -> Any:
    status, body = await call(
        http, gateway, "POST", "/v1/sandboxes", {"id": "abc123", "address": "127.0.0.2", **extra}
    )
    assert status == 201, body
    return body


# ---------------------------------------------------------------------------------------
# Every route, successful
# ---------------------------------------------------------------------------------------


async def test_create_and_show(gateway: GatewayHandle, http: aiohttp.ClientSession) -> None:
    """POST /v1/sandboxes answers 201 with the sandbox; GET shows it with 200."""
    created = await make_sandbox(http, gateway, allowPorts=[3000, 5173])
    assert created == {
        "id": "abc123", "label": "abc123", "state": "running", "address": "127.0.0.2",
        "allowPorts": [3000, 5173], "ports": [], "gen": 1,
    }  # fmt: skip
    status, shown = await call(http, gateway, "GET", "/v1/sandboxes/abc123")
    assert (status, shown) == (200, created)


async def test_expose_first_201_then_200(
    gateway: GatewayHandle, http: aiohttp.ClientSession
) -> None:
    """The first expose of a port is 201, a repeat 200, both {port, url, sandboxId}."""
    await make_sandbox(http, gateway)
    expected = {
        "port": 3000,
        "url": f"http://3000-abc123.box.test:{gateway.port}",
        "sandboxId": "abc123",
    }
    assert await call(http, gateway, "POST", "/v1/sandboxes/abc123/ports", {"port": 3000}) == (
        201,
        expected,
    )
    assert await call(http, gateway, "POST", "/v1/sandboxes/abc123/ports", {"port": 3000}) == (
        200,
        expected,
    )
    status, _ = await call(
        http, gateway, "POST", "/v1/sandboxes/abc123/ports", {"port": "5173", "hostRewrite": True}
    )
    assert status == 201


async def test_list_and_close(gateway: GatewayHandle, http: aiohttp.ClientSession) -> None:
    """GET .../ports lists exposures; DELETE .../ports/{port} closes one (200, idempotent)."""
    await make_sandbox(http, gateway)
    for port in (5173, 3000):
        await call(http, gateway, "POST", "/v1/sandboxes/abc123/ports", {"port": port})
    status, listed = await call(http, gateway, "GET", "/v1/sandboxes/abc123/ports")
    assert status == 200
    assert [e["port"] for e in listed] == [3000, 5173]
    assert all(set(e) == {"port", "url", "sandboxId"} for e in listed)
    status, closed = await call(http, gateway, "DELETE", "/v1/sandboxes/abc123/ports/3000")
    assert status == 200 and [p["port"] for p in closed["ports"]] == [5173]
    status, again = await call(http, gateway, "DELETE", "/v1/sandboxes/abc123/ports/3000")
    assert status == 200 and again == closed


async def test_pause_resume_terminate(gateway: GatewayHandle, http: aiohttp.ClientSession) -> None:
    """pause, resume (with and without an address) and terminate answer 200 with the sandbox."""
    await make_sandbox(http, gateway)
    await call(http, gateway, "POST", "/v1/sandboxes/abc123/ports", {"port": 3000})
    status, paused = await call(http, gateway, "POST", "/v1/sandboxes/abc123/pause")
    assert (status, paused["state"]) == (200, "paused")
    assert [p["port"] for p in paused["ports"]] == [3000]
    status, resumed = await call(http, gateway, "POST", "/v1/sandboxes/abc123/resume")
    assert (status, resumed["state"], resumed["address"]) == (200, "running", "127.0.0.2")
    assert resumed["ports"] == paused["ports"]
    status, moved = await call(
        http, gateway, "POST", "/v1/sandboxes/abc123/resume", {"address": "127.0.0.3"}
    )
    assert (status, moved["address"], moved["ports"]) == (200, "127.0.0.3", paused["ports"])
    status, gone = await call(http, gateway, "DELETE", "/v1/sandboxes/abc123")
    assert (status, gone["state"], gone["address"], gone["ports"]) == (200, "terminated", None, [])
    status, again = await call(http, gateway, "DELETE", "/v1/sandboxes/abc123")
    assert (status, again) == (200, gone)


async def test_health_endpoints(gateway: GatewayHandle, http: aiohttp.ClientSession) -> None:
    """/healthz and /readyz answer 200; /metrics is Prometheus text."""
    assert await call(http, gateway, "GET", "/healthz") == (200, {"status": "ok"})
    assert await call(http, gateway, "GET", "/readyz") == (200, {"status": "ready"})
    async with http.get(gateway.admin_url + "/metrics") as response:
        assert response.status == 200
        assert "gateway_route_cache_hits_total" in await response.text()


# ---------------------------------------------------------------------------------------
# Errors: each changes nothing
# ---------------------------------------------------------------------------------------

BAD_REQUESTS: list[Any] = [
    # (method, path, json body or raw bytes, status, code, words)
    ("POST", "/v1/sandboxes", b"{", 400, "malformed_request", "not valid JSON"),
    ("POST", "/v1/sandboxes", b"", 400, "malformed_request", "not valid JSON"),
    ("POST", "/v1/sandboxes", b'{"id": "\xc3\x28"}', 400, "malformed_request", "not UTF-8"),
    ("POST", "/v1/sandboxes", b"[1, 2]", 400, "malformed_request", "JSON object"),
    ("POST", "/v1/sandboxes/abc123/ports", b"{port: 3000}", 400, "malformed_request", "JSON"),
    ("POST", "/v1/sandboxes/abc123/resume", b"{", 400, "malformed_request", "JSON"),
    ("POST", "/v1/sandboxes", {"id": "new123", "address": "127.0.0.2", "name": "x"}, 422,
     "unknown_field", "name"),
    ("POST", "/v1/sandboxes", {"address": "127.0.0.2"}, 422, "missing_field", "'id'"),
    ("POST", "/v1/sandboxes", {"id": "new123"}, 422, "missing_field", "'address'"),
    ("POST", "/v1/sandboxes", {"id": "New.123", "address": "127.0.0.2"}, 422, "invalid_id",
     "'New.123'"),
    ("POST", "/v1/sandboxes", {"id": "new123", "address": "10.0.0.1"}, 422,
     "address_not_allowed", "10.0.0.1"),
    ("POST", "/v1/sandboxes", {"id": "new123", "address": "my.host"}, 422, "invalid_address",
     "'my.host'"),
    ("POST", "/v1/sandboxes", {"id": "new123", "address": "127.0.0.2", "allowPorts": [80]},
     422, "reserved_port", "port 80"),
    ("POST", "/v1/sandboxes", {"id": "new123", "address": "127.0.0.2", "allowPorts": 3000},
     422, "invalid_port", "allowPorts"),
    ("POST", "/v1/sandboxes/abc123/ports", {"port": 80}, 422, "reserved_port", "port 80"),
    ("POST", "/v1/sandboxes/abc123/ports", {"port": 0}, 422, "reserved_port", "port 0"),
    ("POST", "/v1/sandboxes/abc123/ports", {"port": -1}, 422, "invalid_port", "port -1"),
    ("POST", "/v1/sandboxes/abc123/ports", {"port": 65536}, 422, "invalid_port", "65536"),
    ("POST", "/v1/sandboxes/abc123/ports", {"port": "abc"}, 422, "invalid_port", "'abc'"),
    ("POST", "/v1/sandboxes/abc123/ports", {"port": "03000"}, 422, "invalid_port",
     "leading zero"),
    ("POST", "/v1/sandboxes/abc123/ports", {"port": True}, 422, "invalid_port", "True"),
    ("POST", "/v1/sandboxes/abc123/ports", {"port": 3000.5}, 422, "invalid_port", "3000.5"),
    ("POST", "/v1/sandboxes/abc123/ports", {}, 422, "missing_field", "'port'"),
    ("POST", "/v1/sandboxes/abc123/ports", {"port": 3000, "public": True}, 422,
     "unknown_field", "public"),
    ("POST", "/v1/sandboxes/abc123/ports", {"port": 3000, "hostRewrite": "yes"}, 422,
     "invalid_option", "hostRewrite"),
    ("POST", "/v1/sandboxes/pol123/ports", {"port": 4000}, 422, "port_not_allowed", "4000"),
    ("DELETE", "/v1/sandboxes/abc123/ports/80", None, 422, "reserved_port", "port 80"),
    ("DELETE", "/v1/sandboxes/abc123/ports/03000", None, 422, "invalid_port", "leading zero"),
    ("POST", "/v1/sandboxes/abc123/resume", {"address": "8.8.8.8"}, 422, "address_not_allowed",
     "8.8.8.8"),
    ("POST", "/v1/sandboxes/abc123/resume", {"addr": "127.0.0.9"}, 422, "unknown_field",
     "addr"),
    ("GET", "/v1/sandboxes/ABC123", None, 422, "invalid_id", "'ABC123'"),
    ("POST", "/v1/sandboxes", {"id": "abc123", "address": "127.0.0.9"}, 409, "sandbox_exists",
     "'abc123'"),
    ("POST", "/v1/sandboxes", {"id": "abc123zz", "address": "127.0.0.9"}, 409, "label_taken",
     "'abc123'"),
    ("POST", "/v1/sandboxes", {"id": "dead00zz", "address": "127.0.0.9"}, 409,
     "label_quarantined", "'dead00'"),
    ("POST", "/v1/sandboxes/pau123/ports", {"port": 3001}, 409, "sandbox_paused", "paused"),
    ("POST", "/v1/sandboxes/dead00/ports", {"port": 3001}, 409, "sandbox_terminated",
     "terminated"),
    ("GET", "/v1/sandboxes/dead00/ports", None, 409, "sandbox_terminated", "terminated"),
    ("POST", "/v1/sandboxes/dead00/pause", None, 409, "sandbox_terminated", "terminated"),
    ("POST", "/v1/sandboxes/dead00/resume", None, 409, "sandbox_terminated", "terminated"),
    ("GET", "/v1/sandboxes/nosuch", None, 404, "sandbox_not_found", "'nosuch'"),
    ("POST", "/v1/sandboxes/nosuch/ports", {"port": 3000}, 404, "sandbox_not_found", "'nosuch'"),
    ("GET", "/v1/sandboxes/nosuch/ports", None, 404, "sandbox_not_found", "'nosuch'"),
    ("DELETE", "/v1/sandboxes/nosuch/ports/3000", None, 404, "sandbox_not_found", "'nosuch'"),
    ("POST", "/v1/sandboxes/nosuch/pause", None, 404, "sandbox_not_found", "'nosuch'"),
    ("POST", "/v1/sandboxes/nosuch/resume", None, 404, "sandbox_not_found", "'nosuch'"),
    ("DELETE", "/v1/sandboxes/nosuch", None, 404, "sandbox_not_found", "'nosuch'"),
    ("GET", "/v1/nothing-here", None, 404, "not_found", ""),
    ("PUT", "/v1/sandboxes/abc123", None, 405, "method_not_allowed", ""),
]  # fmt: skip


async def _populate(http: aiohttp.ClientSession, gateway: GatewayHandle) -> None:
    for sid, address, extra in (
        ("abc123", "127.0.0.2", {}), ("pol123", "127.0.0.3", {"allowPorts": [3000]}),
        ("pau123", "127.0.0.4", {}), ("dead00", "127.0.0.5", {}),
    ):  # fmt: skip
        status, _ = await call(
            http, gateway, "POST", "/v1/sandboxes", {"id": sid, "address": address, **extra}
        )
        assert status == 201
    await call(http, gateway, "POST", "/v1/sandboxes/abc123/ports", {"port": 3000})
    await call(http, gateway, "POST", "/v1/sandboxes/pau123/pause")
    await call(http, gateway, "DELETE", "/v1/sandboxes/dead00")


@pytest.mark.parametrize(
    ("request_", "expected"),
    [((m, p, b), (s, c, w)) for m, p, b, s, c, w in BAD_REQUESTS],
    ids=[f"{m} {p} {b!r}"[:60] for m, p, b, *_ in BAD_REQUESTS],
)
async def test_bad_requests(
    gateway: GatewayHandle,
    http: aiohttp.ClientSession,
    redis: aioredis.Redis,
    request_: tuple[str, str, Any],
    expected: tuple[int, str, str],
) -> None:
    """Each bad request gets its status and a JSON error naming the problem; Redis is unchanged."""
    await _populate(http, gateway)
    method, path, body = request_
    raw = body if isinstance(body, bytes) else None
    async with unchanged(redis):
        status, answer = await call(http, gateway, method, path, None if raw else body, raw=raw)
    want_status, code, words = expected
    assert status == want_status, answer
    assert_error(answer, code, words)


async def test_schema_mismatch_is_503(
    gateway: GatewayHandle, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    """With another schema version in gw:meta the API refuses writes with 503 schema_mismatch."""
    await redis.hset(schema.META_KEY, "schema_version", "99")
    async with unchanged(redis):
        status, body = await call(
            http, gateway, "POST", "/v1/sandboxes", {"id": "abc123", "address": "127.0.0.2"}
        )
    assert status == 503
    assert_error(body, "schema_mismatch", "schema version 99")


# ---------------------------------------------------------------------------------------
# The token
# ---------------------------------------------------------------------------------------

V1_ROUTES = [
    ("POST", "/v1/sandboxes"),
    ("GET", "/v1/sandboxes/abc123"),
    ("DELETE", "/v1/sandboxes/abc123"),
    ("POST", "/v1/sandboxes/abc123/ports"),
    ("GET", "/v1/sandboxes/abc123/ports"),
    ("DELETE", "/v1/sandboxes/abc123/ports/3000"),
    ("POST", "/v1/sandboxes/abc123/pause"),
    ("POST", "/v1/sandboxes/abc123/resume"),
    ("GET", "/v1/unknown"),
]


@pytest.mark.parametrize(
    "authorization",
    # (Trailing spaces are not a case: HTTP strips them from header values.)
    [
        None,
        "",
        "Bearer",
        "Bearer wrong",
        "Bearer s3cretx",
        "Bearer s3cre",
        "bearer s3cret",
        "s3cret",
        "Basic czNjcmV0",
    ],
    ids=[
        "missing",
        "empty",
        "scheme-only",
        "wrong",
        "longer",
        "prefix",
        "lowercase-scheme",
        "no-scheme",
        "basic",
    ],
)
async def test_v1_needs_the_token(
    guarded: GatewayHandle,
    http: aiohttp.ClientSession,
    redis: aioredis.Redis,
    authorization: str | None,
) -> None:
    """With a token set, every /v1 route answers 401 without the exact bearer token."""
    headers = {} if authorization is None else {"Authorization": authorization}
    async with unchanged(redis):
        for method, path in V1_ROUTES:
            body = {"id": "abc123", "address": "127.0.0.2"} if path == "/v1/sandboxes" else None
            status, answer = await call(http, guarded, method, path, body, headers=headers)
            assert status == 401, (method, path)
            assert_error(answer, "unauthorized", "token")


async def test_the_right_token_works(guarded: GatewayHandle, http: aiohttp.ClientSession) -> None:
    """With the bearer token the API works as usual."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    status, _ = await call(
        http, guarded, "POST", "/v1/sandboxes", {"id": "abc123", "address": "127.0.0.2"},
        headers=headers,
    )  # fmt: skip
    assert status == 201
    status, _ = await call(http, guarded, "GET", "/v1/sandboxes/abc123", headers=headers)
    assert status == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_probes_need_no_token(
    guarded: GatewayHandle, http: aiohttp.ClientSession, path: str
) -> None:
    """/healthz, /readyz and /metrics answer 200 without a token."""
    async with http.get(guarded.admin_url + path) as response:
        assert response.status == 200
