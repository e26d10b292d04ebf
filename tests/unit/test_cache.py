"""Unit tests for gateway.routing.cache with a fake reader and a fake clock (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from gateway import errors
from gateway.routing.cache import MISS, RouteCache
from gateway.routing.model import Sandbox, State

POSITIVE_TTL = 30.0
NEGATIVE_TTL = 1.0
STALE_BUDGET = 5.0


def _record(label: str = "abc123", gen: int = 1, address: str = "10.0.0.1") -> Sandbox:
    return Sandbox(
        id=label + "x", label=label, state=State.RUNNING, address=address,
        incarnation="inc", gen=gen,
    )  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeReader:
    """Answers from ``records`` as they were when the read began; can hold the answer
    back at a gate, or fail."""

    def __init__(self) -> None:
        self.records: dict[str, Sandbox | None] = {}
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.reading = asyncio.Event()
        self.failure: BaseException | None = None

    async def __call__(self, label: str) -> Sandbox | None:
        self.calls.append(label)
        answer = self.records.get(label)  # what Redis holds when the read happens
        self.reading.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return answer


def _cache(reader: FakeReader, clock: Clock, *, max_entries: int = 100) -> RouteCache:
    cache = RouteCache(
        reader,
        max_entries=max_entries,
        positive_ttl_seconds=POSITIVE_TTL,
        negative_ttl_seconds=NEGATIVE_TTL,
        stale_budget_seconds=STALE_BUDGET,
        clock=clock,
    )
    cache.set_subscribed(True)
    return cache


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reader() -> FakeReader:
    return FakeReader()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------------------
# Fresh entries, misses, TTLs
# ---------------------------------------------------------------------------------------


async def test_miss_then_fresh(reader: FakeReader, clock: Clock) -> None:
    cache = _cache(reader, clock)
    record = _record()
    reader.records["abc123"] = record
    assert cache.fresh("abc123") is MISS
    assert await cache.lookup("abc123") == record
    assert cache.fresh("abc123") == record
    assert await cache.lookup("abc123") == record
    assert reader.calls == ["abc123"]
    assert cache.stats.misses == 1
    assert cache.stats.hits >= 2


async def test_positive_entries_expire_after_their_ttl(reader: FakeReader, clock: Clock) -> None:
    cache = _cache(reader, clock)
    reader.records["abc123"] = _record()
    await cache.lookup("abc123")
    clock.now += POSITIVE_TTL - 0.01
    assert cache.fresh("abc123") is not MISS
    clock.now += 0.02
    assert cache.fresh("abc123") is MISS
    await cache.lookup("abc123")
    assert len(reader.calls) == 2


async def test_negative_entries_are_short(reader: FakeReader, clock: Clock) -> None:
    cache = _cache(reader, clock)
    assert await cache.lookup("nosuch") is None
    assert cache.fresh("nosuch") is None  # known absent
    clock.now += NEGATIVE_TTL + 0.01
    assert cache.fresh("nosuch") is MISS


async def test_while_unsubscribed_every_entry_gets_the_short_ttl(
    reader: FakeReader, clock: Clock
) -> None:
    cache = _cache(reader, clock)
    cache.set_subscribed(False)
    reader.records["abc123"] = _record()
    await cache.lookup("abc123")
    clock.now += NEGATIVE_TTL + 0.01
    assert cache.fresh("abc123") is MISS


async def test_an_invalidation_stales_older_entries_only(reader: FakeReader, clock: Clock) -> None:
    cache = _cache(reader, clock)
    reader.records["abc123"] = _record(gen=5)
    await cache.lookup("abc123")
    cache.invalidate("abc123", 5)  # the write we already read
    assert cache.fresh("abc123") is not MISS
    cache.invalidate("abc123", 6)
    assert cache.fresh("abc123") is MISS


async def test_an_invalidation_stales_a_negative_entry(reader: FakeReader, clock: Clock) -> None:
    """A cached "no such sandbox" gives way to the create at once."""
    cache = _cache(reader, clock)
    await cache.lookup("abc123")
    cache.invalidate("abc123", 1)
    assert cache.fresh("abc123") is MISS
    reader.records["abc123"] = _record()
    assert await cache.lookup("abc123") == reader.records["abc123"]


async def test_flush_stales_everything(reader: FakeReader, clock: Clock) -> None:
    cache = _cache(reader, clock)
    for label in ("aaaaaa", "bbbbbb"):
        reader.records[label] = _record(label)
        await cache.lookup(label)
    cache.flush()
    assert cache.fresh("aaaaaa") is MISS
    assert cache.fresh("bbbbbb") is MISS
    assert len(cache) == 2  # stale, kept for the stale budget


async def test_listeners_hear_invalidations_and_flushes(reader: FakeReader, clock: Clock) -> None:
    cache = _cache(reader, clock)
    heard: list[str | None] = []
    cache.listeners.append(heard.append)
    cache.invalidate("abc123", 3)
    cache.flush()
    assert heard == ["abc123", None]


# ---------------------------------------------------------------------------------------
# Single flight and races
# ---------------------------------------------------------------------------------------


async def test_concurrent_misses_make_one_read(reader: FakeReader, clock: Clock) -> None:
    cache = _cache(reader, clock)
    reader.records["abc123"] = _record()
    reader.gate = asyncio.Event()
    waiters = [asyncio.create_task(cache.lookup("abc123")) for _ in range(100)]
    await reader.reading.wait()
    reader.gate.set()
    results = await asyncio.gather(*waiters)
    assert all(result == reader.records["abc123"] for result in results)
    assert reader.calls == ["abc123"]


async def test_a_cancelled_waiter_does_not_cancel_the_read_for_the_others(
    reader: FakeReader, clock: Clock
) -> None:
    """The first caller's client goes away mid-read: the others still get the record."""
    cache = _cache(reader, clock)
    reader.records["abc123"] = _record()
    reader.gate = asyncio.Event()
    first = asyncio.create_task(cache.lookup("abc123"))
    await reader.reading.wait()
    others = [asyncio.create_task(cache.lookup("abc123")) for _ in range(3)]
    await _settle()
    first.cancel()
    await _settle()
    reader.gate.set()
    assert await asyncio.gather(*others) == [reader.records["abc123"]] * 3
    with pytest.raises(asyncio.CancelledError):
        await first
    assert reader.calls == ["abc123"]
    assert cache.fresh("abc123") == reader.records["abc123"]


