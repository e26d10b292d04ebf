"""One ``gateway serve`` process holding 2,000 keep-alive HTTP connections, 1,000
WebSockets and 200 SSE streams at once for ``GATEWAY_TEST_SOAK_SECONDS`` (default 120;
longer for releases), with 0 drops, and its fd count and RSS back near the baseline
afterwards.

Load is modest on purpose (two shared cores, a Python client): each keep-alive
connection sends a request about every 10 s, each WebSocket an echo about every 10 s,
each SSE stream gets an event a second. Tolerances after everything closed: fds within
baseline + 16 (listeners, Redis and pooled upstream connections that age out); RSS
within baseline + 64 MiB (CPython's allocator keeps freed arenas, so RSS never falls to
the exact baseline). Connections go to four sandboxes, so the per-sandbox connection
limit (1,000) is not what is measured here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tests.faults.figures import record
from tests.support.gateway import DOMAIN, LOOPBACK_ARGS, ServeProcess, route_writer
from tests.support.upstreams import Upstream
from tests.support.waiting import wait_until

SOAK_SECONDS = float(os.environ.get("GATEWAY_TEST_SOAK_SECONDS", "120"))
KEEPALIVE, WEBSOCKETS, STREAMS = 2000, 1000, 200
PERIOD_SECONDS = 10.0
SANDBOXES = 4
FD_TOLERANCE = 16
RSS_TOLERANCE_BYTES = 64 * 1024 * 1024


@dataclass
class Tally:
    requests: int = 0
    echoes: int = 0
    events: int = 0
    drops: list[str] = field(default_factory=list)


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _fd_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no fd limit")


@pytest_asyncio.fixture
async def served(redis: aioredis.Redis, redis_url: str) -> AsyncIterator[ServeProcess]:
    # Access log off: nobody reads the child's stdout after its ready line.
    env = {"GATEWAY_ACCESS_LOG__ENABLED": "false"}
    args = ["--redis-url", redis_url, "--domain", DOMAIN, *LOOPBACK_ARGS]
    process = await ServeProcess.start(args, env=env)
    try:
        yield process
    finally:
        await process.stop()


async def _keepalive(port: int, host: str, stop: asyncio.Event, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET /ka HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    # The first request goes at once: a connection that sends nothing for the header
    # timeout (10 s) is closed by the gateway (slowloris guard, gateway/listener.py).
    first = True
    try:
        while not stop.is_set():
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            if not head.startswith(b"HTTP/1.1 200"):
                tally.drops.append(f"keep-alive got {head[:40]!r}")
                return
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))  # fmt: skip
            await reader.readexactly(length)
            tally.requests += 1
            pause = random.uniform(0, PERIOD_SECONDS) if first else PERIOD_SECONDS
            first = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause * random.uniform(0.8, 1.2))
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        tally.drops.append(f"keep-alive: {exc!r}")
    finally:
        writer.close()


async def _websocket(
    http: aiohttp.ClientSession, url: str, host: str, stop: asyncio.Event, tally: Tally
) -> None:
    try:
        async with http.ws_connect(url + "/ws", headers={"Host": host}, autoping=True) as ws:
            await asyncio.sleep(random.uniform(0, PERIOD_SECONDS))
            n = 0
            while not stop.is_set():
                n += 1
                await ws.send_str(f"m{n}")
                reply = await asyncio.wait_for(ws.receive(), 30)
                if reply.type != aiohttp.WSMsgType.TEXT or reply.data != f"m{n}":
                    tally.drops.append(f"websocket got {reply.type} {reply.data!r}")
                    return
                tally.echoes += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), PERIOD_SECONDS * random.uniform(0.8, 1.2))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        tally.drops.append(f"websocket: {exc!r}")


async def _stream(
    http: aiohttp.ClientSession, url: str, host: str, stop: asyncio.Event, tally: Tally
) -> None:
    try:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
        sse = url + "/sse?n=0&interval_ms=1000"
        async with http.get(sse, headers={"Host": host}, timeout=timeout) as r:
            if r.status != 200:
                tally.drops.append(f"sse status {r.status}")
                return
            while not stop.is_set():
                read = asyncio.ensure_future(r.content.readline())
                stopped = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    read.cancel()
                    return
                stopped.cancel()
                line = read.result()
                if not line:
                    tally.drops.append("sse stream ended")
                    return
                if line.startswith(b"data:"):
                    tally.events += 1
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        tally.drops.append(f"sse: {exc!r}")


@pytest.mark.timeout(SOAK_SECONDS + 240)
async def test_soak_holds_thousands_of_connections_without_drops(
    served: ServeProcess, redis_url: str, upstream: Upstream
) -> None:
    """2,000 keep-alive connections, 1,000 WebSockets and 200 SSE streams for the soak
    duration: 0 drops; afterwards the gateway's fds and RSS return near the baseline."""
    hard = _raise_fd_limit()
    pid = served.pid
    assert _fd_limit(pid) >= 2 * (KEEPALIVE + WEBSOCKETS + STREAMS) + 100, "gateway fd limit"
    assert hard >= 2 * (KEEPALIVE + WEBSOCKETS + STREAMS) + 100, "test fd limit"
    port = int(served.ready["listen"].rpartition(":")[2])
    url = f"http://127.0.0.1:{port}"
    hosts = []
    async with route_writer(redis_url) as writer:
        for i in range(SANDBOXES):
            await writer.create(f"soak{i:02d}xx", address="127.0.0.2")
            await writer.expose(f"soak{i:02d}xx", upstream.port)
            hosts.append(f"{upstream.port}-soak{i:02d}.{DOMAIN}")
    async with aiohttp.ClientSession() as warm:
        for host in hosts:
            async with warm.get(url + "/", headers={"Host": host}) as r:
                assert r.status == 200
    baseline_fds, baseline_rss = _fds(pid), _rss(pid)

    tally = Tally()
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as http:
        tasks: list[asyncio.Task[None]] = []
        plan = ([("ka", i) for i in range(KEEPALIVE)] + [("ws", i) for i in range(WEBSOCKETS)]
                + [("sse", i) for i in range(STREAMS)])  # fmt: skip
        for n, (kind, i) in enumerate(plan):
            host = hosts[i % SANDBOXES]
            if kind == "ka":
                coro = _keepalive(port, host, stop, tally)
            elif kind == "ws":
                coro = _websocket(http, url, host, stop, tally)
            else:
                coro = _stream(http, url, host, stop, tally)
            tasks.append(asyncio.ensure_future(coro))
            if n % 100 == 99:
                await asyncio.sleep(0.05)  # ramp: connects in batches of 100
        ramp_seconds = time.monotonic() - started
        peak_fds, peak_rss = 0, 0
        deadline = time.monotonic() + SOAK_SECONDS
        while time.monotonic() < deadline and not tally.drops:  # bounded by the soak time
            peak_fds, peak_rss = max(peak_fds, _fds(pid)), max(peak_rss, _rss(pid))
            await asyncio.sleep(1)
        stop.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks, return_exceptions=True)
    ran_seconds = time.monotonic() - started
    assert not tally.drops, f"{len(tally.drops)} drops, first: {tally.drops[:3]}"
    assert peak_fds >= baseline_fds + KEEPALIVE + WEBSOCKETS + STREAMS, "the load never ran"
    await wait_until(lambda: _fds(pid) <= baseline_fds + FD_TOLERANCE, timeout=30,
                     interval=0.5, what="gateway fds back near baseline")  # fmt: skip
    after_fds, after_rss = _fds(pid), _rss(pid)
    assert after_rss <= baseline_rss + RSS_TOLERANCE_BYTES, (baseline_rss, after_rss)
    record(
        "soak", seconds=round(ran_seconds, 1), ramp_seconds=round(ramp_seconds, 1),
        keepalive_connections=KEEPALIVE, websockets=WEBSOCKETS, sse_streams=STREAMS,
        requests=tally.requests, websocket_echoes=tally.echoes, sse_events=tally.events,
        drops=len(tally.drops), baseline_fds=baseline_fds, peak_fds=peak_fds,
        after_fds=after_fds, baseline_rss_mib=round(baseline_rss / 2**20, 1),
        peak_rss_mib=round(peak_rss / 2**20, 1), after_rss_mib=round(after_rss / 2**20, 1),
    )  # fmt: skip
