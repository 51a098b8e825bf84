"""LayerClock: what a forward spends outside its layer loop, from hooks on real modules."""

import time
from types import SimpleNamespace

import torch

from sglang_cacheflow.sglang.layer_clock import layer_clock


class _Stack(torch.nn.Module):
    """A model's layer stack as SGLang's Llama keeps it: ``layers`` and an ``end_layer``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(6))
        self.end_layer = 6

    def forward(self, x: torch.Tensor, outside_s: float) -> torch.Tensor:
        time.sleep(outside_s)  # embedding, batch set-up
        for layer in self.layers[: self.end_layer]:
            x = layer(x)
        time.sleep(outside_s)  # logits
        return x


def _timed(stack: _Stack, clock, outside_s: float) -> tuple[float, float | None]:
    clock.reset()
    start = time.perf_counter()
    stack(torch.ones(8, 64), outside_s)
    elapsed = time.perf_counter() - start
    return elapsed, clock.outside(elapsed)


def test_the_time_outside_the_layer_loop_is_measured_whatever_layers_run() -> None:
    stack = _Stack()
    clock = layer_clock(stack, "cpu")
    assert clock is not None and layer_clock(stack, "cpu") is clock  # installed once
    for end in (6, 2, 1):
        stack.end_layer = end
        elapsed, outside = _timed(stack, clock, 0.02)
        assert outside is not None
        assert 0.04 <= outside <= elapsed  # both sleeps, never more than the forward


def test_nothing_is_measured_without_a_layer_or_off_a_cpu_engine() -> None:
    stack = _Stack()
    clock = layer_clock(stack, "cpu")
    clock.reset()
    assert clock.outside(0.1) is None
    assert layer_clock(_Stack(), "cuda") is None
    assert layer_clock(None, "cpu") is None
    assert layer_clock(SimpleNamespace(), "cuda") is None
