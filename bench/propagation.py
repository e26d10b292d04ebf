"""Measurement 5: route propagation to two gateway replicas on one Redis.

A second ``gateway serve`` joins the main one. A sandbox ``propbox1`` (label ``propbo``)
at the upstream's address gets the upstream port exposed and closed alternately, through
``gateway.routing.store.RouteWriter`` (the control plane's library), ``changes`` times.
After each write returns, both replicas are polled concurrently, each over one raw
keep-alive connection, until the answer flips: 200 once exposed, 404 with
``X-Gateway-Error: port_not_exposed`` once closed. The time from the writer returning
to the first answer showing the change is that replica's propagation time (its
resolution is one poll round trip, well under a millisecond here). A change not seen
within ``POLL_LIMIT_SECONDS`` counts as missed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from bench import stats
from bench.httpclient import HttpConnection, request_bytes
from bench.plan import Plan
from bench.report import Table, num
from bench.stack import DOMAIN, UPSTREAM_HOST, Gateway, Stack, start_replica
from gateway.routing import store

SANDBOX_ID = "propbox1"
LABEL = SANDBOX_ID[:6]
POLL_LIMIT_SECONDS = 5.0


@dataclass(slots=True)
class PropagationResult:
    changes: int
    per_replica_ms: dict[str, stats.Percentiles] = field(default_factory=dict)
    missed: dict[str, int] = field(default_factory=dict)
    resets: dict[str, int] = field(default_factory=dict)  # in-flight polls cut by enforcement
    polls_per_change: dict[str, float] = field(default_factory=dict)
    write_ms: stats.Percentiles | None = None


class Poller:
    """Polls one replica over one keep-alive connection, reconnecting after a reset.

    A reset is expected now and then: a request in flight to the port being closed is
    cut by the gateway's enforcement (it ends streams whose route went away).
    """

    def __init__(self, port: int, raw: bytes) -> None:
        self._port = port
        self._raw = raw
        self._conn: HttpConnection | None = None
        self.resets = 0

    async def until(self, exposed: bool, start: float) -> tuple[float, int]:
        """Seconds from ``start`` to the first answer in the wanted state, and polls made.

        Raises:
            TimeoutError: not seen within ``POLL_LIMIT_SECONDS``.
        """
        polls = 0
        while True:
            if self._conn is None or self._conn.broken:
                self._conn = await HttpConnection.open("127.0.0.1", self._port)
            try:
                response = await self._conn.request(self._raw)
            except ConnectionError:
                self.resets += 1
                response = None
            polls += 1
            now = time.perf_counter()
            if response is not None:
                error = response.headers.get(b"x-gateway-error")
                if exposed and response.status == 200:
                    return now - start, polls
                if not exposed and error == b"port_not_exposed":
                    return now - start, polls
            if now - start > POLL_LIMIT_SECONDS:
                raise TimeoutError(f"change not seen in {POLL_LIMIT_SECONDS} s")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


async def run_propagation(stack: Stack, plan: Plan) -> PropagationResult:
    replica = await start_replica(stack, "gateway-b")
    try:
        return await _measure(stack, [("replica A", stack.gateway), ("replica B", replica)], plan)
    finally:
        stack.group.stop(replica.proc)


async def _measure(
    stack: Stack, replicas: list[tuple[str, Gateway]], plan: Plan
) -> PropagationResult:
    port = stack.upstream_port
    raw = request_bytes("/", f"{port}-{LABEL}.{DOMAIN}")
    client = store.open_redis(stack.redis_url)
    pollers = [Poller(g.port, raw) for _, g in replicas]
    result = PropagationResult(plan.propagation_changes)
    times: dict[str, list[float]] = {name: [] for name, _ in replicas}
    polls: dict[str, list[int]] = {name: [] for name, _ in replicas}
    writes: list[float] = []
    try:
        writer = store.RouteWriter(client)
        await writer.create(SANDBOX_ID, address=UPSTREAM_HOST)
        await writer.expose(SANDBOX_ID, port)
        for poller in pollers:  # both replicas serve the route before the first change
            await poller.until(True, time.perf_counter())
        exposed = True
        for _ in range(plan.propagation_changes):
            began = time.perf_counter()
            if exposed:
                await writer.close(SANDBOX_ID, port)
            else:
                await writer.expose(SANDBOX_ID, port)
            exposed = not exposed
            returned = time.perf_counter()
            writes.append(returned - began)
            seen = await asyncio.gather(
                *(poller.until(exposed, returned) for poller in pollers),
                return_exceptions=True,
            )
            for (name, _), item in zip(replicas, seen, strict=True):
                if isinstance(item, BaseException):
                    result.missed[name] = result.missed.get(name, 0) + 1
                else:
                    times[name].append(item[0])
                    polls[name].append(item[1])
        await writer.terminate(SANDBOX_ID)
    finally:
        for poller in pollers:
            poller.close()
        await client.aclose()
    for (name, _), poller in zip(replicas, pollers, strict=True):
        result.resets[name] = poller.resets
    for name, values in times.items():
        result.per_replica_ms[name] = stats.summarize(values, scale=1000)
        result.polls_per_change[name] = stats.median([float(p) for p in polls[name]])
        result.missed.setdefault(name, 0)
    result.write_ms = stats.summarize(writes, scale=1000)
    return result


def propagation_table(result: PropagationResult) -> Table:
    table = Table(
        "5. Route propagation to two replicas (writer returned -> replica enforces), ms",
        ["replica", "changes seen", "missed", "p50", "p90", "p99", "max", "polls/change", "resets"],
    )
    for name, p in result.per_replica_ms.items():
        table.rows.append([
            name, str(p.count), str(result.missed[name]), num(p.p50, 2), num(p.p90, 2),
            num(p.p99, 2), num(p.max, 2), num(result.polls_per_change[name], 0),
            str(result.resets.get(name, 0)),
        ])  # fmt: skip
    write = result.write_ms
    table.notes += [
        f"{result.changes} changes, close and expose alternately, via RouteWriter "
        f"(write p50 {num(write.p50 if write else None, 2)} ms); each replica polled over "
        "one keep-alive connection until its answer flips (target p99 <= 100 ms, goal 50); "
        "resets: polls in flight when the close landed, cut by the gateway's enforcement "
        "(the poller reconnects and goes on).",
    ]
    return table
