"""The system under test, started on loopback: Redis, the upstream, nginx, the gateway.

The relay (``bench.relay``) and HAProxy (``bench.haproxy``, for the bulk phase) run
beside them as references.

Layout (``Layout``): on a machine with 2+ CPUs, while the stack is *pinned* the load
generators (wrk, the bench's own clients), the upstream and Redis share CPU 0 and the
proxy under test (the nginx worker or the gateway) gets CPU 1 to itself, the same for
every target, so the proxy's CPU per request is measured on a core of its own. The
measurements that compare with direct, or time single requests, run *floating* (every
process on every CPU): on these virtual machines a request that has to wake an idle
pinned vCPU waits milliseconds for it (measured: nginx's added p99 at 1000 req/s was
6-9 ms pinned and 0.5-0.8 ms floating), and a pinned direct baseline would squeeze
client and upstream onto one core. ``Stack.set_pinned`` switches between the two.

The sandbox is registered the way an operator would: ``gateway sandbox create benchbox
--address 127.0.0.2`` and ``gateway ports expose benchbox PORT``; its label is
``benchb`` and requests carry ``Host: PORT-benchb.box.localhost``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import haproxy, nginx, procs

REPO = Path(__file__).resolve().parent.parent
UPSTREAM_HOST = "127.0.0.2"
DOMAIN = "box.localhost"
SANDBOX_ID = "benchbox"
SANDBOX_LABEL = "benchb"


@dataclass(frozen=True, slots=True)
class Layout:
    """Which CPUs each role runs on (None: not pinned)."""

    load: str | None
    upstream: str | None
    proxy: str | None

    @classmethod
    def for_machine(cls, *, pin: bool) -> Layout:
        if pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
            return cls(load="0", upstream="0", proxy="1")
        return cls(load=None, upstream=None, proxy=None)

    def describe(self) -> str:
        if self.proxy is None:
            return "no CPU pinning"
        return (
            f"throughput runs pinned (load generators + upstream + Redis on CPU {self.load}, "
            f"proxy under test on CPU {self.proxy}), the rest floating"
        )


@dataclass(frozen=True, slots=True)
class Target:
    """Where a client sends requests, and whose CPU and memory that costs."""

    name: str
    host: str
    port: int
    host_header: str
    proxy_pids: tuple[int, ...]  # CPU counted as the target's; () for direct


@dataclass(frozen=True, slots=True)
class Gateway:
    proc: procs.Proc
    port: int
    admin_port: int

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass(slots=True)
class Stack:
    group: procs.ProcessGroup
    layout: Layout
    redis_url: str
    redis: procs.Proc
    upstream: procs.Proc
    upstream_port: int
    nginx: nginx.Nginx
    gateway: Gateway
    relay: procs.Proc  # bench/relay.py: the floor of a proxy in this runtime
    relay_port: int
    haproxy: haproxy.HAProxy  # the zero-copy reference of the bulk phase
    pinned: bool = True

    def cpus(self, role: str | None) -> str | None:
        """The ``cpus`` argument for a new process in ``role`` (a Layout value) right now."""
        return role if self.pinned else None

    def set_pinned(self, pinned: bool) -> None:
        """Pin every process of the stack (this one included) per the layout, or float all.

        Processes started later in a phase get ``cpus(...)`` of the state at their start.
        """
        every = set(range(os.cpu_count() or 1))

        def cpus(role: str | None) -> set[int]:
            return {int(c) for c in role.split(",")} if pinned and role else every

        layout = self.layout
        procs.set_affinity(os.getpid(), cpus(layout.load))
        procs.set_affinity(self.redis.pid, cpus(layout.load))
        procs.set_affinity(self.upstream.pid, cpus(layout.upstream))
        proxies = (self.nginx.proc.pid, *self.nginx.workers, self.gateway.pid, self.relay.pid)
        for pid in (*proxies, self.haproxy.proc.pid):
            procs.set_affinity(pid, cpus(layout.proxy))
        self.pinned = pinned

    def variants(self) -> list[tuple[str, bool]]:
        """(row suffix, pinned) for measurements reported both ways: floating first."""
        if self.layout.proxy is None:
            return [("", False)]
        return [("", False), (" (pinned)", True)]

    @property
    def host_header(self) -> str:
        return f"{self.upstream_port}-{SANDBOX_LABEL}.{DOMAIN}"

    def targets(self) -> list[Target]:
        """direct, nginx, gateway, relay: the order every measurement alternates in."""
        return [
            Target("direct", UPSTREAM_HOST, self.upstream_port, self.host_header, ()),
            Target("nginx", "127.0.0.1", self.nginx.port, self.host_header, self.nginx.workers),
            Target("gateway", "127.0.0.1", self.gateway.port, self.host_header,
                   (self.gateway.pid,)),
            Target("relay", "127.0.0.1", self.relay_port, self.host_header, (self.relay.pid,)),
        ]  # fmt: skip

    def bulk_targets(self) -> list[Target]:
        """``targets()`` and HAProxy splicing in TCP mode (see ``bench.haproxy``)."""
        spliced = Target("haproxy-splice", "127.0.0.1", self.haproxy.port, self.host_header,
                         (self.haproxy.proc.pid,))  # fmt: skip
        return [*self.targets(), spliced]

    def gateway_target(self, gateway: Gateway) -> Target:
        return Target("gateway", "127.0.0.1", gateway.port, self.host_header, (gateway.pid,))


def redis_binary() -> str:
    """Debian's redis-server when installed (what CI uses), else the first on PATH."""
    if Path("/usr/bin/redis-server").exists():
        return "/usr/bin/redis-server"
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    return found


