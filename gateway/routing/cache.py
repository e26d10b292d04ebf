"""The in-process route cache in front of Redis.

Contract:
- A fresh entry answers without I/O (``fresh``). Entries are made stale, not deleted,
  by ``invalidate`` (one label) and ``flush`` (all), so that while Redis is unreachable
  the last known routes can still be served for ``stale_budget_seconds``.
- Misses and stale entries are refilled with one Redis read per label at a time
  (single-flight): a thousand requests for a cold label make one read.
- A fill that raced an invalidation (read the old record, then the invalidation came,
  then the old record would be stored) is not stored: an invalidation of a label whose
  fill is in flight detaches that fill (and a flush detaches every fill). A detached fill
  still answers the callers that were waiting for it (they asked before the change) but
  stores nothing, unless what it read is at least the invalidated generation; callers
  arriving after the invalidation start a fresh read instead of joining the old one.
- Positive entries live ``positive_ttl_seconds`` (a backstop; invalidations normally
  evict within milliseconds), negative ones ``negative_ttl_seconds``. While the
  invalidation subscription is down, every fill gets the shorter of the two.
- Size is bounded: past ``max_entries`` the oldest fills are dropped first.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway import errors
from gateway.routing.model import Sandbox

Reader = Callable[[str], Awaitable[Sandbox | None]]


class Miss:
    """The ``fresh`` answer for "no fresh entry: call ``lookup``"."""


MISS = Miss()
_NEVER = 2**63  # a generation no record reaches: the fill is never stored


@dataclass(slots=True)
class _Entry:
    record: Sandbox | None
    fresh_until: float
    epoch: int


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale_serves: int = 0
    store_errors: int = 0
    flushes: int = 0
    invalidations: int = 0


class RouteCache:
    """Bounded route cache; see the module docstring for the contract."""

    def __init__(
        self,
        reader: Reader,
        *,
        max_entries: int,
        positive_ttl_seconds: float,
        negative_ttl_seconds: float,
        stale_budget_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reader = reader
        self._max_entries = max_entries
        self._positive_ttl = positive_ttl_seconds
        self._negative_ttl = negative_ttl_seconds
        self._stale_budget = stale_budget_seconds
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[Sandbox | None]] = {}
        # Detached fills -> the generation their record must reach to be stored anyway.
        self._detached: dict[asyncio.Future[Sandbox | None], int] = {}
        self._fills: set[asyncio.Task[None]] = set()
        self._epoch = 0
        self._subscribed = False
        self._store_down_since: float | None = None
        self.stats = CacheStats()
        # Called with the label after an invalidation, with None after a flush (the
        # gateway uses this to end sessions whose route went away).
        self.listeners: list[Callable[[str | None], None]] = []

    # Public methods -------------------------------------------------------------------

    def fresh(self, label: str) -> Sandbox | Miss | None:
        """The fresh cached record of ``label`` (None: known absent), or ``MISS``."""
        entry = self._entries.get(label)
        if entry is not None and entry.epoch == self._epoch and entry.fresh_until > self._clock():
            self.stats.hits += 1
            return entry.record
        return MISS

    async def lookup(self, label: str) -> Sandbox | None:
        """The record of ``label``: fresh from cache, else read (once) from Redis.

        Raises:
            errors.RouteStoreUnavailable: Redis unreachable and no cached answer young
                enough to serve.
        """
        cached = self.fresh(label)
        if not isinstance(cached, Miss):
            return cached
        self.stats.misses += 1
        future = self._inflight.get(label)
        if future is None:
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            self._inflight[label] = future
            # The fill runs in a task of its own, not in this caller's: a caller whose
            # client goes away (its task cancelled) must not cancel the read that the
            # other callers for the label are waiting on.
            fill = loop.create_task(self._fill(label, future, self._epoch))
            self._fills.add(fill)
            fill.add_done_callback(self._fills.discard)
        try:
            # shield: one waiter leaving must not cancel the shared future.
            return await asyncio.shield(future)
        except errors.StoreUnavailable:
            return self._stale_or_raise(label)

    def invalidate(self, label: str, gen: int) -> None:
        """A writer changed ``label`` to generation ``gen``: never serve older from cache."""
        self.stats.invalidations += 1
        entry = self._entries.get(label)
        if entry is not None and (entry.record is None or entry.record.gen < gen):
            entry.fresh_until = 0.0
        future = self._inflight.pop(label, None)
        if future is not None:
            self._detached[future] = max(gen, self._detached.get(future, 0))
        for listener in self.listeners:
            listener(label)

    def flush(self) -> None:
        """Make every entry stale (after a lost or re-made subscription)."""
        self.stats.flushes += 1
        self._epoch += 1  # fills in flight see the epoch move and don't store
        for future in self._inflight.values():
            self._detached[future] = _NEVER
        self._inflight.clear()
        for listener in self.listeners:
            listener(None)

    def set_subscribed(self, subscribed: bool) -> None:
        """Tell the cache whether invalidations are being received; both changes flush."""
        self._subscribed = subscribed
        self.flush()

    async def close(self) -> None:
        """Cancel the fills in flight (at shutdown, so no task outlives the loop)."""
        fills = list(self._fills)
        for fill in fills:
            fill.cancel()
        for fill in fills:
            with contextlib.suppress(asyncio.CancelledError):
                await fill

    @property
    def subscribed(self) -> bool:
        return self._subscribed

    def __len__(self) -> int:
        return len(self._entries)

    # Private methods ------------------------------------------------------------------

    async def _fill(self, label: str, future: asyncio.Future[Sandbox | None], epoch: int) -> None:
        """Read ``label`` once and settle ``future``; store the record unless ``epoch``
        moved (a flush) or the fill was detached by an invalidation. Never raises."""
        try:
            record = await self._reader(label)
        except errors.StoreUnavailable as exc:
            self.stats.store_errors += 1
            if self._store_down_since is None:
                self._store_down_since = self._clock()
            self._settle(future, exc)
            return
        except asyncio.CancelledError:
            future.cancel()  # the loop is shutting down; waiters see a cancellation
            raise
        except Exception as exc:  # a bug in the reader: every waiter hears about it
            self._settle(future, exc)
            return
        finally:
            if self._inflight.get(label) is future:
                del self._inflight[label]
            needed = self._detached.pop(future, None)
        self._store_down_since = None
        if epoch == self._epoch and (
            needed is None or (record is not None and record.gen >= needed)
        ):
            self._store(label, record)
        future.set_result(record)

    @staticmethod
    def _settle(future: asyncio.Future[Sandbox | None], exc: BaseException) -> None:
        future.set_exception(exc)
        future.exception()  # retrieved: nobody may be left waiting (all clients gone)

    def _store(self, label: str, record: Sandbox | None) -> None:
        ttl = self._positive_ttl if record is not None else self._negative_ttl
        if not self._subscribed:
            ttl = min(ttl, self._negative_ttl)
        self._entries.pop(label, None)
        if len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[label] = _Entry(record, self._clock() + ttl, self._epoch)

    def _stale_or_raise(self, label: str) -> Sandbox | None:
        entry = self._entries.get(label)
        down_since = self._store_down_since
        in_budget = down_since is not None and self._clock() - down_since < self._stale_budget
        if entry is not None and in_budget:
            self.stats.stale_serves += 1
            return entry.record
        raise errors.RouteStoreUnavailable(
            "the route table is unreachable; try again in a few seconds"
        )
