"""nginx as the reference proxy: a generated config in a temp dir, one worker.

The config is the one ../shared/DESIGN.md section 6 compares against: an upstream block
with ``keepalive 64``, HTTP/1.1 to the upstream with ``Connection ""``, no response or
request buffering, no body size limit, no access log. ``/ws`` is proxied as a WebSocket
(``Upgrade`` passed on). Client and upstream keep-alive limits are raised so nginx is not
made to reconnect every 1000 requests (its default), which the gateway never does.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from bench import procs

_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


@dataclass(frozen=True, slots=True)
class Nginx:
    proc: procs.Proc
    port: int
    workers: tuple[int, ...]
    version: str


def config_text(*, prefix: Path, listen: tuple[str, int], upstream: tuple[str, int]) -> str:
    """The nginx.conf for proxying ``listen`` to ``upstream``; paths inside ``prefix``."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {name}_temp_path {prefix / name};" for name in _TEMP_DIRS)
    return f"""{user}worker_processes 1;
worker_rlimit_nofile 20000;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{
    worker_connections 19000;
}}
http {{
    access_log off;
{temp}
    keepalive_requests 1000000;
    keepalive_timeout 620s;
    upstream sandbox {{
        server {upstream[0]}:{upstream[1]};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 620s;
    }}
    server {{
        listen {listen[0]}:{listen[1]} backlog=4096;
        client_max_body_size 0;
        location / {{
            proxy_pass http://sandbox;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
        location /ws {{
            proxy_pass http://sandbox;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""


async def start(group: procs.ProcessGroup, *, upstream: tuple[str, int], cpus: str | None) -> Nginx:
    """Write the config under the group's work dir and start nginx in the foreground."""
    prefix = group.workdir / "nginx"
    for name in ("", *_TEMP_DIRS):
        (prefix / name).mkdir(parents=True, exist_ok=True)
    port = procs.free_port("127.0.0.1")
    conf = prefix / "nginx.conf"
    conf.write_text(config_text(prefix=prefix, listen=("127.0.0.1", port), upstream=upstream))
    exe = procs.system_binary("nginx", package="nginx-light")
    version = await group.run("nginx-version", [exe, "-v"], time_limit=10)
    proc = group.start(
        "nginx",
        [exe, "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log"),
         "-g", "daemon off;"],
        cpus=cpus,
    )  # fmt: skip
    await procs.wait_listening("127.0.0.1", port, proc=proc)
    workers: list[int] = []
    for _ in range(200):
        workers = procs.children(proc.pid)
        if workers:
            break
        await asyncio.sleep(0.02)
    if not workers:
        raise RuntimeError("nginx started no worker process")
    for pid in workers:
        group.adopt("nginx-worker", pid)
    text = (version.stderr or version.stdout).strip()
    return Nginx(proc, port, tuple(workers), text.rpartition("/")[2] or text)
