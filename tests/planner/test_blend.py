"""Chunk reuse (CacheBlend / CacheTune): the ratio per round, the pricing, the round's TTFTs."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_cacheflow.planner import (
    BlendRequest,
    ComputeCost,
    CostModel,
    ModelShape,
    Selection,
    TierCost,
    plan_blend,
)

from .strategies import TIERS, cost_models

LAYERS = 30
TOL = 1e-9


def model() -> CostModel:
    # 2 * 30 layers * 3 heads * 64 dims * 4 bytes = 46080 bytes of KV per token
    return CostModel(
        ModelShape(num_layers=LAYERS, num_kv_heads=3, head_dim=64, dtype_bytes=4),
        ComputeCost(tokens_per_s=5000, attention_s_per_token_pair=1e-9, step_s=1e-3),
        {
            "fast": TierCost(5e10),  # 0.9 µs a token: far cheaper than computing it (200 µs)
            "slow": TierCost(3e8, 1e-3),  # 154 µs a token: loads and compute balance
            "crawl": TierCost(1e6),  # 46 ms a token: loading never pays
        },
    )


def rag(tier: str, name: str = "q", exact: int = 256, reused: int = 4096) -> BlendRequest:
    return BlendRequest(name, tier, resident=512, exact=exact, reused=reused, new=64)


def test_a_fast_tier_takes_the_floor_and_beats_full_recompute():
    cost = model()
    rnd = plan_blend([rag("fast")], cost, min_ratio=0.15)
    (p,) = rnd.plans
    assert rnd.ratio == 0.15
    assert p.ratio == 0.15
    assert p.recomputed == round(0.15 * 4096) + 64
    assert p.loaded == 256 + 4096 - round(0.15 * 4096)
    assert p.ttft_s < 0.25 * p.full_recompute_s
    assert p.full_recompute_s == pytest.approx(cost.recompute_s(512, 256 + 4096 + 64))
    # a higher floor is honoured the same way, even off the 1% grid
    assert plan_blend([rag("fast")], cost, min_ratio=0.3).ratio == 0.3
    assert plan_blend([rag("fast")], cost, min_ratio=0.123).ratio == 0.123


def test_a_slow_tier_recomputes_more_and_still_beats_both_extremes():
    cost = model()
    fast = plan_blend([rag("fast")], cost)
    slow = plan_blend([rag("slow")], cost)
    assert slow.ratio > fast.ratio + 0.1
    at_floor = plan_blend([rag("slow")], cost, ratio=0.15)
    assert slow.mean_ttft_s < at_floor.mean_ttft_s
    assert slow.mean_ttft_s < plan_blend([rag("slow")], cost, ratio=1.0).mean_ttft_s
    assert slow.mean_ttft_s < slow.plans[0].full_recompute_s


def test_a_tier_too_slow_to_pay_recomputes_every_reused_token():
    rnd = plan_blend([rag("crawl")], model())
    (p,) = rnd.plans
    assert rnd.ratio == 1.0
    assert p.loaded == 256  # the exact chunk only
    assert p.recomputed == 4096 + 64


def test_equal_ttfts_prefer_the_larger_ratio():
    # nothing to select: every ratio prices the same, so the best quality wins
    rnd = plan_blend([rag("fast", reused=0)], model())
    assert rnd.ratio == 1.0
    assert rnd.plans[0].recomputed == 64


def test_pricing_follows_the_formulas():
    cost = model()
    (p,) = plan_blend([rag("slow")], cost, ratio=0.25).plans
    sel, before = 1024, 512 + 256
    pairs = (sel + 64) * (before + 4096 + 64)  # a mask over the whole context
    assert p.recomputed == sel + 64
    assert p.compute_s == pytest.approx(1e-3 + (sel + 64) / 5000 + 1e-9 * pairs)
    assert p.loaded == 256 + 4096 - sel
    assert p.load_s == pytest.approx(1e-3 + (256 + 4096 - sel) * 46080 / 3e8)


@pytest.mark.parametrize("ratio", [0.15, 0.9])  # load-bound, then compute-bound
def test_one_request_overlaps_loads_with_compute_layer_by_layer(ratio):
    (p,) = plan_blend([rag("slow")], model(), ratio=ratio).plans
    assert (p.load_s > p.compute_s) == (ratio == 0.15)
    lo, hi = sorted((p.compute_s, p.load_s))
    assert p.ttft_s == pytest.approx(hi + lo / LAYERS)


def test_nothing_loaded_costs_no_load_time():
    (p,) = plan_blend([rag("slow", exact=0)], model(), ratio=1.0).plans
    assert p.loaded == 0
    assert p.load_s == 0.0
    assert p.ttft_s == pytest.approx(p.compute_s)


def test_online_reads_every_reused_token_and_costs_more_than_offline():
    cost = model()
    kw = {"ratio": 0.3, "min_ratio": 0.0}
    offline = plan_blend([rag("slow")], cost, selection=Selection.OFFLINE, **kw).plans[0]
    online_round = plan_blend([rag("slow")], cost, selection="online", **kw)
    online = online_round.plans[0]
    assert online_round.selection is Selection.ONLINE
    assert online.loaded == 256 + 4096
    assert online.recomputed == offline.recomputed
    one_layer = cost.recompute_s(512 + 256, 4096, layers=1)
    assert online.compute_s == pytest.approx(offline.compute_s + one_layer)
    assert online.load_s > offline.load_s
    assert online.ttft_s > offline.ttft_s
    # random tokens are scattered over the stored pages: every page holding an unselected
    # token is read (all of them), with the forward of the offline choice
    rnd = plan_blend([rag("slow")], cost, selection="random", **kw).plans[0]
    assert rnd.loaded == online.loaded
    assert rnd.compute_s == pytest.approx(offline.compute_s)
    assert offline.ttft_s < rnd.ttft_s < online.ttft_s
    everything = plan_blend([rag("slow")], cost, selection="random", ratio=1.0).plans[0]
    assert everything.loaded == 256


def test_a_batch_is_served_in_order_on_shared_resources():
    cost = model()
    # a long load first, then requests whose own loads are short: they still wait their turn
    batch = [
        rag("slow", "a"),
        rag("fast", "b", reused=1024),
        rag("fast", "c", exact=0, reused=2048),
        rag("slow", "d", reused=512),
    ]
    rnd = plan_blend(batch, cost)
    assert [p.name for p in rnd.plans] == ["a", "b", "c", "d"]
    ttfts = [p.ttft_s for p in rnd.plans]
    assert ttfts == sorted(ttfts)
    assert ttfts[-1] >= sum(p.compute_s for p in rnd.plans) - TOL
    # d's load queues behind a's on the slow tier's channel
    a, d = rnd.plans[0], rnd.plans[3]
    assert d.ttft_s >= a.load_s + d.load_s + d.compute_s / LAYERS - TOL
    assert rnd.mean_ttft_s == pytest.approx(sum(ttfts) / 4)
    # the last request waits behind the others: slower than alone
    assert rnd.plans[-1].ttft_s > plan_blend([batch[-1]], cost, ratio=rnd.ratio).mean_ttft_s


def test_a_forced_ratio_is_honoured():
    rnd = plan_blend([rag("fast"), rag("crawl", "b")], model(), ratio=0.5)
    assert rnd.ratio == 0.5
    assert [p.ratio for p in rnd.plans] == [0.5, 0.5]
    assert [p.recomputed for p in rnd.plans] == [2048 + 64, 2048 + 64]
    assert plan_blend([rag("fast")], model(), ratio=0.05, min_ratio=0.0).ratio == 0.05


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": ""}, "name"),
        ({"resident": -1}, "resident"),
        ({"exact": -1}, "exact"),
        ({"reused": -5}, "reused"),
        ({"new": 0}, "new must be >= 1"),
    ],
)
def test_bad_requests_name_the_field(kwargs, match):
    fields = {"name": "q", "tier": "fast", "resident": 0, "exact": 0, "reused": 10, "new": 1}
    with pytest.raises(ValueError, match=match):
        BlendRequest(**{**fields, **kwargs})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_ratio": -0.1}, "min_ratio must be in"),
        ({"min_ratio": 1.5}, "min_ratio must be in"),
        ({"ratio": 0.1}, "raise ratio or lower min_ratio"),
        ({"ratio": 1.2}, "ratio must be in"),
        ({"selection": "sparse"}, "offline, online, random"),
    ],
)
def test_bad_arguments_say_what_to_change(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_blend([rag("fast")], model(), **kwargs)


def test_bad_rounds_are_refused():
    with pytest.raises(ValueError, match="at least one request"):
        plan_blend([], model())
    with pytest.raises(ValueError, match="unique"):
        plan_blend([rag("fast"), rag("slow")], model())
    with pytest.raises(KeyError, match="crawl"):  # the known tiers are named
        plan_blend([rag("ssd")], model())


@st.composite
def blend_rounds(draw: st.DrawFn) -> list[BlendRequest]:
    return [
        BlendRequest(
            f"q{i}",
            draw(st.sampled_from(TIERS)),
            resident=draw(st.integers(0, 2000)),
            exact=draw(st.integers(0, 2000)),
            reused=draw(st.integers(0, 8000)),
            new=draw(st.integers(1, 300)),
        )
        for i in range(draw(st.integers(1, 5)))
    ]


@settings(max_examples=80, deadline=None)
@given(
    reqs=blend_rounds(),
    cost=cost_models(),
    selection=st.sampled_from(list(Selection)),
    min_ratio=st.floats(0.0, 1.0),
    other=st.integers(0, 100),
)
def test_the_ratio_never_drops_below_the_floor_and_beats_every_other(
    reqs, cost, selection, min_ratio, other
):
    rnd = plan_blend(reqs, cost, selection=selection, min_ratio=min_ratio)
    assert min_ratio <= rnd.ratio <= 1.0
    for r, p in zip(reqs, rnd.plans, strict=True):
        assert p.ratio == rnd.ratio
        assert r.new <= p.recomputed <= r.reused + r.new
        selected = p.recomputed - r.new
        unread = {
            Selection.OFFLINE: selected,
            Selection.ONLINE: 0,
            Selection.RANDOM: r.reused if selected == r.reused else 0,
        }[selection]
        assert p.loaded == r.exact + r.reused - unread
        assert p.ttft_s >= max(p.compute_s, p.load_s) - TOL
    ttfts = [p.ttft_s for p in rnd.plans]
    assert ttfts == sorted(ttfts)
    assert ttfts[-1] >= sum(p.compute_s for p in rnd.plans) * (1 - TOL)
    # no ratio the search could have taken is faster
    for ratio in {min_ratio, 1.0, max(min_ratio, other / 100)}:
        forced = plan_blend(reqs, cost, selection=selection, min_ratio=min_ratio, ratio=ratio)
        assert rnd.mean_ttft_s <= forced.mean_ttft_s * (1 + TOL)
