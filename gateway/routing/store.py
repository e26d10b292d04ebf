"""The route table on redis.asyncio: the reader, the writer and the settings.

The one module that talks to Redis about routes (the watcher only subscribes). Redis
errors are translated into ``errors.StoreUnavailable`` here, in ``redis_errors()``, and
nowhere else.

Strategy for writes (docs/route-table.md, "Writing"): read the label's generation and
record; judge the operation with the lifecycle table (``model.check``); compute the new
record with a pure effect; then ``write_record.lua`` replaces the record, bumps the
generation and publishes the invalidation atomically, but only if the generation is still
the one read. A lost race is retried from the read. The event is appended afterwards
(at-least-once; it carries the generation, so consumers can spot gaps).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import time
import urllib.parse
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.exceptions

from gateway import errors
from gateway.routing import model, rules, schema
from gateway.routing.model import Op, PortOptions, Sandbox

_T = TypeVar("_T")
# Races on one label are rare and short (a handful of writers at most); past this many
# lost compare-and-sets something is wrong and the caller should hear about it.
MAX_WRITE_ATTEMPTS = 64
EVENT_APPEND_ATTEMPTS = 3

_EVENT_TYPES = {
    Op.CREATE: "sandbox.created",
    Op.EXPOSE: "port.exposed",
    Op.CLOSE: "port.closed",
    Op.PAUSE: "sandbox.paused",
    Op.RESUME: "sandbox.resumed",
    Op.TERMINATE: "sandbox.terminated",
}

Redis = aioredis.Redis
# Everything here takes either client: every per-sandbox command and script names keys of
# one label, which share a hash slot, so nothing needs a cross-slot pipeline.
Client = aioredis.Redis | redis.asyncio.cluster.RedisCluster
# ``read_events`` keeps each blocking XREAD this much shorter than the client's socket
# timeout, so a quiet stream is never mistaken for a dead Redis.
_BLOCK_MARGIN_SECONDS = 0.5


CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}


@dataclass(frozen=True, slots=True)
class ReplicaWait:
    """Acknowledged writes: each write returns once ``replicas`` replicas have it (WAIT)."""

    replicas: int
    timeout_seconds: float


# The wait policy a URL gave a client (``RouteWriter`` looks it up; weak: no leak).
_WAITS: weakref.WeakKeyDictionary[Any, ReplicaWait] = weakref.WeakKeyDictionary()
_WAIT_PARAMS = ("wait_replicas", "wait_timeout_ms")
DEFAULT_WAIT_TIMEOUT_MS = 1000


def replica_wait_of(client: Client) -> ReplicaWait | None:
    """The ``?wait_replicas=`` policy of the URL ``client`` was opened with, if any."""
    return _WAITS.get(client)


def split_wait(url: str) -> tuple[str, ReplicaWait | None]:
    """``url`` without ``wait_replicas``/``wait_timeout_ms``, and the policy they give.

    Raises:
        ValueError: a value that is not a whole number in range.
    """
    base, sep, query = url.partition("?")
    if not sep:
        return url, None
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    values = {k: v for k, v in pairs if k in _WAIT_PARAMS}
    rest = [(k, v) for k, v in pairs if k not in _WAIT_PARAMS]
    stripped = base + ("?" + urllib.parse.urlencode(rest) if rest else "")
    replicas_text = values.get("wait_replicas", "0")
    timeout_text = values.get("wait_timeout_ms", str(DEFAULT_WAIT_TIMEOUT_MS))
    if not replicas_text.isdigit() or not timeout_text.isdigit() or int(timeout_text) == 0:
        raise ValueError(
            f"{url!r}: wait_replicas must be a whole number and wait_timeout_ms a positive one"
        )
    if int(replicas_text) == 0:
        return stripped, None
    return stripped, ReplicaWait(int(replicas_text), int(timeout_text) / 1000)


def open_redis(url: str, *, timeout_seconds: float = 2.0) -> Redis:
    """A client for ``url`` (redis://, rediss://, unix:// or redis+sentinel://) with bounded waits.

    ``redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE`` (the hosts are
    sentinels; ``rediss+sentinel://`` for TLS to the primary) gives a client of the
    primary that Sentinel names for SERVICE, found again after every failover.

    ``?wait_replicas=N[&wait_timeout_ms=M]`` on any of them makes every ``RouteWriter``
    write on this client acknowledged: it returns only once N replicas have the write
    (Redis ``WAIT``, at most M ms, default 1000), else it raises ``StoreUnavailable``
    saying the change was applied but not acknowledged. A write the control plane was
    told succeeded then survives a failover.

    Raises:
        ValueError: ``url`` is not a Redis URL (the message names the schemes accepted).
    """
    url, wait = split_wait(url)
    # A WAIT blocks its connection for up to its timeout: the socket must outwait it.
    socket_timeout = timeout_seconds + (wait.timeout_seconds if wait else 0.0)
    scheme = url.partition("://")[0].lower()
    client: Redis
    if scheme in SENTINEL_SCHEMES:
        client = _open_sentinel(
            url, ssl=SENTINEL_SCHEMES[scheme], timeout_seconds=timeout_seconds,
            socket_timeout=socket_timeout,
        )  # fmt: skip
    else:
        client = aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=timeout_seconds
        )
    if wait is not None:
        _WAITS[client] = wait
    return client


class _SentinelRedis(aioredis.Redis):
    """The primary's client; closing it closes its sentinel connections too."""

    sentinel_manager: redis.asyncio.sentinel.Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            manager = self.sentinel_manager
            for client in manager.sentinels if manager is not None else ():
                await client.aclose()


def _open_sentinel(url: str, *, ssl: bool, timeout_seconds: float, socket_timeout: float) -> Redis:
    seeds, username, password, service = _parse_seeds(url, path_is="service")
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout_seconds, "socket_connect_timeout": timeout_seconds,
    }  # fmt: skip
    manager = redis.asyncio.sentinel.Sentinel(seeds, sentinel_kwargs=dict(kwargs))
    kwargs["socket_timeout"] = socket_timeout
    if ssl:
        kwargs["ssl"] = True
    client: _SentinelRedis = manager.master_for(
        service, redis_class=_SentinelRedis, username=username, password=password, **kwargs
    )
    client.sentinel_manager = manager
    return client


def open_client(url: str, *, timeout_seconds: float = 2.0) -> Client:
    """``open_redis``, plus Redis Cluster URLs (the gateway's and writers' entry point).

    ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://``
    for TLS) gives a ``RedisCluster`` client: the listed nodes are seeds, the client
    discovers the rest and follows slot moves and failovers. Anything else goes to
    ``open_redis``.

    Raises:
        ValueError: ``url`` is not a Redis URL (the message names the schemes accepted).
    """
    scheme = url.partition("://")[0].lower()
    if scheme not in CLUSTER_SCHEMES:
        return open_redis(url, timeout_seconds=timeout_seconds)
    if split_wait(url)[1] is not None:
        # WAIT must follow the write on its connection; the cluster client pools per node.
        raise ValueError(f"{url!r}: wait_replicas is not supported on Redis Cluster URLs")
    seeds, username, password = parse_cluster_url(url)
    return redis.asyncio.cluster.RedisCluster(
        startup_nodes=[redis.asyncio.cluster.ClusterNode(h, p) for h, p in seeds],
        username=username,
        password=password,
        ssl=CLUSTER_SCHEMES[scheme],
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
    )


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """``(seed nodes, username, password)`` of a ``redis+cluster://`` URL.

    Raises:
        ValueError: no seed, a seed that is not ``host:port``, or a database other than 0.
    """
    seeds, username, password, _ = _parse_seeds(url, path_is="database")
    return seeds, username, password


def _parse_seeds(
    url: str, *, path_is: str
) -> tuple[list[tuple[str, int]], str | None, str | None, str]:
    """``(host:port seeds, username, password, path)`` of a cluster or sentinel URL."""
    rest = url.partition("://")[2]
    netloc, _, path = rest.split("?", 1)[0].partition("/")
    path = path.strip("/")
    if path_is == "database" and path not in ("", "0"):
        raise ValueError(f"{url!r}: Redis Cluster has database 0 only")
    if path_is == "service" and not path:
        raise ValueError(f"{url!r}: name the Sentinel service: redis+sentinel://HOST:PORT/NAME")
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    seeds: list[tuple[str, int]] = []
    for item in filter(None, hosts.split(",")):
        host, _, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{url!r}: seed {item!r} is not host:port")
        seeds.append((host, int(port)))
    if not seeds:
        raise ValueError(f"{url!r}: name at least one host:port")
    unquote = urllib.parse.unquote
    return seeds, unquote(username) or None, unquote(password) or None, unquote(path)


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate Redis and socket failures into ``StoreUnavailable`` naming ``what``."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise errors.StoreUnavailable(f"Redis unreachable during {what}: {exc}") from None
    except TimeoutError:
        raise errors.StoreUnavailable(f"Redis did not answer in time during {what}") from None
    except redis.exceptions.ResponseError as exc:
        raise errors.StoreUnavailable(f"Redis refused {what}: {exc}") from None
    except redis.exceptions.RedisError as exc:
        # Cluster trouble (slots not covered, too many redirections) and the like.
        raise errors.StoreUnavailable(f"Redis failed during {what}: {exc}") from None


async def _bounded(what: str, timeout_seconds: float, call: Awaitable[_T]) -> _T:
    with redis_errors(what):
        async with asyncio.timeout(timeout_seconds):
            return await call


def load_script(name: str) -> str:
    """The text of a shipped Lua script (also loadable by control planes in any language)."""
    return resources.files("gateway.routing").joinpath("lua", name).read_text()


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


async def write_settings(client: Client, settings: schema.TableSettings) -> None:
    """Store the table's settings (``gateway serve`` does this at start and when missing)."""
    await _bounded("writing table settings", 5.0, client.hset(
        schema.META_KEY, mapping=dict(schema.encode_settings(settings))  # type: ignore[arg-type]
    ))  # fmt: skip


async def read_settings(client: Client, *, timeout_seconds: float = 2.0) -> schema.TableSettings:
    """The table's settings, checked against this code's schema version.

    Raises:
        errors.TableNotInitialised: no settings (no ``gateway serve`` ever wrote them).
        errors.SchemaMismatch: written by an incompatible version.
        errors.StoreUnavailable: Redis unreachable.
    """
    raw = await _bounded("reading table settings", timeout_seconds, client.hgetall(
        schema.META_KEY
    ))  # fmt: skip
    if not raw:
        raise errors.TableNotInitialised(
            f"the route table has no settings ({schema.META_KEY} is missing): "
            "start `gateway serve` on this Redis first"
        )
    # The version first: another version's meta may lack or rename the other fields.
    version = schema.schema_version_of(raw)
    if version != str(schema.SCHEMA_VERSION):
        raise errors.SchemaMismatch(
            f"the route table has schema version {version or 'none'}; this gateway "
            f"speaks version {schema.SCHEMA_VERSION}"
        )
    try:
        settings = schema.decode_settings(raw)
    except ValueError as exc:
        raise errors.SchemaMismatch(str(exc)) from None
    assert settings is not None  # raw is not empty
    return settings


# ---------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------


class RouteReader:
    """One-read lookups of a label's record, for the gateway's cache misses."""

    def __init__(self, client: Client, *, timeout_seconds: float) -> None:
        self._client = client
        self._timeout = timeout_seconds

    async def get(self, label: str) -> Sandbox | None:
        """The record under ``label`` (a tombstone included), or None.

        Raises:
            errors.StoreUnavailable: Redis unreachable, slow, or the record unreadable.
        """
        raw = await _bounded("a route lookup", self._timeout, self._client.hgetall(
            schema.sandbox_key(label)
        ))  # fmt: skip
        try:
            return schema.decode_sandbox(raw)
        except ValueError as exc:
            raise errors.StoreUnavailable(f"label {label!r}: {exc}") from None


# ---------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exposure:
    """One exposed port as the interfaces show it."""

    port: int
    url: str
    sandbox_id: str

    def as_json(self) -> dict[str, object]:
        return {"port": self.port, "url": self.url, "sandboxId": self.sandbox_id}


@dataclass(frozen=True, slots=True)
class WriteResult:
    record: Sandbox
    changed: bool
    previous: Sandbox | None


def new_incarnation() -> str:
    return os.urandom(8).hex()


class RouteWriter:
    """The control plane's operations on the route table (library, CLI and API share it).

    Every method validates its input before touching anything, applies the lifecycle
    table, and raises ``errors.ControlError`` subclasses with clear messages.
    """

    def __init__(
        self,
        client: Client,
        *,
        timeout_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
        replica_wait: ReplicaWait | None = None,
    ) -> None:
        """``replica_wait``: acknowledged writes; default: what the client's URL asked for."""
        self._client = client
        self._timeout = timeout_seconds
        self._clock = clock
        self._wait = replica_wait or replica_wait_of(client)
        if self._wait is not None and isinstance(client, redis.asyncio.cluster.RedisCluster):
            raise ValueError("acknowledged writes (WAIT) are not supported on Redis Cluster")
        self._script = client.register_script(load_script("write_record.lua"))

    # Public methods -------------------------------------------------------------------

    async def settings(self) -> schema.TableSettings:
        return await read_settings(self._client, timeout_seconds=self._timeout)

    async def create(
        self,
        sandbox_id: object,
        *,
        address: object,
        allow_ports: object | None = None,
        limits: dict[str, int] | None = None,
    ) -> Sandbox:
        settings = await self.settings()
        sid = rules.check_sandbox_id(sandbox_id, label_length=settings.label_length)
        ip = rules.check_address(address, networks=_networks(settings))
        ports = None if allow_ports is None else rules.parse_port_list(allow_ports)
        label = rules.label_of(sid, label_length=settings.label_length)

        def effect(_: Sandbox | None) -> Sandbox:
            return model.created(
                sid, label=label, address=ip, incarnation=new_incarnation(),
                now=self._clock(), allow_ports=ports, limits=limits,
            )  # fmt: skip

        return (await self._write(settings, sid, Op.CREATE, effect)).record

    async def show(self, sandbox_id: object) -> Sandbox:
        settings = await self.settings()
        sid = rules.check_sandbox_id(sandbox_id, label_length=settings.label_length)
        _, record = await self._read(rules.label_of(sid, label_length=settings.label_length))
        model.check(Op.SHOW, record, sid)
        assert record is not None
        return record

    async def expose(
        self, sandbox_id: object, port: object, *, host_rewrite: bool = False
    ) -> tuple[Exposure, bool]:
        """Expose ``port``; returns the exposure and whether this call created it."""
        settings = await self.settings()
        sid = rules.check_sandbox_id(sandbox_id, label_length=settings.label_length)
        number = rules.parse_port(port)
        options = PortOptions(host_rewrite=host_rewrite)

        def effect(record: Sandbox | None) -> Sandbox:
            assert record is not None
            if record.allow_ports is not None and number not in record.allow_ports:
                raise errors.RuleViolation(
                    f"port {number} is not in allowPorts of sandbox {sid!r}",
                    code="port_not_allowed",
                )
            rules.check_not_listener(record.address, number, settings.listener_endpoints())
            previous = record.ports.get(number)
            if previous is not None and previous.extra:
                keep = dataclasses.replace(options, extra=previous.extra)
                return model.exposed(record, number, keep, now=self._clock())
            return model.exposed(record, number, options, now=self._clock())

        result = await self._write(settings, sid, Op.EXPOSE, effect, port=number)
        first_time = result.changed and number not in _present(result.previous).ports
        return Exposure(number, settings.public_url(number, result.record.label), sid), first_time

    async def list_ports(self, sandbox_id: object) -> list[Exposure]:
        settings = await self.settings()
        sid = rules.check_sandbox_id(sandbox_id, label_length=settings.label_length)
        _, record = await self._read(rules.label_of(sid, label_length=settings.label_length))
        model.check(Op.LIST, record, sid)
        assert record is not None
        return exposures(record, settings)

    async def close(self, sandbox_id: object, port: object) -> Sandbox:
        settings = await self.settings()
        sid = rules.check_sandbox_id(sandbox_id, label_length=settings.label_length)
        number = rules.parse_port(port)
        result = await self._write(
            settings, sid, Op.CLOSE,
            lambda r: model.closed(_present(r), number, now=self._clock()), port=number,
        )  # fmt: skip
        return result.record

    async def pause(self, sandbox_id: object) -> Sandbox:
        settings = await self.settings()
        sid = rules.check_sandbox_id(sandbox_id, label_length=settings.label_length)
        result = await self._write(
            settings, sid, Op.PAUSE, lambda r: model.paused(_present(r), now=self._clock())
        )
        return result.record

    async def resume(self, sandbox_id: object, *, address: object | None = None) -> Sandbox:
        settings = await self.settings()
        sid = rules.check_sandbox_id(sandbox_id, label_length=settings.label_length)
        ip = None if address is None else rules.check_address(address, networks=_networks(settings))

        def effect(record: Sandbox | None) -> Sandbox:
            record = _present(record)
            for port in record.ports if ip else ():
                rules.check_not_listener(ip or "", port, settings.listener_endpoints())
            return model.resumed(
                record, address=ip, incarnation=new_incarnation(), now=self._clock()
            )

        return (await self._write(settings, sid, Op.RESUME, effect)).record

    async def terminate(self, sandbox_id: object) -> Sandbox:
        settings = await self.settings()
        sid = rules.check_sandbox_id(sandbox_id, label_length=settings.label_length)
        result = await self._write(
            settings, sid, Op.TERMINATE, lambda r: model.terminated(_present(r), now=self._clock())
        )
        return result.record

    # Private methods ------------------------------------------------------------------

    async def _read(self, label: str) -> tuple[int, Sandbox | None]:
        gen_raw, raw = await _bounded("reading a sandbox", self._timeout, _read_pair(
            self._client, label
        ))  # fmt: skip
        try:
            return int(gen_raw or 0), schema.decode_sandbox(raw)
        except ValueError as exc:
            raise errors.StoreUnavailable(f"label {label!r}: {exc}") from None

    async def _write(
        self,
        settings: schema.TableSettings,
        sandbox_id: str,
        op: Op,
        effect: Callable[[Sandbox | None], Sandbox],
        *,
        port: int | None = None,
    ) -> WriteResult:
        label = rules.label_of(sandbox_id, label_length=settings.label_length)
        for _ in range(MAX_WRITE_ATTEMPTS):
            gen, record = await self._read(label)
            if model.check(op, record, sandbox_id) is not model.Verdict.APPLY:
                return WriteResult(_present(record), changed=False, previous=record)
            new = effect(record)
            if new is record:
                return WriteResult(new, changed=False, previous=record)
            ttl = settings.quarantine_seconds if new.state is model.State.TERMINATED else 0
            won, new_gen, acked = await self._compare_and_set(label, gen, new, ttl)
            if won:
                written = dataclasses.replace(new, gen=new_gen)
                await self._append_event(settings, op, written, port=port, previous=record)
                if self._wait is not None and acked < self._wait.replicas:
                    raise errors.StoreUnavailable(
                        f"the change was applied (gen {new_gen}) but only {acked} of "
                        f"{self._wait.replicas} replicas acknowledged it within "
                        f"{self._wait.timeout_seconds:g} s, so a failover could lose it; retry"
                    )
                return WriteResult(written, changed=True, previous=record)
        raise errors.StoreUnavailable(f"too many concurrent writes to label {label!r}; retry")

    async def _compare_and_set(
        self, label: str, gen: int, record: Sandbox, ttl: int
    ) -> tuple[bool, int, int]:
        """``(won, generation, replicas that acknowledged)``; 0 replicas without a wait."""
        flat: list[str] = []
        for name, value in schema.encode_sandbox(record).items():
            flat += [name, value]
        keys = [schema.sandbox_key(label), schema.gen_key(label)]
        argv = [str(gen), str(ttl), schema.INVALIDATION_CHANNEL, label, *flat]
        if self._wait is None or not isinstance(self._client, aioredis.Redis):
            reply = await _bounded("writing a sandbox", self._timeout, self._script(
                keys=keys, args=argv
            ))  # fmt: skip
            return bool(int(reply[0])), int(reply[1]), 0
        wait = self._wait
        reply, acked = await _bounded(
            "writing a sandbox", self._timeout + wait.timeout_seconds,
            self._write_and_wait(self._client, wait, keys, argv),
        )  # fmt: skip
        return bool(int(reply[0])), int(reply[1]), int(acked)

    async def _write_and_wait(
        self, client: Redis, wait: ReplicaWait, keys: list[str], argv: list[str]
    ) -> tuple[Any, Any]:
        # One pipeline is one connection: WAIT counts the replicas that have *this*
        # connection's writes, so it must follow the script on the same connection.
        async with client.pipeline(transaction=False) as pipe:
            await self._script(keys=keys, args=argv, client=pipe)
            pipe.wait(wait.replicas, max(1, int(wait.timeout_seconds * 1000)))
            reply, acked = await pipe.execute()
        return reply, acked

    async def _append_event(
        self,
        settings: schema.TableSettings,
        op: Op,
        record: Sandbox,
        *,
        port: int | None,
        previous: Sandbox | None,
    ) -> None:
        url = None if port is None else settings.public_url(port, record.label)
        if op is Op.CLOSE and previous is not None and port not in previous.ports:
            return  # closing a port that was never open changed nothing
        fields = schema.event_fields(_EVENT_TYPES[op], record, gen=record.gen, port=port, url=url)
        for attempt in range(EVENT_APPEND_ATTEMPTS):
            try:
                await _bounded("appending an event", self._timeout, self._client.xadd(
                    schema.EVENTS_STREAM, dict(fields),  # type: ignore[arg-type]
                    maxlen=settings.events_max_length, approximate=True,
                ))  # fmt: skip
                return
            except errors.StoreUnavailable:
                if attempt == EVENT_APPEND_ATTEMPTS - 1:
                    raise errors.StoreUnavailable(
                        f"the change was applied (gen {record.gen}) but its event could not "
                        "be recorded: Redis unreachable"
                    ) from None


async def _read_pair(client: Client, label: str) -> tuple[Any, Any]:
    # GET before HGETALL: if a write lands in between, the record is newer than the
    # generation read, and the compare-and-set refuses; the writer then reads again.
    gen = await client.get(schema.gen_key(label))
    raw = await client.hgetall(schema.sandbox_key(label))
    return gen, raw


def _present(record: Sandbox | None) -> Sandbox:
    assert record is not None
    return record


def _networks(settings: schema.TableSettings) -> list[rules.IPNetwork]:
    return [ipaddress.ip_network(n) for n in settings.sandbox_networks]


def exposures(record: Sandbox, settings: schema.TableSettings) -> list[Exposure]:
    return [
        Exposure(port, settings.public_url(port, record.label), record.id)
        for port in sorted(record.ports)
    ]


# ---------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------


async def read_events(
    client: Client, *, follow: bool, block_seconds: float = 5.0, after: str = "0-0"
) -> AsyncGenerator[dict[str, object], None]:
    """Events from the stream, oldest first; with ``follow``, then new ones as they come.

    Each blocking read is bounded and simply repeated, so a dead Redis is noticed instead
    of waited on for ever. A blocking read lasts ``block_seconds`` at most, and always
    less than the client's socket timeout: otherwise a quiet stream would look like a
    Redis that stopped answering.
    """
    block_seconds = _block_within_socket_timeout(client, block_seconds)
    last = after
    while True:
        block = max(1, int(block_seconds * 1000)) if follow else None
        timeout = block_seconds + 5.0
        reply: Any = await _bounded("reading events", timeout, client.xread(
            {schema.EVENTS_STREAM: last}, count=1000, block=block
        ))  # fmt: skip
        entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1] if reply else []
        for entry_id, fields in entries:
            last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            yield schema.decode_event(entry_id, fields)
        if not follow and not entries:
            return


def _block_within_socket_timeout(client: Client, block_seconds: float) -> float:
    kwargs: dict[str, Any] = getattr(
        getattr(client, "connection_pool", None), "connection_kwargs", None
    ) or getattr(client, "connection_kwargs", {})
    socket_timeout = kwargs.get("socket_timeout")
    if isinstance(socket_timeout, int | float) and socket_timeout > 0:
        return max(0.05, min(block_seconds, socket_timeout - _BLOCK_MARGIN_SECONDS))
    return block_seconds
