"""Metrics and the access log for each outcome of the error taxonomy (issue 6, points 6-7).

A real ``gateway serve`` answers one request per outcome that is cheap to produce; then
/metrics must count each under closed-set labels only (never a sandbox label or port),
and stdout after the ready line must hold exactly one JSON line per request with the
documented fields, without query strings (by default) or credentials.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from gateway import errors
from tests.integration.test_ops_drain import (
    DOMAIN,
    Replica,
    replica,
    route_sandbox,
    sample,
    scrape,
)
from tests.support.gateway import route_writer
from tests.support.rawhttp import exchange, request_bytes
from tests.support.upstreams import Upstream
from tests.support.waiting import wait_until

SANDBOX = "opsmet01"
PAUSED = "opspau01"
REFUSING = "opsref01"
SECRETS = ("SECRETQUERY", "AUTHSECRET", "COOKIESECRET", "USERSECRET")
FIELDS = {"time", "requestId", "clientIp", "host", "sandbox", "port", "method", "path",
          "status", "bytesIn", "bytesOut", "upstreamMs", "totalMs", "code"}  # fmt: skip
TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
QUICK = {"GATEWAY_UPSTREAM__CONNECT_RETRY_WINDOW_SECONDS": "0.1"}


@dataclass(frozen=True, slots=True)
class Expected:
    """One request sent and what its metrics and log line must say."""

    request_id: str
    status: int
    code: str | None
    sandbox: str | None
    port: int | None
    path: str
    method: str = "GET"
    kind: str = "http"
    bytes_in: int = 0
    proxied: bool = False


async def _stdout_after_stop(gateway: Replica) -> list[dict[str, Any]]:
    """Stop the replica (its log is flushed on the way out); the JSON lines it printed."""
    assert await gateway.process.stop() == 0
    stream = gateway.process.process.stdout
    assert stream is not None
    text = (await stream.read()).decode()
    return [json.loads(line) for line in text.splitlines()]


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def _one(gateway: Replica, host: str, path: str = "/", **kw: Any) -> tuple[int, str, str]:
    extra = kw.pop("extra", [])
    method = kw.pop("method", "GET")
    body = kw.pop("body", b"")
    version = kw.pop("version", "HTTP/1.1")
    headers = [("Host", host), *extra]
    if body:
        headers.append(("Content-Length", str(len(body))))
    raw = request_bytes(method, path, headers, body, version=version)
    answer = await exchange("127.0.0.1", gateway.port, raw)
    request_id = answer.header("X-Request-Id") or ""
    return answer.status, request_id, answer.header("X-Gateway-Error") or ""


async def _taxonomy(gateway: Replica, redis_url: str, upstream: Upstream) -> list[Expected]:
    """Send one request per outcome; what each must produce."""
    host = await route_sandbox(redis_url, SANDBOX, upstream)
    port = upstream.port
    label = SANDBOX[:6]
    await route_sandbox(redis_url, PAUSED, upstream)
    refused_port = _free_port("127.0.0.4")
    async with route_writer(redis_url) as writer:
        await writer.pause(PAUSED)
        await writer.create(REFUSING, address="127.0.0.4")
        await writer.expose(REFUSING, refused_port)
    sent: list[Expected] = []

    async def expect(
        host: str, path: str, status: int, code: str | None, *, sandbox: str | None,
        port: int | None, **kw: Any,
    ) -> None:  # fmt: skip
        proxied = kw.pop("proxied", False)
        clean = kw.pop("logged_path", path.partition("?")[0])
        logged_method = kw.pop("logged_method", kw.get("method", "GET"))
        got_status, request_id, got_code = await _one(gateway, host, path, **kw)
        assert (got_status, got_code or None) == (status, code), path
        sent.append(Expected(request_id, status, code, sandbox, port, clean,
                             method=logged_method, bytes_in=len(kw.get("body", b"")),
                             proxied=proxied))  # fmt: skip

    secret_headers = [("Authorization", "Bearer AUTHSECRET"), ("Cookie", "sid=COOKIESECRET")]
    mine: dict[str, Any] = {"sandbox": label, "port": port}
    nowhere: dict[str, Any] = {"sandbox": None, "port": None}
    await expect(host, "/ok?token=SECRETQUERY", 200, None, **mine,
                 extra=secret_headers, proxied=True)  # fmt: skip
    await expect(host, "/upload", 200, None, **mine, method="POST", body=b"12345",
                 proxied=True)  # fmt: skip
    await expect(host, "/status/404", 404, None, **mine, proxied=True)
    await expect("example.com", "/x", 404, "unknown_host", **nowhere)
    await expect(f"nodash.{DOMAIN}", "/x", 400, "invalid_host", **nowhere)
    # Absolute-form with credentials in it: refused, and logged without them.
    await expect(host, f"http://user:USERSECRET@{host}/abs?q=SECRETQUERY", 400, "invalid_host",
                 **mine, logged_path=f"http://{host}/abs")  # fmt: skip
    await expect(f"3000-nosuch.{DOMAIN}", "/x", 404, "sandbox_not_found",
                 sandbox="nosuch", port=3000)  # fmt: skip
    await expect(f"4000-{label}.{DOMAIN}", "/x", 404, "port_not_exposed",
                 sandbox=label, port=4000)  # fmt: skip
    await expect(f"{port}-{PAUSED[:6]}.{DOMAIN}", "/x", 503, "sandbox_paused",
                 sandbox=PAUSED[:6], port=port)  # fmt: skip
    await expect(f"{refused_port}-{REFUSING[:6]}.{DOMAIN}", "/x", 502, "upstream_refused",
                 sandbox=REFUSING[:6], port=refused_port)  # fmt: skip
    # Refused before any routing: another HTTP version (the front), and more header fields
    # than allowed (aiohttp's parser, whose stand-in for the request is "UNKNOWN /").
    await expect(host, "/v2", 505, "unsupported_http_version", **nowhere, version="HTTP/2.0")
    many = [(f"X-{i}", str(i)) for i in range(200)]
    await expect(host, "/many", 431, "header_fields_too_large", **nowhere, logged_path="/",
                 logged_method="UNKNOWN", extra=many)  # fmt: skip

    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(gateway.url + "/ws?token=SECRETQUERY", headers={"Host": host}) as ws,
    ):
        request_id = ws._response.headers.get("X-Request-Id", "")
        await ws.send_str("ping")
        assert (await ws.receive(timeout=2)).data == "ping"
        await ws.close()
    sent.append(Expected(request_id, 101, None, label, port, "/ws", kind="websocket",
                         bytes_in=len("ping")))  # fmt: skip
    return sent


def _assert_closed_label_sets(samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
                              forbidden: set[str]) -> None:  # fmt: skip
    codes = {c.code for c in _edge_error_classes()} | {"upstream_error", "client_gone"}
    allowed = {
        "kind": {"http", "websocket"},
        "outcome": {"ok", "gateway_error", "aborted", "client_gone"},
        "code_class": {f"{n}xx" for n in range(6)},
        "direction": {"in", "out"},
    }
    for name, labels in samples:
        for key, value in labels:
            if key == "le":
                continue
            assert not any(word in value for word in forbidden), (name, key, value)
            if key == "code":
                assert value in codes, (name, value)
            else:
                assert key in allowed and value in allowed[key], (name, key, value)


def _edge_error_classes() -> list[Any]:
    found: list[Any] = []
    stack: list[type] = [errors.EdgeError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        code = getattr(cls, "code", None)
        if isinstance(code, str):
            found.append(cls)
    return found


async def test_metrics_and_access_log_per_outcome(
    redis: aioredis.Redis, redis_url: str, upstream: Upstream
) -> None:
    """Each outcome counted by kind/outcome/class and code; one right JSON line each."""
    async with replica(redis_url, env=QUICK) as gateway:
        sent = await _taxonomy(gateway, redis_url, upstream)

        async def websocket_counted() -> bool:
            samples = await scrape(gateway.admin_url)
            return sample(samples, "gateway_requests_total", kind="websocket", outcome="ok",
                          code_class="1xx") == 1  # fmt: skip

        await wait_until(websocket_counted, what="the WebSocket session in /metrics")
        samples = await scrape(gateway.admin_url)
        lines = await _stdout_after_stop(gateway)

    def requests(kind: str, outcome: str, code_class: str) -> float:
        return sample(samples, "gateway_requests_total", kind=kind, outcome=outcome,
                      code_class=code_class)  # fmt: skip

    assert requests("http", "ok", "2xx") == 2
    assert requests("http", "ok", "4xx") == 1
    assert requests("http", "gateway_error", "4xx") == 6
    assert requests("http", "gateway_error", "5xx") == 3
    assert requests("websocket", "ok", "1xx") == 1
    assert sample(samples, "gateway_errors_total", code="invalid_host") == 2
    for code in ("unknown_host", "sandbox_not_found", "port_not_exposed", "sandbox_paused",
                 "upstream_refused", "unsupported_http_version",
                 "header_fields_too_large"):  # fmt: skip
        assert sample(samples, "gateway_errors_total", code=code) == 1, code
    assert sample(samples, "gateway_body_bytes_total", direction="in") >= 5
    assert sample(samples, "gateway_request_seconds_count") == len(sent)
    assert sample(samples, "gateway_upstream_response_seconds_count") == 3
    forbidden = {SANDBOX[:6], PAUSED[:6], REFUSING[:6], "nosuch", *(
        str(e.port) for e in sent if e.port)}  # fmt: skip
    _assert_closed_label_sets(samples, forbidden)

    assert len(lines) == len(sent), lines
    by_id = {line["requestId"]: line for line in lines}
    for expected in sent:
        line = by_id[expected.request_id]
        assert set(line) >= FIELDS, set(line) ^ FIELDS
        assert TIME_RE.fullmatch(line["time"])
        assert line["clientIp"] == "127.0.0.1"
        assert line["kind"] == expected.kind
        assert line["status"] == expected.status
        assert line["code"] == expected.code
        assert line["sandbox"] == expected.sandbox
        assert line["port"] == expected.port
        assert line["method"] == expected.method
        assert line["path"] == expected.path
        assert line["bytesIn"] == expected.bytes_in
        assert isinstance(line["totalMs"], float) and line["totalMs"] >= 0
        if expected.proxied:
            assert line["bytesOut"] > 0
            assert isinstance(line["upstreamMs"], float)
            assert line["upstreamMs"] <= line["totalMs"]
        if expected.code is not None:
            assert line["outcome"] == "gateway_error" and line["upstreamMs"] is None
    text = json.dumps(lines)
    for secret in SECRETS:
        assert secret not in text


async def test_access_log_off_writes_nothing(
    redis: aioredis.Redis, redis_url: str, upstream: Upstream
) -> None:
    """access_log.enabled false: stdout holds the ready line and nothing else."""
    async with replica(redis_url, env={"GATEWAY_ACCESS_LOG__ENABLED": "false"}) as gateway:
        host = await route_sandbox(redis_url, SANDBOX, upstream)
        for path in ("/a", "/b?x=1"):
            assert (await _one(gateway, host, path))[0] == 200
        assert (await _one(gateway, "example.com", "/"))[0] == 404
        assert await _stdout_after_stop(gateway) == []


async def test_access_log_query_when_asked(
    redis: aioredis.Redis, redis_url: str, upstream: Upstream
) -> None:
    """access_log.include_query true keeps the query string in the path."""
    env = {"GATEWAY_ACCESS_LOG__INCLUDE_QUERY": "true"}
    async with replica(redis_url, env=env) as gateway:
        host = await route_sandbox(redis_url, SANDBOX, upstream)
        assert (await _one(gateway, host, "/q?page=2&sort=asc"))[0] == 200
        (line,) = await _stdout_after_stop(gateway)
    assert line["path"] == "/q?page=2&sort=asc"
