"""The machine description printed beside every table and stored in the JSON."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.stack import REPO, redis_binary
from gateway import compiled


@dataclass(frozen=True, slots=True)
class Machine:
    cpu_model: str
    cores: int
    memory_gib: float
    kernel: str
    python: str
    aiohttp: str
    uvloop: str
    httptools: str
    redis_py: str
    nginx: str
    haproxy: str
    wrk: str
    redis_server: str
    load_average: str  # at the start of the run: other work on a shared machine shows here
    layout: str
    gateway_revision: str  # the commit measured, and whether gateway/ had local changes

    def one_line(self) -> str:
        return (
            f"{self.cpu_model}, {self.cores} cores, {self.memory_gib:.0f} GiB, Linux "
            f"{self.kernel}; Python {self.python}, aiohttp {self.aiohttp}, uvloop "
            f"{self.uvloop}, nginx {self.nginx}, HAProxy {self.haproxy}, wrk {self.wrk}, "
            f"Redis {self.redis_server}; "
            f"gateway {self.gateway_revision}; {self.layout}; load average at start "
            f"{self.load_average}"
        )


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


async def describe(
    group: procs.ProcessGroup, *, nginx_version: str, haproxy_version: str, layout: str
) -> Machine:
    wrk = await group.run("wrk-version", ["wrk", "-v"], time_limit=10)
    wrk_match = re.search(r"wrk (\S+)", wrk.stdout + wrk.stderr)
    redis = await group.run("redis-version", [redis_binary(), "--version"], time_limit=10)
    redis_match = re.search(r"v=(\S+)", redis.stdout)
    head = await group.run("git-head", ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                           time_limit=10)  # fmt: skip
    dirty = await group.run(
        "git-status",
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway"],
        time_limit=10,
    )
    revision = head.stdout.strip() or "unknown"
    if dirty.stdout.strip():
        revision += f" + uncommitted changes in {len(dirty.stdout.splitlines())} gateway/ file(s)"
    revision += f", {compiled.describe_build()}"
    return Machine(
        cpu_model=_cpu_model(),
        cores=os.cpu_count() or 1,
        memory_gib=_memory_gib(),
        kernel=platform.release(),
        python=platform.python_version(),
        aiohttp=_version("aiohttp"),
        uvloop=_version("uvloop"),
        httptools=_version("httptools"),
        redis_py=_version("redis"),
        nginx=nginx_version,
        haproxy=haproxy_version,
        wrk=wrk_match.group(1) if wrk_match else "unknown",
        redis_server=redis_match.group(1) if redis_match else "unknown",
        load_average=load_average(),
        layout=layout,
        gateway_revision=revision,
    )
