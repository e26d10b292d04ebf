"""Concurrent writers on one label, against a real Redis: the compare-and-set holds.

Each race uses several clients (separate connections, as separate control-plane processes
would) and checks the outcome against the event stream, which carries every write's gen.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest_asyncio
import redis.asyncio as aioredis

from gateway import errors
from gateway.routing import schema, store
from gateway.routing.store import RouteWriter
from tests.integration.test_store import SETTINGS

CLIENTS = 5


@contextlib.asynccontextmanager
async def writers(redis_url: str, count: int) -> AsyncIterator[list[RouteWriter]]:
    """``count`` writers, each on its own client."""
    clients = [store.open_redis(redis_url) for _ in range(count)]
    try:
        yield [RouteWriter(client) for client in clients]
    finally:
        for client in clients:
            await client.aclose()


@pytest_asyncio.fixture
async def pool(redis_url: str, redis: aioredis.Redis) -> AsyncIterator[list[RouteWriter]]:
    """CLIENTS writers on an empty table with the test settings stored."""
    await store.write_settings(redis, SETTINGS)
    async with writers(redis_url, CLIENTS) as opened:
        yield opened


async def label_events(redis: aioredis.Redis, label: str) -> list[dict[str, object]]:
    """The label's events in gen order."""
    found = [e async for e in store.read_events(redis, follow=False) if e["label"] == label]
    return sorted(found, key=lambda e: int(str(e["gen"])))


def assert_dense(found: list[dict[str, object]]) -> None:
    """The gens are 1..n, each once: no write lost its event, none was counted twice."""
    gens = [int(str(e["gen"])) for e in found]
    assert gens == list(range(1, len(found) + 1)), gens


async def test_concurrent_creates_sharing_a_label_one_wins(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """20 concurrent creates of different ids, one label: exactly one wins, 19 get label_taken."""
    await store.write_settings(redis, SETTINGS)
    ids = [f"abc123{chr(ord('a') + i)}" for i in range(20)]
    async with writers(redis_url, len(ids)) as each:
        outcomes = await asyncio.gather(
            *(w.create(sid, address="127.0.0.2") for w, sid in zip(each, ids, strict=True)),
            return_exceptions=True,
        )
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    losers = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(o, errors.LifecycleConflict) for o in losers), losers
    assert {o.code for o in losers if isinstance(o, errors.LifecycleConflict)} == {"label_taken"}
    winner = winners[0]
    assert await redis.hget(schema.sandbox_key("abc123"), "id") == winner.id
    found = await label_events(redis, "abc123")
    assert [(e["type"], e["sandboxId"]) for e in found] == [("sandbox.created", winner.id)]
    assert_dense(found)


async def test_concurrent_expose_and_close_match_the_events(
    pool: list[RouteWriter], redis: aioredis.Redis
) -> None:
    """50 concurrent expose/close of random ports: final ports = events replayed in gen order."""
    await pool[0].create("abc123", address="127.0.0.2")
    rng = random.Random(20240601)
    ports = [3000, 3001, 3002, 3003, 3004]
    calls = []
    for i in range(50):
        writer, port = pool[i % len(pool)], rng.choice(ports)
        calls.append(
            writer.expose("abc123", port) if rng.random() < 0.6 else writer.close("abc123", port)
        )
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert not [o for o in outcomes if isinstance(o, BaseException)]

    found = await label_events(redis, "abc123")
    assert_dense(found)
    replayed: set[int] = set()
    for event in found[1:]:
        port = int(str(event["port"]))
        if event["type"] == "port.exposed":
            assert port not in replayed  # an event is only written for a change
            replayed.add(port)
        else:
            assert event["type"] == "port.closed" and port in replayed
            replayed.discard(port)
    record = await pool[0].show("abc123")
    assert set(record.ports) == replayed
    assert (
        record.gen
        == int(str(found[-1]["gen"]))
        == int(await redis.get(schema.gen_key("abc123")) or 0)
    )


async def test_pause_racing_exposes(pool: list[RouteWriter], redis: aioredis.Redis) -> None:
    """A pause among 30 exposes: each expose came before the pause (by gen) or got a conflict."""
    await pool[0].create("abc123", address="127.0.0.2")
    ports = list(range(4000, 4030))
    calls: list[Coroutine[Any, Any, object]] = [
        pool[i % len(pool)].expose("abc123", port) for i, port in enumerate(ports)
    ]
    calls.insert(len(calls) // 2, pool[0].pause("abc123"))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    pause_outcome = outcomes.pop(len(ports) // 2)
    assert not isinstance(pause_outcome, BaseException)

    found = await label_events(redis, "abc123")
    assert_dense(found)
    (pause_gen,) = [int(str(e["gen"])) for e in found if e["type"] == "sandbox.paused"]
    exposed_at = {
        int(str(e["port"])): int(str(e["gen"])) for e in found if e["type"] == "port.exposed"
    }
    for port, outcome in zip(ports, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, errors.LifecycleConflict), outcome
            assert outcome.code == "sandbox_paused"
            assert port not in exposed_at
        else:
            assert exposed_at[port] < pause_gen
    assert max(exposed_at.values(), default=0) < pause_gen == int(str(found[-1]["gen"]))
    record = await pool[0].show("abc123")
    assert set(record.ports) == set(exposed_at)


async def test_concurrent_pause_and_resume_end_consistent(
    pool: list[RouteWriter], redis: aioredis.Redis
) -> None:
    """Interleaved pauses and resumes leave the state of the last event, gens dense."""
    await pool[0].create("abc123", address="127.0.0.2")
    await pool[0].expose("abc123", 3000)
    calls = [
        pool[i % len(pool)].pause("abc123") if i % 2 else pool[i % len(pool)].resume("abc123")
        for i in range(20)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert not [o for o in outcomes if isinstance(o, BaseException)]
    found = await label_events(redis, "abc123")
    assert_dense(found)
    record = await pool[0].show("abc123")
    last = found[-1]["type"]
    assert record.state.value == {"sandbox.paused": "paused"}.get(str(last), "running")
    assert set(record.ports) == {3000}
