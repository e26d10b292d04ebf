"""The request counters and histograms Metrics.observe keeps (pure: records in, figures out)."""

from __future__ import annotations

from collections import Counter

from gateway.metrics import LATENCY_BUCKETS, Metrics
from gateway.proxy.accounting import RequestRecord


def _record(kind: str, outcome: str, status: int, seconds: float) -> RequestRecord:
    record = RequestRecord(request_id="r")
    record.kind, record.outcome, record.status = kind, outcome, status
    record.started, record.ended = 0.0, seconds  # total_seconds is exactly ``seconds``
    record.upstream_seconds = seconds
    return record


def test_requests_are_counted_by_kind_outcome_and_status_class_in_any_order() -> None:
    """Repeats, alternations and returns to an earlier key all land in their own count."""
    sequence = [
        ("http", "ok", 200), ("http", "ok", 204), ("http", "ok", 200), ("http", "ok", 200),
        ("websocket", "ok", 101), ("http", "client_gone", 200), ("http", "ok", 503),
        ("http", "ok", 200), ("http", "ok", 0), ("http", "ok", 1000),
    ]  # fmt: skip
    metrics = Metrics()
    for kind, outcome, status in sequence:
        metrics.observe(_record(kind, outcome, status, 0.001))
    counted = {(k, o, c): n for k, o, c, n in metrics.snapshot()["requests"]}
    expected = Counter((k, o, f"{s // 100}xx") for k, o, s in sequence)
    assert counted == dict(expected)


def test_latencies_land_in_the_first_bucket_that_holds_them() -> None:
    """A value equal to a bound counts in that bound's bucket; past the last, in +Inf."""
    metrics = Metrics()
    values = [1e-9, LATENCY_BUCKETS[0], LATENCY_BUCKETS[0] * 1.01, LATENCY_BUCKETS[-1], 1e6]
    for value in values:
        metrics.observe(_record("http", "ok", 200, value))
    counts, total = metrics.snapshot()["request_seconds"]
    assert counts[0] == 2 and counts[1] == 1 and counts[len(LATENCY_BUCKETS) - 1] == 1
    assert counts[len(LATENCY_BUCKETS)] == 1 and sum(counts) == len(values)
    assert abs(total - sum(values)) < 1e-6
