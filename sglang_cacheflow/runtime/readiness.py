"""Readiness of a request's evicted KV, per (layer, token): what compute may read yet.

Every cell of the evicted span ``[start, end)`` x layers starts *pending* and is owned by the
plan step that restores it. I/O workers mark the cells of a finished load *ready* or
*failed* (a miss, a corrupt page, a dead tier); the compute worker marks what it recomputes
and what it repairs. :meth:`Readiness.wait` blocks until no cell of a range is pending and
returns which of them failed, so a forward waits only for the layer and tokens it reads.
"""

from __future__ import annotations

import threading
import time

import numpy as np

PENDING, READY, FAILED, REPAIRED = 0, 1, 2, 3


class RestoreStalledError(RuntimeError):
    """Compute needs cells that only a later compute step produces (a plan the executor
    cannot run in order), or a load did not finish in time."""


class Readiness:
    """Cell states of one request's evicted span."""

    def __init__(self, num_layers: int, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.state = np.zeros((num_layers, end - start), dtype=np.int8)
        self.compute_owned = np.zeros((num_layers, end - start), dtype=bool)
        self.cond = threading.Condition()
        self.last_ready = 0.0  # perf_counter time the last cell became ready or repaired

    def own(self, a: int, b: int, l0: int, l1: int) -> None:
        """Cells ``[a, b) x [l0, l1)`` are produced by a compute step."""
        self.compute_owned[l0:l1, a - self.start : b - self.start] = True

    def mark(self, a: int, b: int, l0: int, l1: int, status: int) -> None:
        with self.cond:
            self.state[l0:l1, a - self.start : b - self.start] = status
            if status in (READY, REPAIRED):
                self.last_ready = time.perf_counter()
            self.cond.notify_all()

    def wait(self, layer: int, a: int, b: int, timeout_s: float = 600.0) -> np.ndarray:
        """Block until no cell of tokens ``[a, b)`` at ``layer`` is pending; return the
        failed mask over ``[a, b)``."""
        a = max(a, self.start)
        b = min(b, self.end)
        if a >= b:
            return np.zeros(0, dtype=bool)
        lo, hi = a - self.start, b - self.start
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                row = self.state[layer, lo:hi]
                pending = row == PENDING
                if not pending.any():
                    return row == FAILED
                if (pending & self.compute_owned[layer, lo:hi]).any():
                    first = lo + int(np.argmax(pending & self.compute_owned[layer, lo:hi]))
                    raise RestoreStalledError(
                        f"layer {layer} of token {self.start + first} is read before the "
                        "compute step that restores it has run"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RestoreStalledError(
                        f"loads of tokens [{a}, {b}) at layer {layer} did not finish "
                        f"in {timeout_s}s"
                    )
                self.cond.wait(left)

    def failed_runs(self, layer: int, a: int, b: int, failed: np.ndarray) -> list[tuple[int, int]]:
        """Maximal runs ``[x, y)`` (absolute) of ``failed`` (a mask over ``[a', b')``, the
        range clipped to the span as :meth:`wait` clips it)."""
        a = max(a, self.start)
        runs: list[tuple[int, int]] = []
        idx = np.flatnonzero(failed)
        if idx.size == 0:
            return runs
        breaks = np.flatnonzero(np.diff(idx) > 1)
        starts = np.concatenate([[idx[0]], idx[breaks + 1]])
        ends = np.concatenate([idx[breaks], [idx[-1]]]) + 1
        return [(a + int(s), a + int(e)) for s, e in zip(starts, ends, strict=True)]

    def failed_layers(self, a: int, b: int, upto: int) -> list[int]:
        """Layers ``<= upto`` where some cell of ``[a, b)`` failed."""
        with self.cond:
            block = self.state[: upto + 1, a - self.start : b - self.start] == FAILED
        return [int(i) for i in np.flatnonzero(block.any(axis=1))]

    def set_failed(self, layer: int, a: int, b: int) -> None:
        """Mark cells failed (used when another TP rank lost them)."""
        self.mark(a, b, layer, layer + 1, FAILED)

    def all_done(self) -> bool:
        with self.cond:
            return not (self.state == PENDING).any()
