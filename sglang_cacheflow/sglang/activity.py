"""When I/O beside the forwards was under way. A forward that ran while a tier call was in
flight shared the machine with it (on a CPU server, its cores; everywhere, memory
bandwidth), so calibration does not take it for a forward that ran alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Activity"]


class Activity:
    """Work in flight on other threads (thread-safe): :meth:`begin` and :meth:`end` around
    each piece, or :meth:`running`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = 0
        self._idle_at = float("-inf")  # perf_counter() when the last piece ended

    def begin(self) -> None:
        with self._lock:
            self._busy += 1

    def end(self) -> None:
        with self._lock:
            self._busy -= 1
            self._idle_at = time.perf_counter()

    @contextmanager
    def running(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        finally:
            self.end()

    def busy_since(self, t: float) -> bool:
        """Whether work was under way at some time since ``t`` (``perf_counter()``)."""
        with self._lock:
            return self._busy > 0 or self._idle_at > t
