"""The shared test harness itself: Redis processes, the cluster, upstreams, waiting."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tests.support.redis_proc import RedisCluster, RedisProcess
from tests.support.upstreams import (
    GZIP_PAYLOAD,
    OPEN_STREAMS,
    OPEN_WEBSOCKETS,
    Upstream,
    deterministic_bytes,
    echo_app,
    expected_sha256,
    start_upstream,
)
from tests.support.waiting import MS, wait_until

# ---------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------


async def test_redis_fixture_starts_empty(redis: aioredis.Redis) -> None:
    """The function-scoped client sees an empty database and can write to it."""
    assert await redis.dbsize() == 0
    await redis.set("left:behind", "1")
    assert await redis.get("left:behind") == "1"


async def test_redis_fixture_is_flushed_between_tests(redis: aioredis.Redis) -> None:
    """The key the previous test wrote is gone."""
    assert await redis.exists("left:behind") == 0


@pytest.mark.cluster
async def test_cluster_reports_ok_on_every_node(cluster: RedisCluster) -> None:
    """Every node of the cluster fixture answers CLUSTER INFO with cluster_state:ok."""
    assert len(cluster.startup_nodes) == 3
    assert cluster.url == f"redis://127.0.0.1:{cluster.startup_nodes[0][1]}"
    for host, port in cluster.startup_nodes:
        client = aioredis.Redis(host=host, port=port, decode_responses=True)
        try:
            info = await client.cluster("INFO")
        finally:
            await client.aclose()
        assert info["cluster_state"] == "ok"
        assert info["cluster_slots_assigned"] == "16384"


@pytest.mark.cluster
async def test_cluster_client_reaches_every_slot_owner(cluster: RedisCluster) -> None:
    """A RedisCluster client SETs and GETs keys whose slots live on different nodes."""
    nodes = [ClusterNode(host, port) for host, port in cluster.startup_nodes]
    client = ClusterClient(startup_nodes=nodes, decode_responses=True)
    try:
        await client.initialize()
        keys = [f"gw:{{sb{i}}}:route" for i in range(30)]
        owners = {getattr(client.get_node_from_key(key), "port", None) for key in keys}
        assert len(owners) == 3
        for key in keys:
            await client.set(key, key.upper())
        assert [await client.get(key) for key in keys] == [key.upper() for key in keys]
    finally:
        await client.aclose()


async def test_tcp_redis_pause_and_resume() -> None:
    """A TCP RedisProcess answers; paused it times out; resumed it answers again."""
    server = await RedisProcess.start(tcp=True)
    client = aioredis.Redis.from_url(server.url, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}"
        assert await client.ping()
        server.pause()
        with pytest.raises(aioredis.RedisError):
            await client.ping()
        server.resume()
        await wait_until(_pings(client), what="ping after resume")
    finally:
        await client.aclose()
        await server.stop()
    assert not server.running


async def test_restart_keeps_the_address() -> None:
    """After kill() and restart() the same unix URL answers again, from a new pid."""
    server = await RedisProcess.start()
    try:
        first_pid = server.pid
        server.kill()
        await server.restart()
        assert server.pid != first_pid
        client = aioredis.Redis.from_url(server.url)
        try:
            assert await client.ping()
        finally:
            await client.aclose()
    finally:
        await server.stop()


def _pings(client: aioredis.Redis) -> Callable[[], Awaitable[bool]]:
    async def predicate() -> bool:
        try:
            return bool(await client.ping())
        except aioredis.RedisError:
            return False

    return predicate


# ---------------------------------------------------------------------------------------
# Upstreams
# ---------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """An echo upstream named "a" on 127.0.0.2."""
    server = await start_upstream("127.0.0.2", echo_app("a"))
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that leaves bodies and paths exactly as sent."""
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        yield client


