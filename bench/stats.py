"""Summaries of samples: percentiles and medians. Pure.

Percentiles use the nearest-rank method on the sorted samples (no interpolation), so
every reported value is one that was measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Latency-style summary, in the unit of the samples given (the bench uses ms)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float

    def minus(self, other: Percentiles) -> Percentiles:
        """Percentile by percentile difference (``self - other``), e.g. added latency."""
        return Percentiles(
            count=min(self.count, other.count),
            p50=self.p50 - other.p50,
            p90=self.p90 - other.p90,
            p99=self.p99 - other.p99,
            max=self.max - other.max,
        )


def percentile(sorted_samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted samples (0 < fraction <= 1)."""
    if not sorted_samples:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_samples)))
    return sorted_samples[rank - 1]


def summarize(samples: Sequence[float], *, scale: float = 1.0) -> Percentiles:
    """p50/p90/p99/max of ``samples`` multiplied by ``scale`` (e.g. 1000 for s -> ms)."""
    ordered = sorted(s * scale for s in samples)
    return Percentiles(
        count=len(ordered),
        p50=percentile(ordered, 0.50),
        p90=percentile(ordered, 0.90),
        p99=percentile(ordered, 0.99),
        max=ordered[-1] if ordered else math.nan,
    )


def median_of(runs: Sequence[Percentiles]) -> Percentiles:
    """Field by field median over runs (robust to one run hit by outside load)."""
    return Percentiles(
        count=sum(r.count for r in runs),
        p50=median([r.p50 for r in runs]),
        p90=median([r.p90 for r in runs]),
        p99=median([r.p99 for r in runs]),
        max=median([r.max for r in runs]),
    )


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan
