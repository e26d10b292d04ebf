"""gateway.routing.store against a real Redis: every rule of the route table's write side.

Bad input is checked with ``unchanged``: the whole keyspace (every key's type, value and
whether it expires) is the same before and after, and no invalidation was published.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway import errors
from gateway.routing import schema, store
from gateway.routing.model import State
from gateway.routing.store import RouteWriter
from tests.support.waiting import wait_until

SETTINGS = schema.TableSettings(
    label_length=6,
    url_template="https://{port}-{label}.box.runra.dev",
    sandbox_networks=("127.0.0.0/8", "::1/128", "fd00::/8"),
    quarantine_seconds=3600,
    events_max_length=1000,
    gateway_listeners=("127.0.0.1:8080", "0.0.0.0:8081"),
)
Keyspace = dict[str, tuple[str, Any, bool]]


async def keyspace(client: aioredis.Redis) -> Keyspace:
    """Every key with its type, its whole value, and whether it expires (str replies)."""
    result: Keyspace = {}
    async for key in client.scan_iter(count=1000):
        kind = await client.type(key)
        value: Any
        if kind == "hash":
            value = await client.hgetall(key)
        elif kind == "string":
            value = await client.get(key)
        elif kind == "stream":
            value = await client.xrange(key)
        else:
            raise AssertionError(f"unexpected {kind!r} key {key!r} in the route table")
        # The remaining TTL ticks down; whether the key expires is what a write changes.
        result[key] = (kind, value, await client.ttl(key) > 0)
    return result


@contextlib.asynccontextmanager
async def unchanged(client: aioredis.Redis) -> AsyncIterator[None]:
    """Assert the block changes no key and publishes no invalidation."""
    before = await keyspace(client)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(schema.INVALIDATION_CHANNEL)
        assert (await pubsub.get_message(timeout=1.0) or {}).get("type") == "subscribe"
        yield
        assert await keyspace(client) == before
        published = []
        # A running gateway's heartbeats share the channel; they are not writes.
        while message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05):
            if not str(message["data"]).startswith(schema.HEARTBEAT_PREFIX):
                published.append(message["data"])
        assert not published, f"invalidations were published: {published}"
    finally:
        await pubsub.aclose()


@contextlib.asynccontextmanager
async def open_writer(
    redis_url: str, client: aioredis.Redis, settings: schema.TableSettings = SETTINGS
) -> AsyncIterator[RouteWriter]:
    """A writer on ``redis_url`` after storing ``settings`` (``client`` is the test's)."""
    await store.write_settings(client, settings)
    connection = store.open_redis(redis_url)
    try:
        yield RouteWriter(connection)
    finally:
        await connection.aclose()


@pytest_asyncio.fixture
async def writer(redis_url: str, redis: aioredis.Redis) -> AsyncIterator[RouteWriter]:
    """A writer on an empty table with SETTINGS stored."""
    async with open_writer(redis_url, redis) as opened:
        yield opened


async def events(client: aioredis.Redis) -> list[dict[str, object]]:
    """The whole event stream, decoded the way the CLI prints it."""
    return [event async for event in store.read_events(client, follow=False)]


async def gen_of(client: aioredis.Redis, label: str) -> int:
    return int(await client.get(schema.gen_key(label)) or 0)


# ---------------------------------------------------------------------------------------
# Bad input changes nothing
# ---------------------------------------------------------------------------------------


async def _populate(writer: RouteWriter) -> None:
    await writer.create("abc123", address="127.0.0.2")
    await writer.expose("abc123", 3000)
    await writer.create("pol123", address="127.0.0.3", allow_ports=[3000])
    await writer.create("loop12", address="127.0.0.1")
    await writer.create("pau123", address="127.0.0.4")
    await writer.expose("pau123", 3000)
    await writer.pause("pau123")
    await writer.create("dead00", address="127.0.0.5")
    await writer.terminate("dead00")


Call = Callable[[RouteWriter], Awaitable[object]]
BAD_INPUT: list[Any] = [
    # (call, error class, code, words the message must contain)
    (lambda w: w.expose("abc123", 80), errors.RuleViolation, "reserved_port", "port 80 is"),
    (lambda w: w.expose("abc123", 0), errors.RuleViolation, "reserved_port", "port 0 is reserved"),
    (lambda w: w.expose("abc123", -1), errors.RuleViolation, "invalid_port", "port -1 is invalid"),
    (lambda w: w.expose("abc123", 65536), errors.RuleViolation, "invalid_port", "port 65536"),
    (lambda w: w.expose("abc123", "abc"), errors.RuleViolation, "invalid_port", "'abc'"),
    (lambda w: w.expose("abc123", "03000"), errors.RuleViolation, "invalid_port", "leading zero"),
    (lambda w: w.close("abc123", 80), errors.RuleViolation, "reserved_port", "port 80"),
    (lambda w: w.expose("ABC123", 3000), errors.RuleViolation, "invalid_id", "'ABC123'"),
    (lambda w: w.create("abc.123", address="127.0.0.9"), errors.RuleViolation, "invalid_id",
     "'abc.123'"),
    (lambda w: w.create("Abc999", address="127.0.0.9"), errors.RuleViolation, "invalid_id",
     "lowercase"),
    (lambda w: w.create("x" * 65, address="127.0.0.9"), errors.RuleViolation, "invalid_id",
     "longer than 64"),
    (lambda w: w.create("new123", address="10.0.0.1"), errors.RuleViolation,
     "address_not_allowed", "10.0.0.1 is outside the sandbox networks"),
    (lambda w: w.create("new123", address="169.254.169.254"), errors.RuleViolation,
     "address_not_allowed", "169.254.169.254"),
    (lambda w: w.create("new123", address="sandbox.local"), errors.RuleViolation,
     "invalid_address", "'sandbox.local' is not an IPv4 or IPv6 literal"),
    (lambda w: w.create("new123", address="0.0.0.0"), errors.RuleViolation,
     "address_not_allowed", "0.0.0.0"),
    (lambda w: w.create("new123", address="127.0.0.9", allow_ports="3000,80"),
     errors.RuleViolation, "reserved_port", "port 80"),
    (lambda w: w.resume("abc123", address="10.9.9.9"), errors.RuleViolation,
     "address_not_allowed", "10.9.9.9"),
    (lambda w: w.resume("pau123", address="not-an-ip"), errors.RuleViolation,
     "invalid_address", "'not-an-ip'"),
    (lambda w: w.expose("pol123", 4000), errors.RuleViolation, "port_not_allowed",
     "port 4000 is not in allowPorts"),
    (lambda w: w.expose("loop12", 8080), errors.RuleViolation, "address_not_allowed",
     "127.0.0.1:8080 is one of the gateway's own listeners"),
    (lambda w: w.expose("loop12", 8081), errors.RuleViolation, "address_not_allowed",
     "127.0.0.1:8081"),
    (lambda w: w.create("abc123zz", address="127.0.0.9"), errors.LifecycleConflict,
     "label_taken", "label 'abc123' of sandbox 'abc123zz' is held by live sandbox 'abc123'"),
    (lambda w: w.create("pau123zz", address="127.0.0.9"), errors.LifecycleConflict,
     "label_taken", "'pau123'"),
    (lambda w: w.create("dead00zz", address="127.0.0.9"), errors.LifecycleConflict,
     "label_quarantined", "label 'dead00' is quarantined"),
    (lambda w: w.create("dead00", address="127.0.0.9"), errors.LifecycleConflict,
     "label_quarantined", "label 'dead00' is quarantined"),
    (lambda w: w.create("abc123", address="127.0.0.9"), errors.LifecycleConflict,
     "sandbox_exists", "sandbox 'abc123' already exists"),
    (lambda w: w.expose("pau123", 3001), errors.LifecycleConflict, "sandbox_paused",
     "cannot expose sandbox 'pau123': it is paused"),
    (lambda w: w.expose("dead00", 3001), errors.LifecycleConflict, "sandbox_terminated",
     "it is terminated"),
    (lambda w: w.expose("nosuch", 3000), errors.UnknownSandbox, "sandbox_not_found",
     "no sandbox with id 'nosuch'"),
    (lambda w: w.expose("abc123other", 3000), errors.UnknownSandbox, "sandbox_not_found",
     "'abc123other'"),
    (lambda w: w.close("nosuch", 3000), errors.UnknownSandbox, "sandbox_not_found", "'nosuch'"),
    (lambda w: w.pause("nosuch"), errors.UnknownSandbox, "sandbox_not_found", "'nosuch'"),
    (lambda w: w.resume("nosuch"), errors.UnknownSandbox, "sandbox_not_found", "'nosuch'"),
    (lambda w: w.terminate("nosuch"), errors.UnknownSandbox, "sandbox_not_found", "'nosuch'"),
    (lambda w: w.show("nosuch"), errors.UnknownSandbox, "sandbox_not_found", "'nosuch'"),
    (lambda w: w.list_ports("nosuch"), errors.UnknownSandbox, "sandbox_not_found", "'nosuch'"),
]  # fmt: skip
BAD_INPUT_IDS = [
    "port-80", "port-0", "port-minus-1", "port-65536", "port-abc", "port-03000", "close-80",
    "id-uppercase", "id-dots", "id-mixed-case", "id-too-long", "address-outside",
    "address-metadata", "address-not-ip", "address-unspecified", "allow-ports-80",
    "resume-address-outside", "resume-address-not-ip", "port-not-allowed", "listener-loop",
    "listener-loop-wildcard", "label-taken", "label-taken-by-paused", "label-quarantined",
    "same-id-quarantined", "sandbox-exists", "expose-paused", "expose-terminated",
    "unknown-expose", "unknown-other-id-same-label", "unknown-close", "unknown-pause",
    "unknown-resume", "unknown-terminate", "unknown-show", "unknown-list",
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "expected"),
    [(call, error, (code, words)) for call, error, code, words in BAD_INPUT],
    ids=BAD_INPUT_IDS,
)
async def test_bad_input_is_refused_and_changes_nothing(
    writer: RouteWriter,
    redis: aioredis.Redis,
    call: Call,
    error: type[errors.ControlError],
    expected: tuple[str, str],
) -> None:
    """Each bad input raises its error with a code and message naming it; Redis is as it was."""
    await _populate(writer)
    async with unchanged(redis):
        with pytest.raises(error) as caught:
            await call(writer)
    code, words = expected
    assert caught.value.code == code
    assert words in caught.value.message


