"""Debouncing: gather items that change in a burst and release them together.

Pure logic with an injected clock (every method takes ``now``, from ``time.monotonic()`` in real
use): no threads, no sleeps, so it is tested alone. A batch is due when no item was added for
``quiet_period_s`` (the burst is over) and every item is *settled*, or when ``max_delay_s`` has
passed since its first item (a burst that never settles still gets through).

An item is settled unless its latest addition said otherwise: a file whose last event was a write,
with no close event yet, is still being written, so the quiet period alone does not release it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


@dataclass(frozen=True)
class Batch(Generic[T]):
    """Items released together, with when the first and the last were added."""

    items: frozenset[T]
    first_added: float
    last_added: float


class Debouncer(Generic[T]):
    """Collects items into a set until the burst that brought them is over.

    Args:
        quiet_period_s: how long no new item must arrive before the batch is due.
        max_delay_s: the ceiling: a batch is due this long after its first item, however busy.

    Raises:
        ValueError: a negative quiet period, or a ceiling shorter than the quiet period.
    """

    def __init__(self, *, quiet_period_s: float, max_delay_s: float) -> None:
        if quiet_period_s < 0:
            raise ValueError(f"quiet_period_s must not be negative, not {quiet_period_s!r}")
        if max_delay_s < quiet_period_s:
            raise ValueError(
                f"max_delay_s ({max_delay_s!r}) must be at least "
                f"quiet_period_s ({quiet_period_s!r})"
            )
        self.quiet_period_s = quiet_period_s
        self.max_delay_s = max_delay_s
        self._items: dict[T, bool] = {}  # item -> settled
        self._first = 0.0
        self._last = 0.0

    @property
    def is_empty(self) -> bool:
        return not self._items

    def add(self, item: T, *, now: float, is_settled: bool = True) -> None:
        """Add ``item`` (again): the quiet period starts over, the ceiling does not.

        Args:
            item: what changed.
            now: the current time.
            is_settled: ``False`` holds the batch back (up to the ceiling) until ``item`` is
                added again settled, e.g. a file written to but not closed yet.
        """
        if not self._items:
            self._first = self._last = now
        else:
            self._last = max(self._last, now)
        self._items[item] = is_settled

    def due_at(self) -> float | None:
        """When the batch becomes due, or ``None`` when there is nothing to release."""
        if not self._items:
            return None
        ceiling = self._first + self.max_delay_s
        if not all(self._items.values()):
            return ceiling
        return min(self._last + self.quiet_period_s, ceiling)

    def time_until_due(self, *, now: float) -> float | None:
        """Seconds from ``now`` until the batch is due (0 when it is), ``None`` when empty."""
        due = self.due_at()
        return None if due is None else max(0.0, due - now)

    def take_due(self, *, now: float) -> Batch[T] | None:
        """Release the batch if it is due at ``now``; otherwise keep gathering, return ``None``."""
        due = self.due_at()
        if due is None or now < due:
            return None
        batch = Batch(frozenset(self._items), self._first, self._last)
        self._items.clear()
        return batch
