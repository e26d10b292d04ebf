"""Prometheus metrics, fed by the per-request accounting record.

Every metric is declared here, with labels from closed sets only (kind, outcome, status
class, the gateway's own error codes): never a sandbox id, label or port, so cardinality
cannot grow with tenants. The hot path only bumps plain integers in ``observe``; the
Prometheus families are built at scrape time by ``collect`` (prometheus-client's own
metric objects take a lock and a label lookup per update).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from gateway.proxy.accounting import RequestRecord

# Seconds; spans a loopback hop (sub-millisecond) to a slow dev server's first compile.
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

# "0xx" to "9xx" by status // 100: a lookup, where an f-string per request builds one.
_STATUS_CLASSES: Final = tuple(f"{n}xx" for n in range(10))

Gauge = Callable[[], float]
PUBLISH_SECONDS = 1.0


@dataclass(slots=True)
class _Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        # A scan up from the smallest bound, where bisect.bisect_left is a generic call:
        # most requests land in the first two buckets (bisect_left's index all the same).
        index = 0
        for bound in self.buckets:
            if value <= bound:
                break
            index += 1
        self.counts[index] += 1
        self.total += value


class Metrics:
    """The gateway's metrics; ``observe`` is the accounting sink, ``render`` the scrape."""

    def __init__(self) -> None:
        # (kind, outcome, status class) -> a one-item list, the count: the last key's
        # list is kept beside, so a repeat (most requests) costs no tuple and no lookup.
        self._requests: dict[tuple[str, str, str], list[int]] = {}
        self._last_key = ("", "", "")
        self._last_count = [0]
        self._errors: dict[str, int] = {}
        self._bytes_in = 0
        self._bytes_out = 0
        self._request_seconds = _Histogram()
        self._upstream_seconds = _Histogram()
        self._gauges: dict[str, tuple[str, Gauge]] = {}
        self._counters: dict[str, tuple[str, Gauge]] = {}
        self._histograms: dict[str, tuple[str, _Histogram]] = {}
        self._group_dir: Path | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe(self, record: RequestRecord) -> None:
        status = record.status
        known = 0 <= status < 1000
        status_class = _STATUS_CLASSES[status // 100] if known else f"{status // 100}xx"
        kind, outcome, last = record.kind, record.outcome, self._last_key
        if kind == last[0] and outcome == last[1] and status_class == last[2]:
            self._last_count[0] += 1
        else:
            key = (kind, outcome, status_class)
            count = self._requests.get(key)
            if count is None:
                count = self._requests[key] = [0]
            count[0] += 1
            self._last_key, self._last_count = key, count
        if record.code:
            self._errors[record.code] = self._errors.get(record.code, 0) + 1
        self._bytes_in += record.bytes_in
        self._bytes_out += record.bytes_out
        self._request_seconds.observe(record.total_seconds)
        if record.upstream_seconds is not None:
            self._upstream_seconds.observe(record.upstream_seconds)

    def histogram(self, name: str, documentation: str) -> Callable[[float], None]:
        """Declare histogram ``name`` (seconds); returns its ``observe`` function."""
        histogram = _Histogram()
        self._histograms[name] = (documentation, histogram)
        return histogram.observe

    def gauge(self, name: str, documentation: str, read: Gauge) -> None:
        """Report ``read()`` at every scrape as gauge ``name``."""
        self._gauges[name] = (documentation, read)

    def counter(self, name: str, documentation: str, read: Gauge) -> None:
        """Report ``read()`` (a monotonic count kept elsewhere) as counter ``name``."""
        self._counters[name] = (documentation, read)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # Process groups ---------------------------------------------------------------------
    # With ``--workers N`` every worker publishes a snapshot of its figures to a shared
    # directory once a second, and a scrape of any worker reports the sum over the group
    # (other workers' figures are then up to ``PUBLISH_SECONDS`` old).

    def snapshot(self) -> dict[str, Any]:
        """This process's figures as plain JSON-able data."""
        return {
            "requests": [[*key, count[0]] for key, count in self._requests.items()],
            "errors": dict(self._errors),
            "bytes": [self._bytes_in, self._bytes_out],
            "request_seconds": [list(self._request_seconds.counts), self._request_seconds.total],
            "upstream_seconds": [list(self._upstream_seconds.counts), self._upstream_seconds.total],
            "counters": {name: read() for name, (_, read) in self._counters.items()},
            "gauges": {name: read() for name, (_, read) in self._gauges.items()},
            "histograms": {
                name: [list(h.counts), h.total] for name, (_, h) in self._histograms.items()
            },
        }

    async def publish(self, directory: Path) -> None:
        """Write this process's snapshot to ``directory`` for ever; removed when cancelled."""
        path = directory / f"{os.getpid()}.json"
        self._group_dir = directory
        try:
            while True:
                # A few hundred bytes to a local file once a second: not worth a thread.
                self._write_snapshot(path)
                await asyncio.sleep(PUBLISH_SECONDS)
        finally:
            path.unlink(missing_ok=True)

    def _write_snapshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.snapshot()))
        temporary.replace(path)

    def collect(self) -> Iterator[Metric]:
        state = self.snapshot()
        if self._group_dir is not None:
            for other in _other_snapshots(self._group_dir):
                _add(state, other)
        yield from self._families(state)

    def _families(self, state: dict[str, Any]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "gateway_requests", "Requests and WebSocket sessions by outcome and status class",
            labels=["kind", "outcome", "code_class"],
        )  # fmt: skip
        for kind, outcome, code_class, count in sorted(state["requests"]):
            requests.add_metric([kind, outcome, code_class], count)
        yield requests
        errors = CounterMetricFamily(
            "gateway_errors",
            "The gateway's own answers and aborts, by stable code",
            labels=["code"],
        )
        for code, count in sorted(state["errors"].items()):
            errors.add_metric([code], count)
        yield errors
        transferred = CounterMetricFamily(
            "gateway_body_bytes", "Body bytes relayed", labels=["direction"]
        )
        transferred.add_metric(["in"], state["bytes"][0])
        transferred.add_metric(["out"], state["bytes"][1])
        yield transferred
        yield _histogram_family(
            "gateway_request_seconds", "Time in the gateway", *state["request_seconds"]
        )
        yield _histogram_family(
            "gateway_upstream_response_seconds",
            "Request sent to sandbox response head received",
            *state["upstream_seconds"],
        )
        for name, (documentation, _) in self._histograms.items():
            yield _histogram_family(name, documentation, *state["histograms"][name])
        for name, (documentation, _) in self._counters.items():
            yield CounterMetricFamily(name, documentation, value=state["counters"].get(name, 0))
        for name, (documentation, _) in self._gauges.items():
            yield GaugeMetricFamily(name, documentation, value=state["gauges"].get(name, 0))