async def test_resume_to_an_address_that_loops_is_refused(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """A resume whose new address would point an exposed port at a listener changes nothing."""
    await writer.create("abc123", address="127.0.0.2")
    await writer.expose("abc123", 8080)
    async with unchanged(redis):
        with pytest.raises(errors.RuleViolation, match=r"127\.0\.0\.1:8080") as caught:
            await writer.resume("abc123", address="127.0.0.1")
    assert caught.value.code == "address_not_allowed"


@pytest.mark.parametrize(
    "call",
    [
        lambda w: w.create("new123", address="127.0.0.9"),
        lambda w: w.expose("abc123", 3001),
        lambda w: w.close("abc123", 3000),
        lambda w: w.pause("abc123"),
        lambda w: w.resume("abc123"),
        lambda w: w.terminate("abc123"),
        lambda w: w.show("abc123"),
        lambda w: w.list_ports("abc123"),
    ],
    ids=["create", "expose", "close", "pause", "resume", "terminate", "show", "list"],
)
async def test_schema_mismatch_refuses_every_operation(
    writer: RouteWriter, redis: aioredis.Redis, call: Call
) -> None:
    """Another schema_version in gw:meta: every operation raises SchemaMismatch, changes nothing."""
    await writer.create("abc123", address="127.0.0.2")
    await writer.expose("abc123", 3000)
    await redis.hset(schema.META_KEY, "schema_version", str(schema.SCHEMA_VERSION + 1))
    async with unchanged(redis):
        with pytest.raises(errors.SchemaMismatch) as caught:
            await call(writer)
    assert caught.value.code == "schema_mismatch"
    assert f"schema version {schema.SCHEMA_VERSION + 1}" in caught.value.message
    assert f"speaks version {schema.SCHEMA_VERSION}" in caught.value.message


async def test_meta_of_a_future_version_is_a_mismatch_not_corrupt(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """A newer version's meta (other fields) is refused by its version, not as unreadable."""
    await redis.delete(schema.META_KEY)
    await redis.hset(schema.META_KEY, mapping={"schema_version": "2", "label_chars": "8"})
    async with unchanged(redis):
        with pytest.raises(errors.SchemaMismatch, match="schema version 2; this gateway speaks"):
            await writer.create("abc123", address="127.0.0.2")


async def test_corrupt_meta_is_a_schema_mismatch(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """An unreadable meta hash is refused like a mismatch, naming gw:meta."""
    await redis.hset(schema.META_KEY, "sandbox_networks", "not json")
    async with unchanged(redis):
        with pytest.raises(errors.SchemaMismatch, match="gw:meta"):
            await writer.create("abc123", address="127.0.0.2")


async def test_no_meta_is_table_not_initialised(redis_url: str, redis: aioredis.Redis) -> None:
    """Without gw:meta a write raises TableNotInitialised (start serve first) and writes nothing."""
    client = store.open_redis(redis_url)
    try:
        async with unchanged(redis):
            with pytest.raises(errors.TableNotInitialised, match="gateway serve") as caught:
                await RouteWriter(client).create("abc123", address="127.0.0.2")
    finally:
        await client.aclose()
    assert caught.value.status == 503
    assert await redis.dbsize() == 0


async def test_corrupt_record_is_store_unavailable_and_untouched(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """A record another writer broke is never overwritten: StoreUnavailable naming the label."""
    await redis.hset(schema.sandbox_key("abc123"), mapping={"id": "abc123", "state": "weird"})
    async with unchanged(redis):
        with pytest.raises(errors.StoreUnavailable, match="'abc123'"):
            await writer.expose("abc123", 3000)
        with pytest.raises(errors.StoreUnavailable, match="'abc123'"):
            await store.RouteReader(redis, timeout_seconds=1.0).get("abc123")


# ---------------------------------------------------------------------------------------
# The lifecycle table, operation by operation, against Redis
# ---------------------------------------------------------------------------------------

# DESIGN.md section 2 again, literally: (operation, state) -> outcome.
LIFECYCLE = {
    ("create", "running"): "conflict", ("create", "paused"): "conflict",
    ("create", "terminated"): "conflict", ("create", "unknown"): "ok",
    ("expose", "running"): "ok", ("expose", "paused"): "conflict",
    ("expose", "terminated"): "conflict", ("expose", "unknown"): "not found",
    ("close", "running"): "ok", ("close", "paused"): "ok",
    ("close", "terminated"): "conflict", ("close", "unknown"): "not found",
    ("list", "running"): "ok", ("list", "paused"): "ok",
    ("list", "terminated"): "conflict", ("list", "unknown"): "not found",
    ("pause", "running"): "ok", ("pause", "paused"): "no-op",
    ("pause", "terminated"): "conflict", ("pause", "unknown"): "not found",
    ("resume", "running"): "no-op", ("resume", "paused"): "ok",
    ("resume", "terminated"): "conflict", ("resume", "unknown"): "not found",
    ("terminate", "running"): "ok", ("terminate", "paused"): "ok",
    ("terminate", "terminated"): "no-op", ("terminate", "unknown"): "not found",
}  # fmt: skip
OPERATIONS: dict[str, Call] = {
    "create": lambda w: w.create("abc123", address="127.0.0.3"),
    "expose": lambda w: w.expose("abc123", 3001),
    "close": lambda w: w.close("abc123", 3000),
    "list": lambda w: w.list_ports("abc123"),
    "pause": lambda w: w.pause("abc123"),
    "resume": lambda w: w.resume("abc123"),
    "terminate": lambda w: w.terminate("abc123"),
}
# What a successful operation leaves behind: (state, exposed ports).
AFTER_OK = {
    ("create", "unknown"): (State.RUNNING, set()),
    ("expose", "running"): (State.RUNNING, {3000, 3001}),
    ("close", "running"): (State.RUNNING, set()),
    ("close", "paused"): (State.PAUSED, set()),
    ("list", "running"): (State.RUNNING, {3000}),
    ("list", "paused"): (State.PAUSED, {3000}),
    ("pause", "running"): (State.PAUSED, {3000}),
    ("resume", "paused"): (State.RUNNING, {3000}),
    ("terminate", "running"): (State.TERMINATED, set()),
    ("terminate", "paused"): (State.TERMINATED, set()),
}


async def _put_in_state(writer: RouteWriter, state: str) -> None:
    if state == "unknown":
        return
    await writer.create("abc123", address="127.0.0.2")
    await writer.expose("abc123", 3000)
    if state == "paused":
        await writer.pause("abc123")
    elif state == "terminated":
        await writer.terminate("abc123")


@pytest.mark.parametrize(("op", "state"), list(LIFECYCLE), ids=[f"{o}-{s}" for o, s in LIFECYCLE])
async def test_operation_follows_the_lifecycle_table(
    writer: RouteWriter, redis: aioredis.Redis, op: str, state: str
) -> None:
    """Each operation in each state does what DESIGN.md's table says; refusals change nothing."""
    await _put_in_state(writer, state)
    outcome = LIFECYCLE[(op, state)]
    if outcome in ("conflict", "not found", "no-op"):
        expected = {"conflict": errors.LifecycleConflict, "not found": errors.UnknownSandbox}
        async with unchanged(redis):
            if outcome == "no-op":
                await OPERATIONS[op](writer)
            else:
                with pytest.raises(expected[outcome]):
                    await OPERATIONS[op](writer)
        return
    gen_before = await gen_of(redis, "abc123")
    await OPERATIONS[op](writer)
    record = await store.RouteReader(redis, timeout_seconds=1.0).get("abc123")
    assert record is not None
    want_state, want_ports = AFTER_OK[(op, state)]
    assert (record.state, set(record.ports)) == (want_state, want_ports)
    if op != "list":
        assert record.gen == gen_before + 1


# ---------------------------------------------------------------------------------------
# Create, expose, list, close
# ---------------------------------------------------------------------------------------


async def test_create_stores_the_documented_hash(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """create writes gw:{label}:sandbox with the documented fields and gw:{label}:gen = 1."""
    record = await writer.create(
        "abc123xyz", address="127.0.0.2", allow_ports="3000,5173", limits={"connections": 5}
    )
    raw = await redis.hgetall("gw:{abc123}:sandbox")
    assert raw.keys() == {
        "id", "label", "state", "address", "incarnation", "gen", "created_at", "updated_at",
        "allow_ports", "limits",
    }  # fmt: skip
    assert (raw["id"], raw["label"], raw["state"], raw["address"]) == (
        "abc123xyz", "abc123", "running", "127.0.0.2",
    )  # fmt: skip
    assert raw["allow_ports"] == "3000,5173"
    assert raw["limits"] == '{"connections": 5}'
    assert re.fullmatch(r"[0-9a-f]{16}", str(raw["incarnation"]))
    assert raw["gen"] == "1" and await redis.get("gw:{abc123}:gen") == "1"
    assert await redis.ttl("gw:{abc123}:sandbox") == -1
    assert record.gen == 1 and record.limits == {"connections": 5}


async def test_expose_returns_port_url_sandbox_id(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """expose answers {port, url, sandboxId} with the URL from the stored template."""
    await writer.create("abc123xyz", address="127.0.0.2")
    exposure, created = await writer.expose("abc123xyz", "3000")
    assert created is True
    assert exposure.as_json() == {
        "port": 3000,
        "url": "https://3000-abc123.box.runra.dev",
        "sandboxId": "abc123xyz",
    }
    assert await redis.hget("gw:{abc123}:sandbox", "port:3000") == "{}"


async def test_url_follows_the_template_stored_in_redis(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """The URL comes from gw:meta's url_template, whatever the writer's own defaults are."""
    local = dataclasses.replace(SETTINGS, url_template="http://{port}-{label}.box.localhost:8080")
    async with open_writer(redis_url, redis, local) as writer:
        await writer.create("abc123", address="127.0.0.2")
        exposure, _ = await writer.expose("abc123", 5173)
    assert exposure.url == "http://5173-abc123.box.localhost:8080"


async def test_expose_is_idempotent(writer: RouteWriter, redis: aioredis.Redis) -> None:
    """A second expose of the same port says created=False and writes nothing, no event."""
    await writer.create("abc123", address="127.0.0.2")
    first, created_first = await writer.expose("abc123", 3000)
    async with unchanged(redis):
        again, created_again = await writer.expose("abc123", 3000)
    assert (created_first, created_again) == (True, False)
    assert again == first
    assert [e["type"] for e in await events(redis)] == ["sandbox.created", "port.exposed"]


async def test_expose_with_other_options_updates_them(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """Re-exposing with hostRewrite changes the options (not a first expose) and emits an event."""
    await writer.create("abc123", address="127.0.0.2")
    await writer.expose("abc123", 3000)
    _, created = await writer.expose("abc123", 3000, host_rewrite=True)
    assert created is False
    assert await redis.hget("gw:{abc123}:sandbox", "port:3000") == '{"hostRewrite":true}'
    assert [e["type"] for e in await events(redis)][-1] == "port.exposed"


async def test_expose_keeps_options_of_newer_writers(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """Unknown per-port options (from a newer writer) survive a re-expose and other writes."""
    await writer.create("abc123", address="127.0.0.2")
    await writer.expose("abc123", 3000)
    await redis.hset("gw:{abc123}:sandbox", "port:3000", '{"visibility":"private"}')
    await writer.expose("abc123", 3000, host_rewrite=True)
    await writer.pause("abc123")
    await writer.resume("abc123")
    assert (
        await redis.hget("gw:{abc123}:sandbox", "port:3000")
        == '{"hostRewrite":true,"visibility":"private"}'
    )


async def test_ipv6_address_does_not_change_urls(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """A sandbox on an IPv6 address gets the same URLs; the address is stored canonically."""
    record = await writer.create("abc123", address="FD00:0:0::5")
    exposure, _ = await writer.expose("abc123", 3000)
    assert record.address == "fd00::5"
    assert exposure.url == "https://3000-abc123.box.runra.dev"
    assert await redis.hget("gw:{abc123}:sandbox", "address") == "fd00::5"


async def test_list_ports_sorted_with_urls(writer: RouteWriter) -> None:
    """list gives every exposed port as {port, url, sandboxId}, in port order."""
    await writer.create("abc123", address="127.0.0.2")
    for port in (5173, 3000, 8000):
        await writer.expose("abc123", port)
    assert [e.as_json() for e in await writer.list_ports("abc123")] == [
        {"port": p, "url": f"https://{p}-abc123.box.runra.dev", "sandboxId": "abc123"}
        for p in (3000, 5173, 8000)
    ]


async def test_close_removes_and_is_idempotent(writer: RouteWriter, redis: aioredis.Redis) -> None:
    """close drops the port field; closing it again changes nothing and emits nothing."""
    await writer.create("abc123", address="127.0.0.2")
    await writer.expose("abc123", 3000)
    record = await writer.close("abc123", 3000)
    assert record.ports == {}
    assert await redis.hexists("gw:{abc123}:sandbox", "port:3000") == 0
    async with unchanged(redis):
        await writer.close("abc123", 3000)
        await writer.close("abc123", 4000)
    assert [e["type"] for e in await events(redis)][-1] == "port.closed"


async def test_allow_ports_policy(writer: RouteWriter) -> None:
    """With allowPorts only those ports may be exposed."""
    await writer.create("abc123", address="127.0.0.2", allow_ports=[3000, 5173])
    assert (await writer.expose("abc123", 5173))[1] is True
    with pytest.raises(errors.RuleViolation, match="allowPorts"):
        await writer.expose("abc123", 8000)


# ---------------------------------------------------------------------------------------
# Pause, resume, terminate, generations
# ---------------------------------------------------------------------------------------


async def test_pause_then_resume_keeps_ports_and_urls(writer: RouteWriter) -> None:
    """After pause and resume the same ports have the same URLs; the incarnation is new."""
    created = await writer.create("abc123", address="127.0.0.2")
    await writer.expose("abc123", 3000)
    await writer.expose("abc123", 5173)
    before = await writer.list_ports("abc123")
    paused = await writer.pause("abc123")
    assert paused.state is State.PAUSED
    assert await writer.list_ports("abc123") == before
    resumed = await writer.resume("abc123")
    assert resumed.state is State.RUNNING
    assert await writer.list_ports("abc123") == before
    assert resumed.address == created.address
    assert resumed.incarnation != created.incarnation


async def test_resume_with_a_new_address(writer: RouteWriter, redis: aioredis.Redis) -> None:
    """resume --address moves the sandbox: new address and incarnation, same ports, higher gen."""
    created = await writer.create("abc123", address="127.0.0.2")
    await writer.expose("abc123", 3000)
    await writer.pause("abc123")
    moved = await writer.resume("abc123", address="::1")
    assert (moved.address, moved.state, set(moved.ports)) == ("::1", State.RUNNING, {3000})
    assert moved.incarnation != created.incarnation
    again = await writer.resume("abc123", address="127.0.0.7")  # running: an address change
    assert again.address == "127.0.0.7"
    assert again.incarnation not in (created.incarnation, moved.incarnation)
    assert created.gen < moved.gen < again.gen == await gen_of(redis, "abc123")


async def test_resume_running_same_address_is_a_noop(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """resume of a running sandbox at the same address changes nothing."""
    await writer.create("abc123", address="127.0.0.2")
    async with unchanged(redis):
        await writer.resume("abc123")
        await writer.resume("abc123", address="127.0.0.2")


async def test_terminate_leaves_a_tombstone_with_the_quarantine_ttl(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """terminate keeps only id and label, expiring after quarantine_seconds; gen stays."""
    await writer.create("abc123", address="127.0.0.2", allow_ports=[3000])
    await writer.expose("abc123", 3000)
    tombstone = await writer.terminate("abc123")
    raw = await redis.hgetall("gw:{abc123}:sandbox")
    assert raw.keys() == {
        "id", "label", "state", "address", "incarnation", "gen", "created_at", "updated_at"
    }  # fmt: skip
    assert (raw["state"], raw["address"], raw["incarnation"]) == ("terminated", "", "")
    ttl = await redis.ttl("gw:{abc123}:sandbox")
    assert SETTINGS.quarantine_seconds - 5 <= ttl <= SETTINGS.quarantine_seconds
    assert await redis.ttl("gw:{abc123}:gen") == -1
    assert tombstone.state is State.TERMINATED
    assert (await writer.show("abc123")).state is State.TERMINATED
    async with unchanged(redis):
        await writer.terminate("abc123")


async def test_gen_increases_on_every_write_and_survives_terminate(
    redis_url: str, redis: aioredis.Redis
) -> None:
    """gen goes up by one per write; after the tombstone expires, a new create continues it."""
    quick = dataclasses.replace(SETTINGS, quarantine_seconds=1)
    async with open_writer(redis_url, redis, quick) as writer:
        gens = [(await writer.create("abc123", address="127.0.0.2")).gen]
        gens.append((await writer.show("abc123")).gen)  # a read: no new generation
        await writer.expose("abc123", 3000)
        gens.append(await gen_of(redis, "abc123"))
        gens.append((await writer.close("abc123", 3000)).gen)
        gens.append((await writer.pause("abc123")).gen)
        gens.append((await writer.resume("abc123")).gen)
        gens.append((await writer.terminate("abc123")).gen)
        assert gens == [1, 1, 2, 3, 4, 5, 6]
        with pytest.raises(errors.LifecycleConflict, match="quarantined"):
            await writer.create("abc123new", address="127.0.0.3")

        async def tombstone_gone() -> bool:
            return not await redis.exists("gw:{abc123}:sandbox")

        await wait_until(tombstone_gone, timeout=5.0, what="the tombstone to expire")
        reborn = await writer.create("abc123new", address="127.0.0.3")
    assert reborn.gen == 7
    assert [e["gen"] for e in await events(redis)] == [1, 2, 3, 4, 5, 6, 7]


# ---------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------


async def test_one_event_per_change_with_its_fields(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """Every change appends one event with type, sandboxId, label, port, url, gen, time."""
    await writer.create("abc123xyz", address="127.0.0.2")
    await writer.expose("abc123xyz", 3000)
    await writer.expose("abc123xyz", 5173)
    await writer.expose("abc123xyz", 3000)  # no change, no event
    await writer.close("abc123xyz", 5173)
    await writer.pause("abc123xyz")
    await writer.pause("abc123xyz")  # no change, no event
    await writer.resume("abc123xyz")
    await writer.terminate("abc123xyz")
    found = await events(redis)
    url = "https://{}-abc123.box.runra.dev"
    assert [
        (e["type"], e.get("port"), e.get("url"), e["gen"]) for e in found
    ] == [
        ("sandbox.created", None, None, 1),
        ("port.exposed", 3000, url.format(3000), 2),
        ("port.exposed", 5173, url.format(5173), 3),
        ("port.closed", 5173, url.format(5173), 4),
        ("sandbox.paused", None, None, 5),  # one event for the sandbox, not one per port
        ("sandbox.resumed", None, None, 6),
        ("sandbox.terminated", None, None, 7),
    ]  # fmt: skip
    for event in found:
        assert (event["sandboxId"], event["label"]) == ("abc123xyz", "abc123")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(event["time"]))
        assert re.fullmatch(r"\d+-\d+", str(event["id"]))


async def test_event_stream_is_bounded(redis_url: str, redis: aioredis.Redis) -> None:
    """XADD trims with MAXLEN ~ events_max_length (whole stream nodes, so roughly)."""
    small = dataclasses.replace(SETTINGS, events_max_length=10)
    async with open_writer(redis_url, redis, small) as writer:
        await writer.create("abc123", address="127.0.0.2")
        for _ in range(150):
            await writer.expose("abc123", 3000)
            await writer.close("abc123", 3000)
    length = await redis.xlen(schema.EVENTS_STREAM)
    node_entries = int(
        str((await redis.config_get("stream-node-max-entries"))["stream-node-max-entries"])
    )
    assert 10 <= length <= 10 + node_entries < 301


NextEvent = Callable[[], "asyncio.Task[dict[str, object]]"]


@contextlib.asynccontextmanager
async def following(client: store.Client, *, block_seconds: float) -> AsyncIterator[NextEvent]:
    """read_events(follow=True); yields a function that starts waiting for the next event.

    Teardown cancels a wait still pending before closing the generator, so a failing test
    neither hangs nor leaves a task behind.
    """
    follower = store.read_events(client, follow=True, block_seconds=block_seconds)
    tasks: list[asyncio.Task[dict[str, object]]] = []

    def next_event() -> asyncio.Task[dict[str, object]]:
        task = asyncio.ensure_future(anext(follower))
        tasks.append(task)
        return task

    try:
        yield next_event
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await follower.aclose()


async def test_follow_delivers_an_event_written_later(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """read_events(follow=True) yields old events, then one written after it started."""
    await writer.create("abc123", address="127.0.0.2")
    async with following(redis, block_seconds=0.5) as next_event:
        first = await asyncio.wait_for(next_event(), timeout=5.0)
        pending = next_event()
        await asyncio.sleep(0.05)
        assert not pending.done()
        await writer.expose("abc123", 3000)
        second = await asyncio.wait_for(pending, timeout=5.0)
    assert first["type"] == "sandbox.created"
    assert (second["type"], second["port"]) == ("port.exposed", 3000)


async def test_follow_outlives_the_socket_timeout(writer: RouteWriter, redis_url: str) -> None:
    """A quiet stream is not a dead Redis: follow keeps waiting past the client's socket timeout."""
    client = store.open_redis(redis_url, timeout_seconds=0.6)
    try:
        async with following(client, block_seconds=5.0) as next_event:
            pending = next_event()
            await asyncio.sleep(1.5)  # over two socket timeouts with nothing to read
            assert not pending.done(), pending
            await writer.create("abc123", address="127.0.0.2")
            event = await asyncio.wait_for(pending, timeout=5.0)
    finally:
        await client.aclose()
    assert event["type"] == "sandbox.created"


# ---------------------------------------------------------------------------------------
# The invalidation and the script itself
# ---------------------------------------------------------------------------------------


async def test_every_write_publishes_label_and_gen(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """Each write publishes "label gen millis" on gw:invalidate: the gen it wrote and
    Redis's clock, which is close to ours (same machine)."""
    pubsub = redis.pubsub()
    await pubsub.subscribe(schema.INVALIDATION_CHANNEL)
    try:
        await pubsub.get_message(timeout=1.0)
        written = [(await writer.create("abc123", address="127.0.0.2")).gen]
        await writer.expose("abc123", 3000)
        written.append(await gen_of(redis, "abc123"))
        written.append((await writer.terminate("abc123")).gen)
        seen = []
        for _ in written:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
            assert message is not None
            seen.append(message["data"])
    finally:
        await pubsub.aclose()
    parsed = [schema.parse_invalidation(data) for data in seen]
    assert parsed == [("abc123", gen) for gen in written] == [("abc123", g) for g in (1, 2, 3)]
    for data in seen:
        published = schema.invalidation_time_ms(data)
        assert published is not None and abs(published / 1000 - time.time()) < 5


async def _call_script(client: aioredis.Redis, gen: str, ttl: str, *fields: str) -> Any:
    script = store.load_script("write_record.lua")
    keys = [schema.sandbox_key("abc123"), schema.gen_key("abc123")]
    return await client.eval(
        script, 2, *keys, gen, ttl, schema.INVALIDATION_CHANNEL, "abc123", *fields
    )


async def test_script_refuses_a_stale_generation(
    writer: RouteWriter, redis: aioredis.Redis
) -> None:
    """write_record.lua with a stale gen returns {0, current}, writing and publishing nothing."""
    await writer.create("abc123", address="127.0.0.2")
    async with unchanged(redis):
        assert await _call_script(redis, "0", "0", "id", "abc123", "state", "paused") == [0, 1]


async def test_script_writes_bumps_publishes_and_expires(redis: aioredis.Redis) -> None:
    """write_record.lua replaces the hash, sets gen, publishes, applies the TTL, or deletes."""
    pubsub = redis.pubsub()
    await pubsub.subscribe(schema.INVALIDATION_CHANNEL)
    try:
        await pubsub.get_message(timeout=1.0)
        assert await _call_script(redis, "0", "0", "id", "abc123", "stale", "x") == [1, 1]
        assert await _call_script(redis, "1", "60", "id", "abc123", "state", "terminated") == [1, 2]
        assert await redis.hgetall("gw:{abc123}:sandbox") == {
            "gen": "2", "id": "abc123", "state": "terminated",
        }  # fmt: skip
        assert 0 < await redis.ttl("gw:{abc123}:sandbox") <= 60
        assert await _call_script(redis, "2", "0") == [1, 3]  # no fields: delete
        assert await redis.exists("gw:{abc123}:sandbox") == 0
        assert await redis.get("gw:{abc123}:gen") == "3"
        messages = [
            (await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0) or {}).get(
                "data"
            )
            for _ in range(3)
        ]
    finally:
        await pubsub.aclose()
    texts = [str(m) for m in messages]
    assert [schema.parse_invalidation(m) for m in texts] == [("abc123", g) for g in (1, 2, 3)]
    assert all(schema.invalidation_time_ms(m) is not None for m in texts)


async def test_settings_read_back(writer: RouteWriter, redis: aioredis.Redis) -> None:
    """read_settings returns what write_settings stored, and gw:meta holds the documented fields."""
    assert await writer.settings() == SETTINGS
    assert await redis.hget(schema.META_KEY, "schema_version") == str(schema.SCHEMA_VERSION)


async def test_unreachable_redis_is_store_unavailable() -> None:
    """A writer whose Redis is gone raises StoreUnavailable (a ControlError), not a redis error."""
    client = store.open_redis("redis://127.0.0.1:1", timeout_seconds=0.5)
    try:
        with pytest.raises(errors.StoreUnavailable, match="unreachable"):
            await RouteWriter(client).create("abc123", address="127.0.0.2")
    finally:
        await client.aclose()
