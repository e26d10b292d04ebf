"""Prometheus metrics, fed by the per-request accounting record.

Every metric is declared here, with labels from closed sets only (kind, outcome, status
class, the gateway's own error codes): never a sandbox id, label or port, so cardinality
cannot grow with tenants. The hot path only bumps plain integers in ``observe``; the
Prometheus families are built at scrape time by ``collect`` (prometheus-client's own
metric objects take a lock and a label lookup per update).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from gateway.proxy.accounting import RequestRecord

# Seconds; spans a loopback hop (sub-millisecond) to a slow dev server's first compile.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

Gauge = Callable[[], float]


@dataclass(slots=True)
class _Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            cumulative.append((_bound(bound), running))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=self.total)


class Metrics:
    """The gateway's metrics; ``observe`` is the accounting sink, ``render`` the scrape."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, str], int] = {}
        self._errors: dict[str, int] = {}
        self._bytes_in = 0
        self._bytes_out = 0
        self._request_seconds = _Histogram()
        self._upstream_seconds = _Histogram()
        self._gauges: dict[str, tuple[str, Gauge]] = {}
        self._counters: dict[str, tuple[str, Gauge]] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe(self, record: RequestRecord) -> None:
        key = (record.kind, record.outcome, f"{record.status // 100}xx")
        self._requests[key] = self._requests.get(key, 0) + 1
        if record.code:
            self._errors[record.code] = self._errors.get(record.code, 0) + 1
        self._bytes_in += record.bytes_in
        self._bytes_out += record.bytes_out
        self._request_seconds.observe(record.total_seconds)
        if record.upstream_seconds is not None:
            self._upstream_seconds.observe(record.upstream_seconds)

    def gauge(self, name: str, documentation: str, read: Gauge) -> None:
        """Report ``read()`` at every scrape as gauge ``name``."""
        self._gauges[name] = (documentation, read)

    def counter(self, name: str, documentation: str, read: Gauge) -> None:
        """Report ``read()`` (a monotonic count kept elsewhere) as counter ``name``."""
        self._counters[name] = (documentation, read)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "gateway_requests", "Requests and WebSocket sessions by outcome and status class",
            labels=["kind", "outcome", "code_class"],
        )  # fmt: skip
        for (kind, outcome, code_class), count in sorted(self._requests.items()):
            requests.add_metric([kind, outcome, code_class], count)
        yield requests
        errors = CounterMetricFamily(
            "gateway_errors",
            "The gateway's own answers and aborts, by stable code",
            labels=["code"],
        )
        for code, count in sorted(self._errors.items()):
            errors.add_metric([code], count)
        yield errors
        transferred = CounterMetricFamily(
            "gateway_body_bytes", "Body bytes relayed", labels=["direction"]
        )
        transferred.add_metric(["in"], self._bytes_in)
        transferred.add_metric(["out"], self._bytes_out)
        yield transferred
        yield self._request_seconds.family("gateway_request_seconds", "Time in the gateway")
        yield self._upstream_seconds.family(
            "gateway_upstream_response_seconds", "Request sent to sandbox response head received"
        )
        for name, (documentation, read) in self._counters.items():
            yield CounterMetricFamily(name, documentation, value=read())
        for name, (documentation, read) in self._gauges.items():
            yield GaugeMetricFamily(name, documentation, value=read())


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)