def _histogram_family(
    name: str, documentation: str, counts: list[int], total: float
) -> HistogramMetricFamily:
    cumulative, running = [], 0
    for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
        running += count
        cumulative.append((_bound(bound), running))
    return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=total)


def _other_snapshots(directory: Path) -> Iterator[dict[str, Any]]:
    for path in directory.glob("*.json"):
        pid = int(path.stem) if path.stem.isdigit() else 0
        if pid == os.getpid() or not _alive(pid):
            continue
        try:
            yield json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced, or a worker that just stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _add(into: dict[str, Any], other: dict[str, Any]) -> None:
    requests = {tuple(row[:3]): row[3] for row in into["requests"]}
    for *key, count in other.get("requests", []):
        requests[tuple(key)] = requests.get(tuple(key), 0) + count
    into["requests"] = [[*key, count] for key, count in requests.items()]
    for code, count in other.get("errors", {}).items():
        into["errors"][code] = into["errors"].get(code, 0) + count
    into["bytes"] = [a + b for a, b in zip(into["bytes"], other.get("bytes", [0, 0]), strict=True)]
    for name in ("request_seconds", "upstream_seconds"):
        counts, total = other.get(name, [[0] * len(into[name][0]), 0.0])
        into[name] = [
            [a + b for a, b in zip(into[name][0], counts, strict=True)],
            into[name][1] + total,
        ]
    for section in ("counters", "gauges"):
        for key, value in other.get(section, {}).items():
            into[section][key] = into[section].get(key, 0) + value
    for key, (counts, total) in other.get("histograms", {}).items():
        mine = into["histograms"].get(key)
        if mine is not None:
            merged = [a + b for a, b in zip(mine[0], counts, strict=True)]
            into["histograms"][key] = [merged, mine[1] + total]


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)
