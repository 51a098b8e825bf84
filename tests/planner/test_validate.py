"""The validator accepts what the policies emit and rejects each kind of broken plan."""

from dataclasses import replace

import pytest

from sglang_cacheflow.planner import (
    Action,
    ComputeCost,
    CostModel,
    ModelShape,
    Plan,
    PlanError,
    Request,
    RequestPlan,
    Span,
    Step,
    TierCost,
    plan,
    validate,
)

L = 4
COST = CostModel(
    ModelShape(L, 2, 64, 2),
    ComputeCost(1000.0),
    {"host": TierCost(1e9, 0.0), "redis": TierCost(1e8, 1e-3)},
)
REQ = Request("r", 100, (Span("host", 200), Span("redis", 300)), 10)  # evicted [100, 600)


def one(steps: list[Step], ttft: float | None = None) -> Plan:
    ttft = max(s.finish_s for s in steps) if ttft is None else ttft
    return Plan("test", {"r": RequestPlan("r", "hand-made", tuple(steps), ttft)})


def rc(a, b, l0, l1, t0, t1):
    return Step(a, b, l0, l1, Action.RECOMPUTE, None, t0, t1)


def ld(a, b, tier, t0, t1, l0=0, l1=L):
    return Step(a, b, l0, l1, Action.LOAD, tier, t0, t1)


def pf(t0, t1):
    return Step(600, 610, 0, L, Action.PREFILL, None, t0, t1)


GOOD = [rc(100, 300, 0, L, 0.0, 1.0), ld(300, 600, "redis", 0.0, 1.0), pf(1.0, 1.1)]


def test_a_hand_made_token_split_is_valid():
    validate(one(GOOD), [REQ], L)


@pytest.mark.parametrize("policy", ["recompute", "load", "cake", "cacheflow"])
def test_policy_plans_are_valid(policy):
    validate(plan([REQ], COST, policy, chunk_tokens=64), [REQ], L)


@pytest.mark.parametrize(
    "steps, match",
    [
        # a gap: tokens [300, 400) never restored
        ([rc(100, 300, 0, L, 0, 1), ld(400, 600, "redis", 0, 1), pf(1, 1.1)], "prefill listed"),
        # overlap: [250, 300) both recomputed and loaded
        ([rc(100, 300, 0, L, 0, 1), ld(250, 300, "host", 0, 0.1)], "overlap"),
        # loading host tokens from redis
        ([ld(100, 600, "redis", 0, 1), pf(1, 1.1)], "does not hold"),
        # recompute of the back before the front exists anywhere
        ([rc(300, 600, 0, L, 0, 1), rc(100, 300, 0, L, 1, 2), pf(2, 2.1)], "earlier tokens"),
        # top layers recomputed with no hidden states from the bottom layers
        (
            [
                ld(100, 300, "host", 0, 0.1),
                ld(300, 600, "redis", 0, 0.5, 0, 2),
                rc(300, 600, 2, L, 0.5, 1.0),
                pf(1.0, 1.1),
            ],
            "hidden states",
        ),
        # prefill predicted to start before the loads it reads have landed
        ([rc(100, 300, 0, L, 0, 1), ld(300, 600, "redis", 0, 3), pf(1, 1.1)], "ready only"),
        # two recomputes at once on the single compute resource
        ([rc(100, 300, 0, L, 0, 1), rc(300, 600, 0, L, 0.5, 1.5), pf(1.5, 1.6)], "at once"),
        # new tokens not prefilled
        ([rc(100, 300, 0, L, 0, 1), ld(300, 600, "redis", 0, 1)], "not prefilled"),
    ],
)
def test_broken_plans_are_rejected_with_the_reason(steps, match):
    with pytest.raises(PlanError, match=match):
        validate(one(steps), [REQ], L)


def test_a_wrong_ttft_is_rejected():
    with pytest.raises(PlanError, match="predicted TTFT"):
        validate(one(GOOD, ttft=0.5), [REQ], L)


def test_a_plan_for_other_requests_is_rejected():
    other = replace(REQ, id="s")
    with pytest.raises(PlanError, match="covers requests"):
        validate(one(GOOD), [other], L)


def test_layer_split_is_valid_only_with_bottom_layers_first():
    bottom = rc(100, 600, 0, 2, 0.0, 1.0)
    top_host = ld(100, 300, "host", 0.0, 0.1, 2, L)
    top_redis = ld(300, 600, "redis", 0.0, 0.5, 2, L)
    validate(one([bottom, top_host, top_redis, pf(1.0, 1.1)]), [REQ], L)
