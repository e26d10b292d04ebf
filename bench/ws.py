"""Measurements 4 and 7: WebSocket relay rate and round trip, and idle WebSocket memory.

The client is a raw asyncio protocol speaking RFC 6455 through ``bench.wsproto`` (binary
frames, masked, no extensions), so thousands of them cost the client little.

4. ``run_relay``: on one connection per target, ``window`` 64-byte messages in flight
   (a reply lets the next one go) for ``ws_seconds``: messages per second; then one in
   flight for ``ws_rtt_messages`` messages: round-trip p50/p99. Direct, nginx and the
   gateway, alternating.
7. ``run_idle``: on a fresh gateway process, ``idle_websockets`` connections opened in
   batches and held; (gateway RSS with them open - RSS before) / count. All are closed
   afterwards and the gateway's fd count is checked to come back down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import procs, stats, wsproto
from bench.load import rotated
from bench.plan import Plan
from bench.report import Table, num, times
from bench.stack import Stack, Target, start_replica

OnMessage = Callable[[wsproto.Frame], None]


class WsClient(asyncio.Protocol):
    """A client connection: handshake, then frames to ``on_message``."""

    def __init__(self, host_header: str) -> None:
        self.transport: asyncio.Transport | None = None
        self.open = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.on_message: OnMessage = lambda frame: None
        self._key = wsproto.new_key()
        self._host = host_header
        self._head = b""
        self._frames: wsproto.FrameParser | None = None

    @classmethod
    async def connect(cls, target: Target, *, time_limit: float = 10.0) -> WsClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(
            lambda: cls(target.host_header), target.host, target.port
        )
        async with asyncio.timeout(time_limit):
            await client.open
        return client

    def send(self, payloads: list[bytes]) -> None:
        """Send each payload as one masked binary frame, in a single write."""
        assert self.transport is not None
        self.transport.write(
            b"".join(wsproto.encode_frame(wsproto.OP_BINARY, p, mask=True) for p in payloads)
        )

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.write(
            f"GET /ws HTTP/1.1\r\nHost: {self._host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        if self._frames is None:
            self._head += data
            head, sep, rest = self._head.partition(b"\r\n\r\n")
            if not sep:
                return
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" " or wsproto.accept_key(self._key) not in head:
                self._set(self.open, ConnectionError(f"handshake refused: {status!r}"))
                self.abort()
                return
            self._frames = wsproto.FrameParser()
            self._set(self.open, None)
            data = rest
            if not data:
                return
        for frame in self._frames.feed(data):
            self.on_message(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._set(self.open, ConnectionError(f"closed during the handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    @staticmethod
    def _set(future: asyncio.Future[None], error: Exception | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


# ---------------------------------------------------------------------------------------
# 4. Relay rate and round trip
# ---------------------------------------------------------------------------------------


async def message_rate(target: Target, *, window: int, seconds: float, size: int) -> float:
    """Echoed messages per second with ``window`` in flight."""
    client = await WsClient.connect(target)
    payload = b"x" * size
    received = 0
    sending = True
    drained = asyncio.get_running_loop().create_future()
    in_flight = window

    def on_message(frame: wsproto.Frame) -> None:
        nonlocal received, in_flight
        received += 1
        if sending:
            client.send([payload])
        else:
            in_flight -= 1
            if in_flight == 0 and not drained.done():
                drained.set_result(None)

    client.on_message = on_message
    start = time.perf_counter()
    client.send([payload] * window)
    await asyncio.sleep(seconds)
    sending = False
    counted, elapsed = received, time.perf_counter() - start
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(drained, 10)
    client.abort()
    return counted / elapsed


async def round_trips(target: Target, *, count: int, size: int) -> list[float]:
    """Seconds per echo with one message in flight, ``count`` times."""
    client = await WsClient.connect(target)
    payload = b"y" * size
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def on_message(frame: wsproto.Frame) -> None:
        if not waiter.done():
            waiter.set_result(None)

    client.on_message = on_message
    samples = []
    for _ in range(count):
        waiter = loop.create_future()
        start = time.perf_counter()
        client.send([payload])
        await asyncio.wait_for(waiter, 10)
        samples.append(time.perf_counter() - start)
    client.abort()
    return samples


@dataclass(slots=True)
class RelayResult:
    message_bytes: int
    window: int
    msgs_per_s: dict[str, float] = field(default_factory=dict)
    vs_direct: dict[str, float] = field(default_factory=dict)
    rtt_ms: dict[str, stats.Percentiles] = field(default_factory=dict)
    runs: list[dict[str, float | str | int]] = field(default_factory=list)


async def run_relay(stack: Stack, plan: Plan) -> RelayResult:
    """Floating first (the headline), then pinned (see ``bench.stack``); rows per variant."""
    targets = stack.targets()
    result = RelayResult(plan.ws_message_bytes, plan.ws_window)
    size = plan.ws_message_bytes
    for target in targets:  # warm-up
        await message_rate(target, window=plan.ws_window, seconds=0.3, size=size)
    rates: dict[str, list[float]] = {}
    rtts: dict[str, list[float]] = {}
    direct_of: dict[str, str] = {}
    for suffix, pinned in stack.variants():
        stack.set_pinned(pinned)
        for target in targets:
            rates[target.name + suffix], rtts[target.name + suffix] = [], []
            direct_of[target.name + suffix] = "direct" + suffix
        for rnd in range(plan.rounds):
            for target in rotated(targets, rnd):
                row = target.name + suffix
                rate = await message_rate(target, window=plan.ws_window, seconds=plan.ws_seconds,
                                          size=size)  # fmt: skip
                rates[row].append(rate)
                result.runs.append({"target": row, "round": rnd, "msgs_per_s": rate})
                rtts[row] += await round_trips(
                    target, count=max(1, plan.ws_rtt_messages // plan.rounds), size=size
                )
    stack.set_pinned(False)
    for row, values in rates.items():
        result.msgs_per_s[row] = stats.median(values)
        result.rtt_ms[row] = stats.summarize(rtts[row], scale=1000)
    for row, rate in result.msgs_per_s.items():
        result.vs_direct[row] = stats.ratio(rate, result.msgs_per_s[direct_of[row]])
    return result


def relay_table(result: RelayResult, plan: Plan) -> Table:
    table = Table(
        f"4. WebSocket relay, {result.message_bytes}-byte binary messages",
        ["target", "msgs/s", "vs direct", "RTT p50 ms", "RTT p99 ms"],
    )
    for name, rate in result.msgs_per_s.items():
        rtt = result.rtt_ms[name]
        table.rows.append(
            [name, num(rate, 0), times(result.vs_direct[name]), num(rtt.p50, 3), num(rtt.p99, 3)]
        )
    table.notes.append(
        f"rate: {result.window} messages in flight on one connection for {plan.ws_seconds:g} s; "
        f"RTT: one in flight, {plan.ws_rtt_messages} messages; {plan.rounds} round(s) "
        "alternating (target: gateway >= 0.6x direct). Rows without a suffix: every process "
        "floating (the headline); (pinned): client + upstream on CPU 0, proxy on CPU 1."
    )
    return table


# ---------------------------------------------------------------------------------------
# 7. Idle WebSockets
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class IdleResult:
    requested: int
    opened: int = 0
    failed: int = 0
    open_seconds: float = 0.0
    gateway_fd_limit: int = 0
    gateway_rss_before_kib: int = 0
    gateway_rss_open_kib: int = 0
    kib_per_socket: float = float("nan")
    gateway_fds_before: int = 0
    gateway_fds_open: int = 0
    gateway_fds_after_close: int = 0


async def run_idle(stack: Stack, plan: Plan) -> IdleResult:
    """On a fresh gateway process; stopped again at the end."""
    gateway = await start_replica(stack, "gateway-idle")
    try:
        return await _hold(stack.gateway_target(gateway), gateway.pid, plan)
    finally:
        stack.group.stop(gateway.proc)


async def _hold(target: Target, pid: int, plan: Plan) -> IdleResult:
    result = IdleResult(plan.idle_websockets, gateway_fd_limit=procs.open_files_limit(pid))
    count = min(plan.idle_websockets, (result.gateway_fd_limit - 200) // 2)
    for client in [await WsClient.connect(target) for _ in range(20)]:  # warm-up
        client.abort()
    await asyncio.sleep(1.0)
    result.gateway_rss_before_kib = procs.rss_kib(pid)
    result.gateway_fds_before = procs.fd_count(pid)
    clients: list[WsClient] = []
    start = time.perf_counter()
    try:
        for offset in range(0, count, plan.idle_batch):
            batch = min(plan.idle_batch, count - offset)
            opened = await asyncio.gather(
                *(WsClient.connect(target, time_limit=30) for _ in range(batch)),
                return_exceptions=True,
            )
            for item in opened:
                if isinstance(item, WsClient):
                    clients.append(item)
                else:
                    result.failed += 1
        result.open_seconds = time.perf_counter() - start
        result.opened = len(clients)
        await asyncio.sleep(2.0)  # let the relays settle into their idle state
        result.gateway_rss_open_kib = procs.rss_kib(pid)
        result.gateway_fds_open = procs.fd_count(pid)
        if clients:
            delta = result.gateway_rss_open_kib - result.gateway_rss_before_kib
            result.kib_per_socket = delta / len(clients)
    finally:
        for client in clients:
            client.abort()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        result.gateway_fds_after_close = procs.fd_count(pid)
        if result.gateway_fds_after_close <= result.gateway_fds_before + 10:
            break
        await asyncio.sleep(0.2)
    return result


def idle_table(result: IdleResult) -> Table:
    table = Table(
        "7. Idle WebSockets held through one gateway process",
        ["sockets", "failed", "RSS before MiB", "RSS open MiB", "KiB per socket",
         "gateway fds open", "fds after close"],
    )  # fmt: skip
    table.rows.append([
        str(result.opened), str(result.failed), num(result.gateway_rss_before_kib / 1024, 1),
        num(result.gateway_rss_open_kib / 1024, 1), num(result.kib_per_socket, 1),
        str(result.gateway_fds_open), str(result.gateway_fds_after_close),
    ])  # fmt: skip
    table.notes.append(
        f"a fresh gateway process; opened in batches in {num(result.open_seconds, 1)} s, RSS "
        f"read 2 s after the last; each relayed socket holds 2 fds (gateway fd limit "
        f"{result.gateway_fd_limit}); target <= 32 KiB per socket at 8,000."
    )
    return table
