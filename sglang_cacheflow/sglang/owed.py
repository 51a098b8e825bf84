"""Seconds of planned work each shared resource (``compute``, each tier) still owes.

Requests that return together reach the scheduler one or two per round, so each round plans
behind what earlier rounds' restores still owe (docs/sglang.md, "Batch-aware planning").
Time is read from an injectable clock, so tests move it without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


class OwedWork:
    """What each resource owes, running down as the clock moves."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._owed: dict[str, float] = {}
        self._at = 0.0

    def busy(self, now: float | None = None) -> dict[str, float]:
        """Seconds each resource still owes at ``now`` (default: the clock's time)."""
        gone = (self.clock() if now is None else now) - self._at
        return {k: v - gone for k, v in self._owed.items() if v > gone}

    def add(self, work: Mapping[str, float], now: float) -> None:
        """A restore was admitted: its planned ``work`` is owed on top of what was."""
        owed = self.busy(now)
        for k, v in work.items():
            owed[k] = owed.get(k, 0.0) + v
        self._owed, self._at = owed, now

    def set(self, owed: Mapping[str, float], now: float) -> None:
        """A plan of the whole round replaces what was owed (it planned behind it)."""
        self._owed, self._at = dict(owed), now

    def clear(self) -> None:
        """Every planned restore has run: nothing is owed, whatever was predicted."""
        self._owed = {}