async def start_redis(group: procs.ProcessGroup, layout: Layout) -> tuple[procs.Proc, str]:
    """A private redis-server on a unix socket in the work dir, no persistence."""
    directory = group.workdir / "redis"
    directory.mkdir(exist_ok=True)
    sock = directory / "redis.sock"
    proc = group.start(
        "redis",
        [redis_binary(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(directory), "--daemonize", "no",
         "--maxclients", "4064", "--logfile", str(directory / "redis.log")],
        cpus=layout.load,
    )  # fmt: skip
    for _ in range(500):
        if sock.exists():
            break
        if not proc.alive():
            raise RuntimeError(f"redis-server exited: {proc.stderr_tail()}")
        await asyncio.sleep(0.02)
    else:
        raise RuntimeError("redis-server did not create its socket")
    return proc, f"unix://{sock}"


async def start_upstream(group: procs.ProcessGroup, layout: Layout) -> tuple[procs.Proc, int]:
    proc = group.start(
        "upstream",
        [sys.executable, "-m", "bench.upstream_server", "--host", UPSTREAM_HOST, "--port", "0"],
        cpus=layout.upstream, cwd=REPO,
    )  # fmt: skip
    ready = await procs.ready_line(proc)
    return proc, int(ready["port"])


async def start_relay(
    group: procs.ProcessGroup, upstream_port: int, layout: Layout
) -> tuple[procs.Proc, int]:
    proc = group.start(
        "relay",
        [sys.executable, "-m", "bench.relay", "--upstream", f"{UPSTREAM_HOST}:{upstream_port}"],
        cpus=layout.proxy, cwd=REPO,
    )  # fmt: skip
    ready = await procs.ready_line(proc)
    return proc, int(ready["port"])


async def start_replica(stack: Stack, name: str) -> Gateway:
    """Another gateway process on the stack's Redis, placed like the main one is now."""
    return await start_gateway(
        stack.group, stack.redis_url, stack.cpus(stack.layout.proxy), name=name
    )


# The gateway runs on its defaults but for shutdown and the abuse limits. Shutdown: no
# drain delay and a short grace, so stopping a replica between measurements takes a
# moment, not the production 5 + 20 s; nothing measured happens during a drain. Limits:
# the bench is one client and one sandbox, so the miss budget would answer the
# propagation poller's expected 404s with 429 after 100, and the per-sandbox connection
# limit (1000) would refuse the 8,000 idle WebSockets; both are off (0) here.
_GATEWAY_SETTINGS = {
    "GATEWAY_SERVER__DRAIN_DELAY_SECONDS": "0",
    "GATEWAY_SERVER__DRAIN_GRACE_SECONDS": "2",
    "GATEWAY_LIMITS__MISSES_PER_WINDOW": "0",
    "GATEWAY_LIMITS__CONNECTIONS_PER_SANDBOX": "0",
}


def gateway_env() -> dict[str, str]:
    """This environment without the caller's GATEWAY_* settings, plus ``_GATEWAY_SETTINGS``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return {**env, **_GATEWAY_SETTINGS}


async def start_gateway(
    group: procs.ProcessGroup, redis_url: str, cpus: str | None, *, name: str = "gateway"
) -> Gateway:
    """``python -m gateway serve`` on 127.0.0.1 port 0; the ports come from its ready line."""
    proc = group.start(
        name,
        [sys.executable, "-m", "gateway", "serve", "--listen", "127.0.0.1:0",
         "--admin-listen", "127.0.0.1:0", "--redis-url", redis_url],
        cpus=cpus, env=gateway_env(), cwd=REPO,
    )  # fmt: skip
    ready = await procs.ready_line(proc)
    return Gateway(proc, _port_of(ready["listen"]), _port_of(ready["admin"]))


async def gateway_cli(group: procs.ProcessGroup, redis_url: str, *args: str) -> Any:
    """Run ``python -m gateway ARGS --redis-url URL``; its JSON output."""
    result = await group.run(
        "gateway-cli", [sys.executable, "-m", "gateway", *args, "--redis-url", redis_url],
        time_limit=30, env=gateway_env(), cwd=REPO,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"gateway {' '.join(args)} failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


async def start_stack(group: procs.ProcessGroup, layout: Layout) -> Stack:
    """Everything the measurements need, started and the sandbox registered."""
    redis_proc, redis_url = await start_redis(group, layout)
    upstream, upstream_port = await start_upstream(group, layout)
    proxy = await nginx.start(group, upstream=(UPSTREAM_HOST, upstream_port), cpus=layout.proxy)
    gateway = await start_gateway(group, redis_url, layout.proxy)
    relay, relay_port = await start_relay(group, upstream_port, layout)
    spliced = await haproxy.start(group, upstream=(UPSTREAM_HOST, upstream_port), cpus=layout.proxy)
    await gateway_cli(group, redis_url, "sandbox", "create", SANDBOX_ID, "--address", UPSTREAM_HOST)
    await gateway_cli(group, redis_url, "ports", "expose", SANDBOX_ID, str(upstream_port))
    return Stack(
        group, layout, redis_url, redis_proc, upstream, upstream_port, proxy, gateway, relay,
        relay_port, spliced,
    )  # fmt: skip


def _port_of(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])