async def test_an_invalidation_during_a_fill_drops_the_fill(
    reader: FakeReader, clock: Clock
) -> None:
    """Read old, then the invalidation, then the old record must not be stored; a lookup
    after the invalidation reads again instead of joining the old read."""
    cache = _cache(reader, clock)
    old, new = _record(gen=1), _record(gen=2, address="10.0.0.2")
    reader.records["abc123"] = old
    reader.gate = asyncio.Event()
    early = asyncio.create_task(cache.lookup("abc123"))
    await reader.reading.wait()
    cache.invalidate("abc123", 2)
    reader.records["abc123"] = new
    late = asyncio.create_task(cache.lookup("abc123"))
    await _settle()
    reader.gate.set()
    assert await early == old  # asked before the change
    assert await late == new
    assert reader.calls == ["abc123", "abc123"]
    assert cache.fresh("abc123") == new


async def test_a_fill_that_already_read_the_new_generation_is_kept(
    reader: FakeReader, clock: Clock
) -> None:
    cache = _cache(reader, clock)
    reader.records["abc123"] = _record(gen=7)
    reader.gate = asyncio.Event()
    task = asyncio.create_task(cache.lookup("abc123"))
    await reader.reading.wait()
    cache.invalidate("abc123", 7)
    reader.gate.set()
    await task
    assert cache.fresh("abc123") == reader.records["abc123"]


async def test_a_flush_during_a_fill_drops_the_fill(reader: FakeReader, clock: Clock) -> None:
    cache = _cache(reader, clock)
    reader.records["abc123"] = _record(gen=99)
    reader.gate = asyncio.Event()
    task = asyncio.create_task(cache.lookup("abc123"))
    await reader.reading.wait()
    cache.flush()
    reader.gate.set()
    assert await task == reader.records["abc123"]
    assert cache.fresh("abc123") is MISS


async def test_a_reader_bug_reaches_every_waiter_and_the_next_lookup_retries(
    reader: FakeReader, clock: Clock
) -> None:
    cache = _cache(reader, clock)
    reader.failure = ValueError("bug")
    reader.gate = asyncio.Event()
    waiters = [asyncio.create_task(cache.lookup("abc123")) for _ in range(3)]
    await reader.reading.wait()
    reader.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    reader.failure, reader.gate = None, None
    assert await cache.lookup("abc123") is None
    assert len(reader.calls) == 2


async def test_close_cancels_fills_in_flight(reader: FakeReader, clock: Clock) -> None:
    cache = _cache(reader, clock)
    reader.gate = asyncio.Event()
    waiter = asyncio.create_task(cache.lookup("abc123"))
    await reader.reading.wait()
    await cache.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter


# ---------------------------------------------------------------------------------------
# Store outages and the stale budget
# ---------------------------------------------------------------------------------------


async def test_stale_entries_are_served_within_the_budget_then_refused(
    reader: FakeReader, clock: Clock
) -> None:
    cache = _cache(reader, clock)
    record = _record()
    reader.records["abc123"] = record
    await cache.lookup("abc123")
    cache.set_subscribed(False)  # the watcher lost Redis: everything is stale
    reader.failure = errors.StoreUnavailable("down")
    assert await cache.lookup("abc123") == record
    assert cache.stats.stale_serves == 1
    clock.now += STALE_BUDGET - 0.1
    assert await cache.lookup("abc123") == record
    clock.now += 0.2
    with pytest.raises(errors.RouteStoreUnavailable):
        await cache.lookup("abc123")
    # Nothing cached at all: refused at once.
    with pytest.raises(errors.RouteStoreUnavailable):
        await cache.lookup("other1")
    assert cache.stats.store_errors >= 3


async def test_recovery_resets_the_budget(reader: FakeReader, clock: Clock) -> None:
    cache = _cache(reader, clock)
    record = _record()
    reader.records["abc123"] = record
    await cache.lookup("abc123")
    cache.flush()
    reader.failure = errors.StoreUnavailable("down")
    await cache.lookup("abc123")
    clock.now += STALE_BUDGET + 1
    with pytest.raises(errors.RouteStoreUnavailable):
        await cache.lookup("abc123")
    reader.failure = None  # Redis is back
    assert await cache.lookup("abc123") == record
    cache.flush()
    reader.failure = errors.StoreUnavailable("down again")
    assert await cache.lookup("abc123") == record  # a new outage, a new budget


# ---------------------------------------------------------------------------------------
# Size bound
# ---------------------------------------------------------------------------------------


async def test_size_is_bounded_oldest_fill_first(reader: FakeReader, clock: Clock) -> None:
    cache = _cache(reader, clock, max_entries=2)
    for label in ("aaaaaa", "bbbbbb", "cccccc"):
        reader.records[label] = _record(label)
        await cache.lookup(label)
    assert len(cache) == 2
    assert cache.fresh("aaaaaa") is MISS
    assert cache.fresh("bbbbbb") is not MISS
    assert cache.fresh("cccccc") is not MISS
    # A refill counts as new: b is now the oldest.
    cache.invalidate("aaaaaa", 99)
    reader.records["aaaaaa"] = _record("aaaaaa", gen=99)
    await cache.lookup("aaaaaa")
    assert cache.fresh("bbbbbb") is MISS
    assert len(cache) == 2
