"""Timing a forward's layer loop, to measure the part of a forward outside it.

A layer split's chunk runs the span through its bottom layers only, and pays whole what a
forward spends outside the layer loop (batch set-up, embedding, logits); the cost model
charges that part apart (``ComputeCost.unlayered_s``). :class:`LayerClock` measures it on
every forward with two module hooks on each decoder layer: the time from the first layer's
start to the last layer's end is the loop, the rest of the forward is outside it. Only where
host clocks time the work: on a CPU engine; a CUDA forward's layers return before their
kernels run.
"""

from __future__ import annotations

import time
from typing import Any


class LayerClock:
    """When the layer loop of the current forward began and ended (``perf_counter``)."""

    def __init__(self, layers: Any) -> None:
        self.first: float | None = None
        self.last: float | None = None
        for layer in layers:
            layer.register_forward_pre_hook(self._begin)
            layer.register_forward_hook(self._end)

    def _begin(self, _module: Any, _args: Any) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def _end(self, _module: Any, _args: Any, _out: Any) -> None:
        self.last = time.perf_counter()

    def reset(self) -> None:
        self.first = self.last = None

    def outside(self, elapsed: float) -> float | None:
        """Seconds of a forward that took ``elapsed`` spent outside its layer loop (None if
        no layer ran since :meth:`reset`)."""
        if self.first is None or self.last is None:
            return None
        return max(0.0, elapsed - (self.last - self.first))


def layer_clock(stack: Any, device: Any) -> LayerClock | None:
    """The clock of ``stack``'s layers (installed once), or None off a CPU engine."""
    if stack is None or str(device) != "cpu":
        return None
    clock = getattr(stack, "_cacheflow_layer_clock", None)
    if clock is None:
        clock = LayerClock(stack.layers)
        stack._cacheflow_layer_clock = clock
    return clock
