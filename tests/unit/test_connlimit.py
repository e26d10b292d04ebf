"""The per-sandbox connection limiter's counting (gateway/proxy/connlimit.py)."""

from __future__ import annotations

import pytest

from gateway import errors
from gateway.proxy.connlimit import ConnectionLimiter, effective_limit


def test_record_overrides_the_default_and_zero_is_unlimited() -> None:
    """The record's connections wins; without it the default applies; negatives mean none."""
    assert effective_limit({"connections": 20}, 1000) == 20
    assert effective_limit({}, 1000) == 1000
    assert effective_limit({"other": 3}, 7) == 7
    assert effective_limit({"connections": -5}, 7) == 0


def test_slots_are_counted_per_label_and_given_back() -> None:
    """A label at its limit is refused; another label is not; a release frees a slot."""
    limiter = ConnectionLimiter()
    assert limiter.try_acquire("a", 2) and limiter.try_acquire("a", 2)
    assert not limiter.try_acquire("a", 2)
    assert limiter.try_acquire("b", 2)
    limiter.release("a")
    assert limiter.open_count("a") == 1
    assert limiter.try_acquire("a", 2)
    for _ in range(2):
        limiter.release("a")
    limiter.release("b")
    assert limiter.open_count("a") == limiter.open_count("b") == 0


def test_zero_limit_never_refuses() -> None:
    """Limit 0 counts but never refuses."""
    limiter = ConnectionLimiter()
    assert all(limiter.try_acquire("a", 0) for _ in range(10_000))
    assert limiter.open_count("a") == 10_000


def test_hold_raises_rate_limited_and_releases_on_exit() -> None:
    """hold() raises RateLimited over the limit and frees its slot even on an exception."""
    limiter = ConnectionLimiter()
    with limiter.hold("a", 1, port=3000):
        with pytest.raises(errors.RateLimited) as caught, limiter.hold("a", 1):
            pass
        assert caught.value.status == 429
    with pytest.raises(RuntimeError), limiter.hold("a", 1):
        raise RuntimeError("boom")
    assert limiter.open_count("a") == 0
