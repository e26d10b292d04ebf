"""A rolling restart behind a real HAProxy under load: 0 failed requests (issue 6).

Two ``gateway serve`` replicas share one Redis behind HAProxy running the shipped
deploy/haproxy.cfg (rendered with test addresses, see tests/support/haproxy.py), which
health-checks ``/readyz`` on each replica's admin port every 200 ms (down after one
failure). A load generator sends keep-alive requests through HAProxy while each replica
in turn gets SIGTERM, drains (its 1 s drain delay is longer than HAProxy needs to
notice), exits 0 and is started again on the same ports; the next one is restarted only
once HAProxy has the new one back up. Every non-2xx answer and every exception counts as
a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.integration.test_ops_drain import Replica, route_sandbox, start_replica
from tests.support.haproxy import SERVER_NAMES, Backend, HAProxy, haproxy_binary
from tests.support.upstreams import Upstream
from tests.support.waiting import wait_until

pytestmark = pytest.mark.skipif(
    haproxy_binary() is None, reason="haproxy is not installed (Debian package: haproxy)"
)

SANDBOX = "opsrol01"
CONCURRENCY = 20
ROUNDS = 2  # each replica restarted this many times
DRAIN_DELAY_SECONDS = 1.0  # > HAProxy's detection time (200 ms interval, fall 1)
WARM_SECONDS = 1.0  # load before the first and after the last restart
BIND_ATTEMPTS = 5
REPLICA_ENV = {
    "GATEWAY_SERVER__DRAIN_DELAY_SECONDS": str(DRAIN_DELAY_SECONDS),
    "GATEWAY_SERVER__DRAIN_GRACE_SECONDS": "5",
    # Nobody reads the replicas' stdout here: a full pipe would stall them.
    "GATEWAY_ACCESS_LOG__ENABLED": "false",
}


def free_port() -> int:
    """A port the kernel says is free now (fixed for the test: restarts reuse it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Slot:
    """A replica's fixed ports, and the process serving them now."""

    name: str
    port: int
    admin_port: int
    replica: Replica | None = None

    @property
    def args(self) -> list[str]:
        return ["--listen", f"127.0.0.1:{self.port}", "--admin-listen",
                f"127.0.0.1:{self.admin_port}"]  # fmt: skip

    @property
    def backend(self) -> Backend:
        return Backend(self.name, "127.0.0.1", self.port, self.admin_port)


async def start_slot(slot: Slot, redis_url: str, *, pick_ports: bool) -> None:
    """Start ``slot``'s replica; on a port collision pick new ports (first start only)
    or try the same ones again (a restart: HAProxy knows these ports)."""
    for attempt in range(1, BIND_ATTEMPTS + 1):
        try:
            slot.replica = await start_replica(redis_url, env=REPLICA_ENV, args=slot.args)
            return
        except AssertionError:
            if attempt == BIND_ATTEMPTS:
                raise
            if pick_ports:
                slot.port, slot.admin_port = free_port(), free_port()
            else:
                await asyncio.sleep(0.2)


@dataclass
class Load:
    """Totals of the load generator."""

    ok: int = 0
    non_2xx: dict[int, int] = field(default_factory=dict)
    exceptions: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(self.non_2xx.values()) + sum(self.exceptions.values())

    @property
    def total(self) -> int:
        return self.ok + self.failed


async def generate_load(url: str, host: str, stop: asyncio.Event, load: Load) -> None:
    """CONCURRENCY keep-alive clients sending GETs until ``stop`` is set."""
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(index: int) -> None:
            sequence = 0
            while not stop.is_set():
                sequence += 1
                try:
                    async with session.get(
                        f"{url}/load/{index}/{sequence}", headers={"Host": host}
                    ) as response:
                        await response.read()
                        if 200 <= response.status < 300:
                            load.ok += 1
                        else:
                            load.non_2xx[response.status] = load.non_2xx.get(response.status, 0) + 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    name = type(exc).__name__
                    load.exceptions[name] = load.exceptions.get(name, 0) + 1

        await asyncio.gather(*(client(i) for i in range(CONCURRENCY)))


async def test_rolling_restart_behind_haproxy_loses_nothing(
    redis: aioredis.Redis, redis_url: str, upstream: Upstream
) -> None:
    """Each replica SIGTERMed and restarted in turn under load: 0 failed requests."""
    slots = [Slot(name, free_port(), free_port()) for name in SERVER_NAMES]
    proxy: HAProxy | None = None
    try:
        for slot in slots:
            await start_slot(slot, redis_url, pick_ports=True)
        host = await route_sandbox(redis_url, SANDBOX, upstream)
        for attempt in range(1, BIND_ATTEMPTS + 1):
            try:
                proxy = await HAProxy.start(free_port(), [s.backend for s in slots])
                break
            except RuntimeError:
                if attempt == BIND_ATTEMPTS:
                    raise
        assert proxy is not None
        running_proxy = proxy

        async def all_up() -> bool:
            states = await running_proxy.server_states()
            return [states[s.name].status if s.name in states else "" for s in slots] == [
                "UP", "UP"
            ]  # fmt: skip

        await wait_until(all_up, timeout=5, interval=0.05, what="both replicas UP in HAProxy")
        stop = asyncio.Event()
        load = Load()
        generator = asyncio.ensure_future(generate_load(proxy.url, host, stop, load))
        started = time.monotonic()
        timings: list[str] = []
        try:
            await wait_until(lambda: load.total >= 50, timeout=WARM_SECONDS + 5, what="load")
            await wait_until(lambda: time.monotonic() - started >= WARM_SECONDS, timeout=5)
            for _ in range(ROUNDS):
                for slot in slots:
                    timings.append(await _restart(slot, running_proxy, redis_url))
                    await wait_until(all_up, timeout=5, interval=0.05, what=f"{slot.name} UP")
            mark = time.monotonic()
            await wait_until(lambda: time.monotonic() - mark >= WARM_SECONDS, timeout=5)
        finally:
            stop.set()
            async with asyncio.timeout(15):
                await generator
        elapsed = time.monotonic() - started
        states = await proxy.server_states()
        print(
            f"rolling restart: {load.total} requests in {elapsed:.1f} s "
            f"({CONCURRENCY} concurrent, {ROUNDS * len(slots)} restarts), "
            f"{load.failed} failed (non-2xx {load.non_2xx}, exceptions {load.exceptions}); "
            f"haproxy retries {sum(s.retries for s in states.values())}, "
            f"redispatches {sum(s.redispatches for s in states.values())}; " + "; ".join(timings)
        )
        assert load.failed == 0, (load.non_2xx, load.exceptions)
        assert load.total >= 500
    finally:
        if proxy is not None:
            await proxy.stop()
        for slot in slots:
            if slot.replica is not None:
                with contextlib.suppress(Exception):
                    await slot.replica.process.stop()


async def _restart(slot: Slot, proxy: HAProxy, redis_url: str) -> str:
    """SIGTERM the slot's replica, check it leaves HAProxy and exits 0, start it again."""
    replica = slot.replica
    assert replica is not None
    signalled = time.monotonic()
    replica.signal()

    async def down() -> bool:
        return (await proxy.status_of(slot.name)).startswith("DOWN")

    await wait_until(down, timeout=DRAIN_DELAY_SECONDS, interval=0.02, what=f"{slot.name} DOWN")
    down_after = time.monotonic() - signalled
    assert await replica.exit_code(wait_seconds=10) == 0
    exited_after = time.monotonic() - signalled
    slot.replica = None
    await start_slot(slot, redis_url, pick_ports=False)
    return (
        f"{slot.name}: DOWN in HAProxy after {down_after * 1000:.0f} ms, "
        f"exited after {exited_after:.2f} s"
    )
