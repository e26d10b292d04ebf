"""Child processes of the benchmark, and what /proc says about them.

Contract:
- Every process the suite starts goes through one ``ProcessGroup``: long-lived ones with
  ``start`` (stdout and stderr to files in the group's work dir), short-lived ones with
  ``run`` (output captured, killed by pid on timeout). Grandchildren that matter (nginx
  workers) are recorded with ``adopt``.
- ``stop_all`` stops the long-lived ones by pid in reverse start order (SIGTERM, then
  SIGKILL after a grace period) and returns whatever is still alive afterwards, checked
  by pid *and* start time so a recycled pid is never mistaken for ours. It should be [].
- With ``pin`` set, ``cpus`` puts a child on those CPUs (``taskset -c``, which execs, so
  the pid is the program's own); without it, ``cpus`` is ignored.
- The /proc readers take a pid and raise ``OSError`` if it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Started:
    """One process the group started or adopted: its pid and /proc start time."""

    name: str
    pid: int
    start_time: int


@dataclass(slots=True)
class Proc:
    """A long-lived child started by ``ProcessGroup.start``."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


@dataclass(frozen=True, slots=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass(slots=True)
class ProcessGroup:
    """Starts, tracks and stops the suite's processes; see the module docstring."""

    workdir: Path
    pin: bool = True
    procs: list[Proc] = field(default_factory=list)
    started: list[Started] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        """Start ``argv`` in the background; it dies with the suite (PR_SET_PDEATHSIG)."""
        stdout_path = self.workdir / f"{name}.stdout"
        stderr_path = self.workdir / f"{name}.stderr"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            popen = subprocess.Popen(
                self._argv(argv, cpus), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None, cwd=cwd,
                preexec_fn=_die_with_parent, start_new_session=True,  # noqa: PLW1509 (1 call, no locks)
            )  # fmt: skip
        proc = Proc(name, popen, stdout_path, stderr_path)
        self.procs.append(proc)
        self._record(name, popen.pid)
        return proc

    def adopt(self, name: str, pid: int) -> None:
        """Remember a grandchild (e.g. an nginx worker) so ``stop_all`` checks it is gone."""
        self._record(name, pid)

    async def run(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: str | None = None,
        time_limit: float = 60.0,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> RunResult:
        """Run a short command to completion; killed by pid if it outlives ``time_limit``."""
        process = await asyncio.create_subprocess_exec(
            *self._argv(argv, cpus), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None, cwd=cwd,
        )  # fmt: skip
        self._record(name, process.pid)
        try:
            async with asyncio.timeout(time_limit):
                out, err = await process.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            await process.wait()
            raise
        assert process.returncode is not None
        return RunResult(
            process.returncode, out.decode(errors="replace"), err.decode(errors="replace")
        )

    def stop(self, proc: Proc, *, grace: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal ``proc`` by pid, wait up to ``grace`` seconds, then SIGKILL. Its exit code."""
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=grace)
        return proc.popen.returncode

    def stop_all(self) -> list[Started]:
        """Stop every long-lived child, newest first; return what is still alive (if any)."""
        for proc in reversed(self.procs):
            self.stop(proc)
        deadline = time.monotonic() + 5.0
        while (left := self.left_running()) and time.monotonic() < deadline:
            time.sleep(0.05)  # adopted grandchildren exit a moment after their parent
        for item in left:  # last resort, still by pid and only if it is really ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(item.pid, signal.SIGKILL)
        return self.left_running()

    def left_running(self) -> list[Started]:
        return [s for s in self.started if _start_time(s.pid) == s.start_time]

    def _argv(self, argv: Sequence[str], cpus: str | None) -> list[str]:
        if self.pin and cpus is not None and shutil.which("taskset"):
            return ["taskset", "-c", cpus, *argv]
        return list(argv)

    def _record(self, name: str, pid: int) -> None:
        start = _start_time(pid)
        if start is not None:
            self.started.append(Started(name, pid, start))


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork


def _die_with_parent() -> None:
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


# ---------------------------------------------------------------------------------------
# Ready lines
# ---------------------------------------------------------------------------------------


async def ready_line(proc: Proc, *, time_limit: float = 30.0) -> dict[str, Any]:
    """The ready line of ``proc``: the first stdout line that is a JSON object whose
    ``event`` is ``"ready"`` (other output, such as an access log, may follow it).

    Raises:
        RuntimeError: the process exited, or printed no ready line in time (stderr included).
    """
    deadline = time.monotonic() + time_limit
    while time.monotonic() < deadline:
        with proc.stdout_path.open("rb") as out:
            for line in out:
                if not line.endswith(b"\n"):
                    break  # still being written
                with contextlib.suppress(ValueError):
                    data = json.loads(line)
                    if isinstance(data, dict) and data.get("event") == "ready":
                        return data
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited ({proc.popen.returncode}): {proc.stderr_tail()}"
            )
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{proc.name} printed no ready line in {time_limit} s: {proc.stderr_tail()}")


async def wait_listening(host: str, port: int, *, proc: Proc, time_limit: float = 15.0) -> None:
    """Wait until ``host:port`` accepts a TCP connection (for servers with no ready line)."""
    deadline = time.monotonic() + time_limit
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited: {proc.stderr_tail()}")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise RuntimeError(f"{proc.name} is not listening on {host}:{port}: {proc.stderr_tail()}")


def system_binary(name: str, *, package: str) -> str:
    """The path of Debian's ``name`` (on PATH, or in /usr/sbin, which a user's PATH may
    lack); an error naming ``package`` if it is not installed."""
    found = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if found is None:
        raise RuntimeError(f"{name} is not installed (Debian: apt-get install {package})")
    return found


def free_port(host: str) -> int:
    """A TCP port that was free on ``host`` a moment ago (for servers that need one given)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------
# /proc
# ---------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[19])  # field 22, starttime
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the whole process (all threads) so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15


def cpu_seconds_of(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def run_seconds_of(pids: Sequence[int]) -> float:
    """Time the processes' live threads have spent on a CPU, to the nanosecond
    (``/proc/PID/task/TID/schedstat``): for runs too short for ``cpu_seconds``' clock
    ticks (10 ms)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def cpu_seconds_with_children(pid: int) -> float:
    """Like ``cpu_seconds``, plus the CPU of its children that it has reaped."""
    fields = _stat_fields(pid)
    return sum(int(f) for f in fields[11:15]) / CLOCK_TICKS  # fields 14 to 17


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all CPUs (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


@dataclass(slots=True)
class OtherLoad:
    """How busy the machine was with work that is not the suite's, over an interval.

    The suite's CPU is this process and every process the group started that is still
    alive, each with its reaped children (so finished wrk runs and stopped replicas
    count as ours); everything else the CPUs did is other load.
    """

    group: ProcessGroup
    wall: float = 0.0
    busy: float = 0.0
    steal: float = 0.0
    ours: float = 0.0

    def start(self) -> None:
        self.wall = time.monotonic()
        self.busy, self.steal = machine_cpu_seconds()
        self.ours = self._ours()

    def cpus_busy(self) -> tuple[float, float]:
        """(CPUs busy with other processes, CPUs stolen by the hypervisor) since ``start``."""
        wall = time.monotonic() - self.wall
        busy, steal = machine_cpu_seconds()
        other = (busy - self.busy) - (self._ours() - self.ours)
        return max(0.0, other / wall), (steal - self.steal) / wall

    def _ours(self) -> float:
        total = cpu_seconds_with_children(os.getpid())
        for item in self.group.started:
            if _start_time(item.pid) == item.start_time:
                with contextlib.suppress(OSError):
                    total += cpu_seconds_with_children(item.pid)
        return total


def status_kib(pid: int, name: str) -> int:
    """A ``kB`` field of /proc/PID/status, e.g. ``VmRSS`` or ``VmHWM``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.split()[0])
    raise OSError(f"/proc/{pid}/status has no {name}")


def rss_kib(pid: int) -> int:
    return status_kib(pid, "VmRSS")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > clear_refs``); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Put every thread of ``pid`` on ``cpus`` (a thread that vanished meanwhile is skipped)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cpus)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_files_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of ``pid`` (from /proc/PID/limits)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise OSError(f"/proc/{pid}/limits has no open-files line")


def raise_open_files_limit() -> int:
    """Raise this process's soft fd limit to its hard limit (children inherit it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
