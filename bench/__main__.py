"""``python -m bench``: the gateway side by side with nginx and direct, in one run.

Starts everything itself on loopback (Redis on a unix socket, the upstream on
127.0.0.2, nginx and the gateway on 127.0.0.1), runs the measurements in order, prints a
table after each (with the machine described), writes the JSON document (``--out``),
and stops every process it started, by pid, checking that none is left. Exit status 0
when every phase ran and nothing was left running; numbers are reported, never judged
(../shared/DESIGN.md section 6 has the targets; the closing table compares).

    python -m bench                      # the full suite, < 10 minutes
    python -m bench --quick --out x.json # the CI smoke, < 90 s
    python -m bench --profile prof/      # also py-spy and perf the gateway under wrk
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench import bulk, load, machine, nativeprofile, procs, profile, propagation, scale, ws
from bench.plan import FULL, QUICK, Plan
from bench.report import Table, dumps, num, render, times
from bench.stack import Layout, Stack, start_stack


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    run: Callable[[Stack, Plan], Awaitable[Any]]
    table: Callable[[Any, Plan], Table]
    pinned: bool = False  # see bench.stack: only CPU-per-request runs pin


PHASES = [
    Phase("throughput", load.run_throughput, load.throughput_table, pinned=True),
    Phase("latency", load.run_latency, lambda r, _: load.latency_table(r)),
    Phase("bulk", bulk.run_bulk, bulk.bulk_table),
    Phase("websocket", ws.run_relay, ws.relay_table),
    Phase(
        "propagation", propagation.run_propagation, lambda r, _: propagation.propagation_table(r)
    ),
    Phase("idle_websockets", ws.run_idle, lambda r, _: ws.idle_table(r)),
    Phase("scale", scale.run_scale, lambda r, _: scale.scale_table(r)),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (CI)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--only", help="comma-separated phases: " + ",".join(p.name for p in PHASES)
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="py-spy and perf the gateway under wrk; flame graph, stacks, perf data to DIR",
    )  # fmt: skip
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    return parser


def _selected(only: str | None, profile_dir: Path | None) -> list[Phase]:
    phases = list(PHASES)
    if only:
        names = {n.strip() for n in only.split(",") if n.strip()}
        unknown = names - {p.name for p in PHASES} - {"profile"}
        if unknown:
            raise SystemExit(f"unknown phase(s): {', '.join(sorted(unknown))}")
        phases = [p for p in PHASES if p.name in names]
    if profile_dir is not None:
        directory = profile_dir
        at = 1 if phases and phases[0].name == "throughput" else 0
        phases[at:at] = [
            Phase("profile", lambda s, p: profile.profile_gateway(s, p, directory),
                  lambda r, _: profile.profile_table(r), pinned=True),
            Phase("native_profile", lambda s, p: nativeprofile.profile_native(s, p, directory),
                  lambda r, _: nativeprofile.native_profile_table(r), pinned=True),
        ]  # fmt: skip
    return phases


def summary_table(results: dict[str, Any]) -> Table:
    """The headline numbers next to DESIGN.md section 6's targets."""
    table = Table("Summary against DESIGN.md section 6", ["measure", "measured", "target", "met"])

    def row(measure: str, value: float, shown: str, target: str, ok: bool) -> None:
        met = "-" if math.isnan(value) else ("yes" if ok else "no")
        table.rows.append([measure, shown, target, met])

    if (t := results.get("throughput")) is not None:
        row("small responses, gateway/nginx req/s", t.gateway_vs_nginx,
            times(t.gateway_vs_nginx), ">= 0.6x", t.gateway_vs_nginx >= 0.6)  # fmt: skip
        by_cpu = t.gateway_vs_nginx_by_cpu
        row("small responses, by CPU per request", by_cpu, times(by_cpu), ">= 0.6x", by_cpu >= 0.6)
    if (lat := results.get("latency")) is not None:
        added = lat.added_ms["gateway"].p99
        row(f"added p99 at {lat.rate} req/s (open loop)", added, f"{num(added, 3)} ms",
            "<= 1 ms", added <= 1)  # fmt: skip
        one = lat.added_ms["gateway" + load.SEQUENTIAL].p99
        row("added p99, one request at a time", one, f"{num(one, 3)} ms", "(context)", one <= 1)
    if (b := results.get("bulk")) is not None:
        for direction in ("download", "upload"):
            value = b.vs_direct[direction]["gateway"]
            row(f"bulk {direction} vs direct", value, times(value), ">= 0.8x", value >= 0.8)
        growth = b.gateway_rss_growth_kib / 1024
        row("bulk: gateway RSS growth", growth, f"+{num(growth, 1)} MiB", "flat", growth < 16)
    if (w := results.get("websocket")) is not None:
        value = w.vs_direct["gateway"]
        row("WebSocket 64 B msgs/s vs direct", value, times(value), ">= 0.6x", value >= 0.6)
    if (p := results.get("propagation")) is not None:
        worst = max(x.p99 for x in p.per_replica_ms.values())
        missed = sum(p.missed.values())
        row("propagation p99 (worst replica)", worst, f"{num(worst, 2)} ms ({missed} missed)",
            "<= 100 ms (goal 50)", worst <= 100 and not missed)  # fmt: skip
    if (i := results.get("idle_websockets")) is not None:
        row(f"idle WebSocket memory at {i.opened:,}", i.kib_per_socket,
            f"{num(i.kib_per_socket, 1)} KiB", "<= 32 KiB", i.kib_per_socket <= 32)  # fmt: skip
    if (s := results.get("scale")) is not None and s.lookup_added_ms is not None:
        added = s.lookup_added_ms.p50
        row(f"cache-miss lookup, added p50 ({s.sandboxes:,} sandboxes)", added,
            f"{num(added, 3)} ms", "(none)", True)  # fmt: skip
    table.notes.append("ratios from this run only; 'met' is informational, never a pass/fail.")
    return table


