"""Debouncer: pure logic driven by an injected clock (no sleeps)."""

from __future__ import annotations

import pytest

from hotpatch.watch.debounce import Debouncer


def make(quiet: float = 0.02, ceiling: float = 0.5) -> Debouncer[str]:
    return Debouncer(quiet_period_s=quiet, max_delay_s=ceiling)


def test_empty_debouncer_has_nothing_due() -> None:
    d = make()
    assert d.is_empty
    assert d.due_at() is None
    assert d.time_until_due(now=10.0) is None
    assert d.take_due(now=10.0) is None


def test_single_item_is_due_after_the_quiet_period() -> None:
    d = make()
    d.add("a.py", now=1.0)
    assert d.time_until_due(now=1.0) == pytest.approx(0.02)
    assert d.take_due(now=1.019) is None
    batch = d.take_due(now=1.02)
    assert batch is not None
    assert batch.items == frozenset({"a.py"})
    assert (batch.first_added, batch.last_added) == (1.0, 1.0)
    assert d.is_empty


def test_each_new_event_restarts_the_quiet_period() -> None:
    d = make()
    d.add("a.py", now=1.0)
    d.add("a.py", now=1.015)
    d.add("b.py", now=1.03)
    assert d.take_due(now=1.045) is None
    batch = d.take_due(now=1.05)
    assert batch is not None
    assert batch.items == frozenset({"a.py", "b.py"})
    assert batch.first_added == 1.0


def test_the_ceiling_releases_a_burst_that_never_settles() -> None:
    d = make(quiet=0.02, ceiling=0.1)
    now = 0.0
    d.add("a.py", now=now)
    while now < 0.09:
        now += 0.01
        d.add(f"{now:.2f}.py", now=now)
        assert d.take_due(now=now) is None
    assert d.time_until_due(now=now) == pytest.approx(0.01)
    batch = d.take_due(now=0.1)
    assert batch is not None
    assert len(batch.items) == 10


def test_a_new_batch_starts_its_own_ceiling() -> None:
    d = make(quiet=0.02, ceiling=0.1)
    d.add("a.py", now=0.0)
    assert d.take_due(now=0.5) is not None
    d.add("b.py", now=1.0)
    assert d.due_at() == pytest.approx(1.02)


def test_out_of_order_timestamps_do_not_move_the_quiet_period_back() -> None:
    d = make()
    d.add("a.py", now=2.0)
    d.add("b.py", now=1.99)
    assert d.due_at() == pytest.approx(2.02)


def test_zero_quiet_period_is_due_at_once() -> None:
    d = make(quiet=0.0, ceiling=0.0)
    d.add("a.py", now=3.0)
    assert d.time_until_due(now=3.0) == 0.0
    assert d.take_due(now=3.0) is not None


@pytest.mark.parametrize(("quiet", "ceiling"), [(-0.1, 1.0), (0.2, 0.1)])
def test_invalid_settings_are_refused(quiet: float, ceiling: float) -> None:
    with pytest.raises(ValueError, match="quiet_period_s"):
        Debouncer[str](quiet_period_s=quiet, max_delay_s=ceiling)


def test_an_unsettled_item_holds_the_batch_until_it_settles() -> None:
    d = make(quiet=0.02, ceiling=0.5)
    d.add("a.py", now=1.0, is_settled=False)  # written, not closed yet
    assert d.take_due(now=1.1) is None
    d.add("a.py", now=1.2)  # closed
    assert d.take_due(now=1.21) is None
    batch = d.take_due(now=1.22)
    assert batch is not None
    assert batch.items == frozenset({"a.py"})


def test_an_item_that_never_settles_is_released_at_the_ceiling() -> None:
    d = make(quiet=0.02, ceiling=0.5)
    d.add("a.py", now=1.0, is_settled=False)
    d.add("b.py", now=1.01)
    assert d.due_at() == pytest.approx(1.5)
    assert d.take_due(now=1.49) is None
    assert d.take_due(now=1.5) is not None