async def test_echo_upstream_on_127_0_0_2(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    """The echo reports its name, method, raw path, headers and the body's digest."""
    assert upstream.host == "127.0.0.2"
    assert upstream.port > 0
    body = b"x" * 100_000
    url = f"{upstream.url}/a/%2F/b?q=1&q=2"
    async with session.post(url, data=body, headers={"X-Test": "yes"}) as response:
        assert response.status == 200
        echoed = await response.json()
    assert echoed["upstream"] == "a"
    assert echoed["method"] == "POST"
    assert echoed["path_qs"] == "/a/%2F/b?q=1&q=2"
    assert ["X-Test", "yes"] in echoed["headers"]
    assert echoed["body_len"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_bytes_checksum_matches(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    """/bytes streams Content-Length bytes whose sha256 is expected_sha256(size)."""
    size = 3 * 64 * 1024 + 123
    assert hashlib.sha256(deterministic_bytes(size)).hexdigest() == expected_sha256(size)
    digest = hashlib.sha256()
    async with session.get(f"{upstream.url}/bytes?size={size}") as response:
        assert response.content_length == size
        async for chunk in response.content.iter_any():
            digest.update(chunk)
    assert digest.hexdigest() == expected_sha256(size)


async def test_abandoned_sse_is_cancelled_upstream(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    """Leaving an endless /sse stream cancels its handler, as OPEN_STREAMS shows."""
    stats = upstream.app[OPEN_STREAMS]
    async with session.get(f"{upstream.url}/sse?n=0&interval_ms=5") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        assert (await response.content.readuntil(b"\n\n")) == b"id: 0\ndata: event 0\n\n"
        assert stats.open == 1
        response.close()
    await wait_until(lambda: stats.cancelled == 1, timeout=2.0, what="sse handler cancelled")
    assert (stats.open, stats.completed) == (0, 0)


async def test_stream_sends_lines_then_completes(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    """/stream sends n lines chunked and the handler counts as completed."""
    async with session.get(f"{upstream.url}/stream?n=3&interval_ms=1") as response:
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert await response.read() == b"line 0\nline 1\nline 2\n"
    stats = upstream.app[OPEN_STREAMS]
    await wait_until(lambda: stats.completed == 1, what="stream handler completed")


@pytest.mark.parametrize(
    ("code", "body", "location"),
    [(204, b"", None), (304, b"", None), (302, b"status 302\n", "/elsewhere"), (503, None, None)],
    ids=["204", "304", "302", "503"],
)
async def test_status_route(
    upstream: Upstream,
    session: aiohttp.ClientSession,
    code: int,
    body: bytes | None,
    location: str | None,
) -> None:
    """/status/{code} answers that status, bodiless for 204/304, with Location for 302."""
    async with session.get(f"{upstream.url}/status/{code}", allow_redirects=False) as response:
        assert response.status == code
        assert response.headers.get("Location") == location
        if body is not None:
            assert await response.read() == body


async def test_gzip_and_cookies(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    """/gzip sends raw gzip bytes and /set-cookie sends two Set-Cookie headers."""
    async with session.get(f"{upstream.url}/gzip") as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await response.read()) == GZIP_PAYLOAD
    async with session.get(f"{upstream.url}/set-cookie") as response:
        assert len(response.headers.getall("Set-Cookie")) == 2


async def test_slow_headers_waits(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    """/slow-headers answers no sooner than the delay asked for."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with session.get(f"{upstream.url}/slow-headers?delay_ms=50") as response:
        assert response.status == 200
    assert loop.time() - started >= 0.05


async def test_websocket_echo_protocol_and_close(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    """/ws picks the subprotocol, echoes text and binary, and closes with the asked code."""
    async with session.ws_connect(f"{upstream.url}/ws", protocols=("vite-hmr",)) as ws:
        assert ws.protocol == "vite-hmr"
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=1.0) == "hello"
        await ws.send_bytes(b"\x00\x01")
        assert await ws.receive_bytes(timeout=1.0) == b"\x00\x01"
        await ws.send_str("!info")
        info = json.loads(await ws.receive_str(timeout=1.0))
        assert (info["upstream"], info["protocol"]) == ("a", "vite-hmr")
        await ws.send_str("close:4001:bye now")
        message = await ws.receive(timeout=1.0)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert (message.data, message.extra) == (4001, "bye now")
    stats = upstream.app[OPEN_WEBSOCKETS]
    await wait_until(lambda: stats.open == 0, what="ws handler ended")
    assert stats.started == 1


async def test_websocket_reject(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    """/ws-reject answers the upgrade with 403."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await session.ws_connect(f"{upstream.url}/ws-reject")
    assert caught.value.status == 403


# ---------------------------------------------------------------------------------------
# Waiting
# ---------------------------------------------------------------------------------------


async def test_wait_until_names_what_timed_out() -> None:
    """wait_until raises AssertionError naming the condition when it never holds."""
    with pytest.raises(AssertionError, match="the impossible"):
        await wait_until(lambda: False, timeout=20 * MS, what="the impossible")
