"""HAProxy as the bulk phase's zero-copy reference: TCP mode, kernel splice, one thread.

No HTTP at all: each client connection is joined to one upstream connection and the
bytes move with splice(2) through a pipe (``option splice-auto``), so they never cross
user space. That is the least CPU a proxy in a third process can spend per byte on this
kernel, written in C: what it reaches against direct bounds what any proxy, the gateway
included, can reach on the same machine (docs/performance.md, "The other paths").
"""

from __future__ import annotations

from dataclasses import dataclass

from bench import procs


@dataclass(frozen=True, slots=True)
class HAProxy:
    proc: procs.Proc
    port: int
    version: str


def config_text(*, listen: tuple[str, int], upstream: tuple[str, int]) -> str:
    """The haproxy.cfg relaying ``listen`` to ``upstream`` over TCP with splice."""
    return f"""global
    nbthread 1
    maxconn 1000
defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend bench
    bind {listen[0]}:{listen[1]}
    default_backend sandbox
backend sandbox
    server upstream {upstream[0]}:{upstream[1]}
"""


async def start(
    group: procs.ProcessGroup, *, upstream: tuple[str, int], cpus: str | None
) -> HAProxy:
    """Write the config under the group's work dir and start haproxy in the foreground."""
    port = procs.free_port("127.0.0.1")
    conf = group.workdir / "haproxy.cfg"
    conf.write_text(config_text(listen=("127.0.0.1", port), upstream=upstream))
    exe = procs.system_binary("haproxy", package="haproxy")
    version = await group.run("haproxy-version", [exe, "-v"], time_limit=10)
    proc = group.start("haproxy", [exe, "-db", "-f", str(conf)], cpus=cpus)
    await procs.wait_listening("127.0.0.1", port, proc=proc)
    first = version.stdout.splitlines()[0] if version.stdout else ""
    return HAProxy(proc, port, first.split()[2] if len(first.split()) > 2 else first)