async def run_phases(
    stack: Stack, phases: list[Phase], plan: Plan, document: dict[str, Any]
) -> bool:
    """Run ``phases`` in order, each bounded in time, printing its table; True if all ran."""
    line = document["machine"].one_line()
    ok = True
    for phase in phases:
        start = time.monotonic()
        document["load_average"][phase.name] = machine.load_average()
        other = procs.OtherLoad(stack.group)
        other.start()
        if stack.layout.proxy is not None:
            stack.set_pinned(phase.pinned)
        try:
            async with asyncio.timeout(plan.phase_timeout_seconds):
                result = await phase.run(stack, plan)
        except Exception as exc:  # reported; the other phases still run
            ok = False
            document["errors"][phase.name] = f"{type(exc).__name__}: {exc}"
            print(f"### {phase.name}: FAILED: {type(exc).__name__}: {exc}\n", flush=True)
            continue
        finally:
            document["seconds"][phase.name] = round(time.monotonic() - start, 1)
            busy, steal = other.cpus_busy()
            document["other_load_cpus"][phase.name] = {"other": busy, "steal": steal}
        document["results"][phase.name] = result
        table = phase.table(result, plan)
        table.notes.append(
            f"other load during this phase: {busy:.2f} of {os.cpu_count()} CPUs busy with "
            f"processes not the suite's, {steal:.2f} stolen by the hypervisor."
        )
        print(render(table, machine=line), flush=True)
    print(render(summary_table(document["results"]), machine=line), flush=True)
    return ok


async def run(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    phases = _selected(args.only, args.profile)
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    layout = Layout.for_machine(pin=not args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    group = procs.ProcessGroup(workdir, pin=layout.proxy is not None)
    began = time.monotonic()
    document: dict[str, Any] = {
        "plan": plan, "results": {}, "errors": {}, "seconds": {}, "load_average": {},
        "other_load_cpus": {},
        "fd_limit": procs.raise_open_files_limit(),  # before any child: they inherit it
    }  # fmt: skip
    ok = False
    left: list[procs.Started] = []
    try:
        stack = await start_stack(group, layout)
        document["machine"] = await machine.describe(
            group,
            nginx_version=stack.nginx.version,
            haproxy_version=stack.haproxy.version,
            layout=layout.describe(),
        )
        print(f"# Gateway benchmark ({plan.name})\n\nmachine: {document['machine'].one_line()}\n")
        ok = await run_phases(stack, phases, plan, document)
    except Exception as exc:  # the stack did not come up
        document["errors"]["setup"] = f"{type(exc).__name__}: {exc}"
        print(f"setup FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    finally:
        left = group.stop_all()
        document["processes"] = {
            "started": len(group.started),
            "left_running": [f"{s.name} (pid {s.pid})" for s in left],
        }
        document["load_average"]["end"] = machine.load_average()
        document["elapsed_seconds"] = round(time.monotonic() - began, 1)
        if args.out is not None:
            args.out.write_text(dumps(document))
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        print(
            f"processes started: {len(group.started)}, left running: {len(left)}; elapsed "
            f"{document['elapsed_seconds']} s" + (f"; JSON: {args.out}" if args.out else ""),
            flush=True,
        )
    return 0 if ok and not left else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if platform.system() != "Linux":
        print("the benchmark reads /proc: Linux only", file=sys.stderr)
        return 2
    try:
        return uvloop.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130


if __name__ == "__main__":
    sys.exit(main())
