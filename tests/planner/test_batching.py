"""A baseline's restores on an engine that batches prefills (SGLang): when each gets its
first token, checked against hand-computed forwards."""

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_cacheflow.planner import (
    Capabilities,
    ComputeCost,
    CostModel,
    ModelShape,
    Request,
    Span,
    TierCost,
    plan,
    validate,
)
from sglang_cacheflow.sglang.capabilities import SGLANG

from .strategies import cost_models, requests

# 1000 tokens a second, 0.1 s a forward, no attention term: a forward's time is exact
COST = CostModel(
    ModelShape(4, 2, 64, 2), ComputeCost(1000.0, 0.0, 0.1), {"redis": TierCost(1e6, 1e-3)}
)
ROUND = [Request(f"r{i}", 0, (Span("redis", 500),), 10) for i in range(4)]  # 510 tokens each


def _ttfts(batch_tokens: int, policy: str = "recompute") -> list[float]:
    caps = Capabilities(load_front=True, batch_tokens=batch_tokens)
    p = plan(ROUND, COST, policy, caps)
    validate(p, ROUND, 4)
    return [p.requests[r.id].predicted_ttft_s for r in ROUND]


def test_restores_that_fit_one_forward_get_their_first_token_together() -> None:
    # one forward of 2040 tokens: one fixed cost
    assert _ttfts(4096) == pytest.approx([0.1 + 2.04] * 4)
    # one restore per forward: served one after another, a fixed cost each
    assert _ttfts(0) == pytest.approx([0.61, 1.22, 1.83, 2.44])


def test_the_restore_over_the_budget_finishes_in_the_next_forward() -> None:
    # 1100 tokens a forward: r0, r1 and 80 tokens of r2, then r2's other 430 and r3
    first = 0.1 + 1.1
    assert _ttfts(1100) == pytest.approx([first] * 2 + [first + 0.1 + 0.94] * 2)


def test_cacheflow_keeps_its_schedule_and_loads_keep_their_times() -> None:
    # CacheFlow's executor serves one restore per forward: its plan is the same either way
    caps = Capabilities(load_front=True)
    batched = Capabilities(load_front=True, batch_tokens=4096)
    for policy in ("cacheflow", "load"):  # load: every restore waits for its own load
        a, b = plan(ROUND, COST, policy, caps), plan(ROUND, COST, policy, batched)
        assert a.to_dict()["requests"] == b.to_dict()["requests"], policy


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=requests(),
    cost=cost_models(),
    budget=st.sampled_from([16, 300, 4096]),
    policy=st.sampled_from(["recompute", "load", "cake"]),
)
def test_batched_baselines_plan_validly(reqs, cost, budget, policy) -> None:
    p = plan(reqs, cost, policy, replace(SGLANG, batch_tokens=budget))
    validate(p, reqs, cost.shape.num_layers)  # the first token not before the restore's work
