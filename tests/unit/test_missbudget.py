"""The per-client miss budget (gateway/missbudget.py), driven by a fake clock."""

from __future__ import annotations

import pytest

from gateway.missbudget import MISS_CODES, MissBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_spent_after_the_budget_until_the_window_ends() -> None:
    """A client is limited after N misses and free again once its window has passed."""
    clock = Clock()
    budget = MissBudget(3, 60.0, clock=clock)
    for _ in range(3):
        assert not budget.spent("1.2.3.4")
        budget.miss("1.2.3.4")
    assert budget.spent("1.2.3.4")
    assert not budget.spent("5.6.7.8")
    clock.now += 59.9
    assert budget.spent("1.2.3.4")
    clock.now += 0.1
    assert not budget.spent("1.2.3.4")
    budget.miss("1.2.3.4")
    assert not budget.spent("1.2.3.4")


def test_zero_disables() -> None:
    """misses_per_window 0 or window 0: never spent, nothing tracked."""
    for budget in (MissBudget(0, 60.0), MissBudget(5, 0.0)):
        for _ in range(100):
            budget.miss("a")
        assert not budget.enabled
        assert not budget.spent("a")
        assert len(budget) == 0


def test_memory_bounded_oldest_forgotten() -> None:
    """Past max_clients the client whose window started first is forgotten."""
    clock = Clock()
    budget = MissBudget(1, 60.0, max_clients=100, clock=clock)
    for i in range(1000):
        clock.now += 0.001
        budget.miss(f"10.0.{i // 256}.{i % 256}")
    assert len(budget) == 100
    assert not budget.spent("10.0.0.0")  # forgotten: a fresh budget
    assert budget.spent("10.0.3.231")  # the last one (i = 999) is still tracked


def test_rejects_negative_settings() -> None:
    """Negative limits are programming errors."""
    with pytest.raises(ValueError):
        MissBudget(-1, 1.0)
    with pytest.raises(ValueError):
        MissBudget(1, 1.0, max_clients=0)


def test_miss_codes_are_the_two_scanner_answers() -> None:
    """Only 'no such sandbox' and 'port not exposed' count (DESIGN.md section 5)."""
    assert frozenset({"sandbox_not_found", "port_not_exposed"}) == MISS_CODES
