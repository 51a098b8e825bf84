"""Policies on random rounds: valid plans, CacheFlow never worse, bound never above."""

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_cacheflow.planner import (
    POLICIES,
    Capabilities,
    ComputeCost,
    CostModel,
    ModelShape,
    Request,
    Span,
    TierCost,
    fluid_bound,
    plan,
    reuses_evicted_kv,
    validate,
)
from sglang_cacheflow.planner.capabilities import RUNTIME
from sglang_cacheflow.planner.plan import Action
from sglang_cacheflow.planner.shapes import LAYER, LOAD_FRONT, TOKEN, Shape, Shaper
from sglang_cacheflow.sglang.capabilities import SGLANG, SGLANG_STREAMED

from .strategies import cost_models, requests

SGLANG_ONE_FORWARD = replace(SGLANG_STREAMED, one_forward_layer_splits=True)

EXECUTORS = {
    "runtime": RUNTIME,
    "sglang": SGLANG,
    "sglang-streamed": SGLANG_STREAMED,
    "sglang-one-forward": SGLANG_ONE_FORWARD,
    "token-only": Capabilities(token_split=True, layer_split=False),
    "layer-only": Capabilities(token_split=False, layer_split=True),
    "everything": Capabilities(token_split=True, layer_split=True, load_front=True),
}
# SGLang's HiCache without the project's split restores: load the front of a hit only
LOAD_FRONT_ONLY = Capabilities(
    token_split=False, layer_split=False, load_front=True, streamed_tiers=frozenset({"host"})
)
TOL = 1e-9


def policies_for(caps: Capabilities) -> list[str]:
    return [p for p in POLICIES if p != "cake" or caps.token_split]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=requests(),
    cost=cost_models(),
    caps=st.sampled_from(sorted(EXECUTORS)),
    chunk=st.sampled_from([64, 256, 1000]),
)
def test_every_policy_plans_validly_and_cacheflow_is_never_worse(reqs, cost, caps, chunk):
    capabilities = EXECUTORS[caps]
    plans = {
        p: plan(reqs, cost, p, capabilities, chunk_tokens=chunk) for p in policies_for(capabilities)
    }
    for p in plans.values():
        validate(p, reqs, cost.shape.num_layers)
    best = plans["cacheflow"].mean_ttft_s
    for name, p in plans.items():
        assert best <= p.mean_ttft_s * (1 + TOL) + TOL, name
    bound = fluid_bound(reqs, cost)
    for name, p in plans.items():
        assert bound.makespan_s <= p.makespan_s * (1 + 1e-6) + 1e-9, name
        assert bound.mean_ttft_s <= p.mean_ttft_s * (1 + 1e-6) + 1e-9, name


def test_streamed_splits_price_the_extend_beside_the_load() -> None:
    # A split whose load streams into the extend ends about one layer's extend after its
    # load, not a whole extend after it; whole-span loads (SGLang's prefetch) do not stream.
    shape = ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=4)
    cost = CostModel(
        shape,
        ComputeCost(tokens_per_s=700.0, step_s=0.1),
        {"redis": TierCost(bandwidth_Bps=25e6, latency_s=1e-3)},
    )
    req = Request("one", 0, (Span("redis", 512),), 16)
    plain, streamed = Shaper(req, cost, SGLANG, 16), Shaper(req, cost, SGLANG_STREAMED, 16)
    extend = plain.prefill_s
    for kind, split in ((TOKEN, 64), (LAYER, 5)):  # load-bound splits
        a = plain.run(Shape(kind, split), 0.0, {})
        b = streamed.run(Shape(kind, split), 0.0, {})
        assert b.ttft < a.ttft  # the extend overlaps the load's tail
        assert b.ttft >= a.ttft - extend * (1 + 1e-9)  # by at most the extend
    for whole in (Shape(TOKEN, 0), Shape(LAYER, 0), Shape(LOAD_FRONT, 0)):  # load all
        assert streamed.run(whole, 0.0, {}).ttft == plain.run(whole, 0.0, {}).ttft
    assert (
        plan([req], cost, "cacheflow", SGLANG_STREAMED, 16).mean_ttft_s
        < plan([req], cost, "cacheflow", SGLANG, 16).mean_ttft_s
    )


def test_a_splits_extend_is_slowed_while_its_own_loads_stream_in() -> None:
    # The extend after a streamed split reads the span layer by layer while the rest of it
    # streams in: it runs beside the split's loads until they end, at full speed after.
    shape = ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=4)
    req = Request("one", 0, (Span("redis", 512),), 200)
    for kind, split in ((TOKEN, 128), (LAYER, 5)):
        for slow in (0.0, 0.25):
            compute = ComputeCost(tokens_per_s=700.0, step_s=0.1, overlap_slowdown=slow)
            cost = CostModel(shape, compute, {"redis": TierCost(25e6, 1e-3)})
            s = Shaper(req, cost, SGLANG_STREAMED, 16)
            steps: list = []
            s.run(Shape(kind, split), 0.0, {}, steps)
            (extend,) = [x for x in steps if x.action == Action.PREFILL]
            loads_end = max(x.finish_s for x in steps if x.action == Action.LOAD)
            assert extend.start_s < loads_end  # it starts before the last layer is in
            beside = min(loads_end - extend.start_s, s.prefill_s * (1 + slow))
            want = s.prefill_s + beside * (1 - 1 / (1 + slow))
            assert extend.finish_s - extend.start_s == pytest.approx(want, rel=1e-9)
        # a whole-span load is not a split: its extend waits for the whole load
        steps = []
        s.run(Shape(kind, 0), 0.0, {}, steps)
        (extend,) = [x for x in steps if x.action == Action.PREFILL]
        assert extend.finish_s - extend.start_s == pytest.approx(s.prefill_s, rel=1e-9)


def test_a_layer_split_in_one_forward_saves_the_chunks_fixed_cost() -> None:
    # The span's bottom layers run in the new tokens' forward: one fixed cost where the
    # chunk and the extend paid one each; the top layers wait for the loads.
    shape = ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=4)
    compute = ComputeCost(
        tokens_per_s=900.0, step_s=0.09, unlayered_s=0.01, overlap_slowdown=0.1, split_s=0.02
    )
    cost = CostModel(shape, compute, {"redis": TierCost(bandwidth_Bps=20e6, latency_s=1e-3)})
    req = Request("one", 0, (Span("redis", 512),), 16)
    two, one = Shaper(req, cost, SGLANG_STREAMED, 64), Shaper(req, cost, SGLANG_ONE_FORWARD, 64)
    for split in range(1, 30):
        steps: list = []
        got = one.run(Shape(LAYER, split), 0.0, {}, steps)
        before = two.run(Shape(LAYER, split), 0.0, {})
        assert got.ttft < before.ttft
        (recompute,) = [x for x in steps if x.action == Action.RECOMPUTE]
        (extend,) = [x for x in steps if x.action == Action.PREFILL]
        loads = [x for x in steps if x.action == Action.LOAD]
        # the new tokens' bottom layers run with the span's, before their top layers; the
        # last top layer reads the last loaded layer
        assert recompute.finish_s > cost.recompute_s(0, 512, split) * 1.1
        assert extend.start_s >= recompute.finish_s - 1e-12
        assert extend.finish_s >= max(x.finish_s for x in loads)
    for whole in (0, 30):  # no split: priced as before
        assert one.run(Shape(LAYER, whole), 0.0, {}) == two.run(Shape(LAYER, whole), 0.0, {})
    # the search finds the best split by brute force
    best, _ = one.best(0.0, {})
    brute = min(range(31), key=lambda x: one.run(Shape(LAYER, x), 0.0, {}).ttft)
    assert one.run(best, 0.0, {}).ttft <= one.run(Shape(LAYER, brute), 0.0, {}).ttft * (1 + 1e-9)
    # over the engine's prefill budget the span and the new tokens are two forwards
    capped = Shaper(req, cost, replace(SGLANG_ONE_FORWARD, batch_tokens=512), 64)
    assert capped.run(Shape(LAYER, 12), 0.0, {}) == Shaper(
        req, cost, replace(SGLANG_STREAMED, batch_tokens=512), 64
    ).run(Shape(LAYER, 12), 0.0, {})


def test_a_token_split_in_one_forward_saves_the_chunks_fixed_cost() -> None:
    # Cake's order in one forward: the front and the new tokens go through each layer once
    # the back's KV of that layer is in; one fixed cost where the chunk and the extend paid
    # one each, but the forward waits for the loads from its first layer on.
    shape = ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=4)
    compute = ComputeCost(tokens_per_s=900.0, step_s=0.09, unlayered_s=0.01, overlap_slowdown=0.1)
    cost = CostModel(shape, compute, {"redis": TierCost(bandwidth_Bps=20e6, latency_s=1e-3)})
    req = Request("one", 0, (Span("redis", 512),), 16)
    caps = replace(SGLANG_STREAMED, one_forward_token_splits=True)
    one = Shaper(req, cost, caps, 64)
    for split in range(64, 512, 64):
        steps: list = []
        got = one.run(Shape(TOKEN, split, True), 0.0, {}, steps)
        before = one.run(Shape(TOKEN, split), 0.0, {})  # a chunk, then the extend
        if before.compute_ready >= before.load_ready:  # the compute binds: one step saved
            assert got.ttft < before.ttft - 0.5 * compute.step_s
        else:  # the loads bind: both end about with the last layer loaded
            assert got.ttft <= before.ttft * (1 + 1e-4)
        (recompute,) = [x for x in steps if x.action == Action.RECOMPUTE]
        (extend,) = [x for x in steps if x.action == Action.PREFILL]
        (load,) = [x for x in steps if x.action == Action.LOAD]
        # the forward's last layer reads the back's last layer; its first waits for the first
        per_layer = (load.finish_s - load.start_s - 1e-3) / 30
        assert extend.finish_s >= load.finish_s
        assert recompute.start_s >= load.start_s + 1e-3 + per_layer - 1e-12
        # one fixed cost: the new tokens' share is the prefill less its step (slowed at most
        # by the loads beside it)
        alone = extend.finish_s - extend.start_s
        assert alone <= (one.prefill_s - compute.step_s) * 1.1 + 1e-12
        # the plan takes whichever of the two ends first, or the one it is told
        pick, out = one.token_split(split, 0.0, {})
        assert pick.one_forward == (got.ttft <= before.ttft)
        assert out.ttft == min(got.ttft, before.ttft)
        assert one.token_split(split, 0.0, {}, one=True)[0] == Shape(TOKEN, split, True)
    for whole in (0, 512):  # no split: priced as before, never in one forward
        assert one.run(Shape(TOKEN, whole, True), 0.0, {}) == one.run(Shape(TOKEN, whole), 0.0, {})
        assert not one.token_split(whole, 0.0, {}, one=True)[0].one_forward
    # CacheFlow's search leaves it out (its price ran short of rounds of such restores)
    assert not one.best(0.0, {})[0].one_forward
    # a request whose reads queue behind another's: its forward would wait from layer 0
    busy = {"redis": 0.6}
    pick, _ = one.token_split(256, 0.0, busy)
    assert not pick.one_forward
    # over the engine's prefill budget the front and the new tokens are two forwards
    capped = Shaper(req, cost, replace(caps, batch_tokens=512), 64)
    assert capped.run(Shape(TOKEN, 128, True), 0.0, {}) == capped.run(Shape(TOKEN, 128), 0.0, {})
    assert not capped.token_split(128, 0.0, {}, one=True)[0].one_forward


def test_the_plan_says_which_splits_run_in_one_forward() -> None:
    shape = ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=4)
    compute = ComputeCost(tokens_per_s=900.0, step_s=0.09, overlap_slowdown=0.1)
    cost = CostModel(shape, compute, {"redis": TierCost(bandwidth_Bps=20e6, latency_s=1e-3)})
    caps = replace(SGLANG_ONE_FORWARD, one_forward_token_splits=True)
    reqs = [Request("a", 0, (Span("redis", 512),), 16)]
    for force, one in (
        (("token", 0.5), True),
        (("layer", 0.5), True),
        (("load_front", 0.5), False),
    ):
        p = plan(reqs, cost, "cacheflow", caps, chunk_tokens=64, force=force)
        assert p.requests["a"].one_forward is one, force
        assert p.requests["a"].to_dict()["one_forward"] is one
    two = plan(reqs, cost, "cacheflow", SGLANG_STREAMED, chunk_tokens=64, force=("token", 0.5))
    assert two.requests["a"].one_forward is False


def _staged(p, req: Request) -> int | None:
    """Tokens a plan loads for ``req`` through the engine's staging (a front of the span or
    all of it, not a split), None when it loads nothing so or splits."""
    loads = [x for x in p.requests[req.id].steps if x.action is Action.LOAD]
    if not loads or min(x.layer_start for x in loads) > 0:
        return None
    if min(x.start for x in loads) > req.device_tokens:
        return None
    return max(x.end for x in loads) - req.device_tokens


def test_a_load_the_engine_cannot_stage_is_split_or_recomputed() -> None:
    # SGLang stages an L3 load that is not a split in host memory, and prefetches nothing
    # under its threshold: a fast link would load all of a short span, which cannot run.
    shape = ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=4)
    cost = CostModel(shape, ComputeCost(700.0, 0.0, 0.1), {"redis": TierCost(5e9, 1e-3)})
    free = Request("one", 24, (Span("redis", 40),), 100)
    assert plan([free], cost, "cacheflow", SGLANG_STREAMED, 16).requests["one"].shape == (
        "load all"
    )
    short = Request("one", 24, (Span("redis", 40),), 100, staged_load=(64, 2048))
    p = plan([short], cost, "cacheflow", SGLANG_STREAMED, 16)
    assert _staged(p, short) is None and p.requests["one"].shape not in ("load all",)
    # the host room caps a front the executor loads through staging
    big = Request("one", 24, (Span("redis", 512),), 16, staged_load=(64, 200))
    p = plan([big], cost, "cacheflow", LOAD_FRONT_ONLY, 16)
    assert 64 <= _staged(p, big) <= 200


@settings(max_examples=100, deadline=None)
@given(
    cost=cost_models(),
    caps=st.sampled_from(sorted(EXECUTORS)),
    policy=st.sampled_from(["cake", "cacheflow"]),
    span=st.integers(1, 3000),
    device=st.integers(0, 700),
    new=st.integers(0, 200),
    lo=st.integers(0, 600),
    room=st.integers(0, 3000),
)
def test_no_policy_plans_a_load_the_engine_cannot_stage(
    cost, caps, policy, span, device, new, lo, room
):
    capabilities = EXECUTORS[caps]
    if policy not in policies_for(capabilities):
        return
    req = Request("one", device, (Span("redis", span),), new, staged_load=(lo, room))
    staged = _staged(plan([req], cost, policy, capabilities, 64), req)
    assert staged is None or req.stages(staged)


def brute_force_best(req: Request, cost: CostModel, caps: Capabilities, chunk: int) -> float:
    s = Shaper(req, cost, caps, chunk)
    shapes = [Shape(LOAD_FRONT, 0), Shape(LOAD_FRONT, req.evicted_tokens)]
    # every split point an executor can run: each chunk (page) boundary, each layer
    if caps.token_split:
        shapes += [Shape(TOKEN, x) for x in s.grid]
    if caps.layer_split:
        shapes += [Shape(LAYER, x) for x in range(cost.shape.num_layers + 1)]
    if caps.load_front:
        shapes += [Shape(LOAD_FRONT, x) for x in s.grid]
    return min(s.run(shape, 0.0, {}).ttft for shape in shapes)


@settings(max_examples=60, deadline=None)
@given(
    cost=cost_models(),
    caps=st.sampled_from(sorted(EXECUTORS)),
    spans=st.lists(
        st.tuples(st.sampled_from(["host", "redis"]), st.integers(1, 1500)), min_size=1, max_size=2
    ),
    device=st.integers(0, 700),
    new=st.integers(1, 200),
)
def test_cacheflow_is_within_5_percent_of_brute_force_over_every_split(
    cost, caps, spans, device, new
):
    req = Request("one", device, tuple(Span(t, n) for t, n in spans), new)
    capabilities = EXECUTORS[caps]
    got = plan([req], cost, "cacheflow", capabilities, chunk_tokens=16).mean_ttft_s
    assert got <= 1.05 * brute_force_best(req, cost, capabilities, 16) + 1e-9


def llama8b(attention: float = 0.0) -> CostModel:
    return CostModel(
        ModelShape(32, 8, 128, 2, 1),
        ComputeCost(20000, attention),
        {"host": TierCost.from_gbps(25, 0.05), "redis": TierCost.from_gbps(2.5, 0.5)},
    )


@pytest.mark.parametrize("attention", [0.0, 2e-9])
def test_balanced_single_request_reaches_the_harmonic_bound(attention):
    cost = llama8b(attention)
    n, new = 8192, 128
    tc = cost.recompute_s(0, n)
    # pick the Redis bandwidth that makes loading take exactly as long as recomputing
    bw = n * cost.shape.kv_bytes_per_token / (tc - 0.5e-3)
    cost = CostModel(cost.shape, cost.compute, {"redis": TierCost(bw, 0.5e-3)})
    tio = cost.load_s("redis", n)
    assert tio == pytest.approx(tc)
    req = Request("chat", 0, (Span("redis", n),), new)
    got = plan([req], cost, "cacheflow").mean_ttft_s
    target = tc * tio / (tc + tio) + cost.recompute_s(n, new)
    assert got <= 1.10 * target
    assert got < 0.6 * min(
        plan([req], cost, "recompute").mean_ttft_s, plan([req], cost, "load").mean_ttft_s
    )


def test_batch_of_eight_mixed_requests_is_near_the_fluid_makespan():
    cost = llama8b(2e-9)
    cost = CostModel(
        cost.shape,
        cost.compute,
        {"host": TierCost.from_gbps(12, 0.05), "redis": TierCost.from_gbps(2.5, 0.5)},
    )
    reqs = [
        Request("r0", 512, (Span("redis", 2048),), 64),
        Request("r1", 0, (Span("host", 4096), Span("redis", 12288)), 256),
        Request("r2", 1024, (Span("host", 7168),), 128),
        Request("r3", 0, (Span("redis", 32768),), 512),
        Request("r4", 256, (Span("redis", 1024),), 32),
        Request("r5", 0, (Span("host", 2048), Span("redis", 6144)), 128),
        Request("r6", 4096, (Span("redis", 16384),), 64),
        Request("r7", 0, (Span("host", 24576),), 256),
    ]
    p = plan(reqs, cost, "cacheflow")
    validate(p, reqs, 32)
    bound = fluid_bound(reqs, cost)
    assert p.makespan_s <= 1.15 * bound.makespan_s
    # and it is the batch that gains: both pure modes and Cake are far behind
    for other in ("recompute", "load", "cake"):
        assert p.mean_ttft_s < 0.8 * plan(reqs, cost, other).mean_ttft_s


def test_layer_split_wins_on_short_spans_token_split_on_long_ones():
    # The layer-wise split has L+1 split points: on a span of one chunk it balances compute
    # and I/O where the token split cannot cut at all. On a long span the token split wins:
    # its recomputed front attends to fewer tokens than an average layer slice of the span.
    cost = llama8b(2e-9)
    short = Request("short", 0, (Span("redis", 512),), 16)
    long = Request("long", 0, (Span("redis", 65536),), 16)
    got = plan([short], cost, "cacheflow", chunk_tokens=512).requests["short"].shape
    assert got.startswith("layer split")
    assert plan([long], cost, "cacheflow").requests["long"].shape.startswith("token split")


def test_tensor_parallelism_divides_what_each_rank_loads():
    one = llama8b()
    two = CostModel(ModelShape(32, 8, 128, 2, 2), one.compute, one.tiers)
    req = Request("doc", 0, (Span("redis", 16384),), 64)
    load1 = plan([req], one, "load").mean_ttft_s
    load2 = plan([req], two, "load").mean_ttft_s
    assert load2 < 0.6 * load1


def test_cake_needs_an_executor_that_loads_the_back():
    req = Request("a", 0, (Span("host", 1024),), 8)
    with pytest.raises(ValueError, match="token_split"):
        plan([req], llama8b(), "cake", LOAD_FRONT_ONLY)


def test_load_front_executors_get_only_load_front_shapes():
    cost = llama8b(2e-9)
    reqs = [Request(f"r{i}", 0, (Span("host", 2048 * (i + 1)),), 64) for i in range(4)]
    p = plan(reqs, cost, "cacheflow", LOAD_FRONT_ONLY)
    validate(p, reqs, 32)
    for r in reqs:
        steps = p.requests[r.id].steps
        loads = [s for s in steps if s.action == "load"]
        recomputes = [s for s in steps if s.action == "recompute"]
        assert all(s.layer_start == 0 and s.layer_end == 32 for s in steps)
        if loads and recomputes:  # loaded front, recomputed back
            assert max(s.end for s in loads) <= min(s.start for s in recomputes)


def test_unknown_policy_and_duplicate_ids_are_refused():
    req = Request("a", 0, (Span("host", 10),), 1)
    with pytest.raises(ValueError, match="unknown policy"):
        plan([req], llama8b(), "fastest")
    with pytest.raises(ValueError, match="unique"):
        plan([req, req], llama8b(), "load")


def _balanced_redis(cost: CostModel, n: int) -> CostModel:
    """``cost`` with a Redis link on which loading ``n`` tokens takes as long as recomputing."""
    tc = cost.recompute_s(0, n)
    bw = n * cost.shape.kv_bytes_per_token / (tc - 0.5e-3)
    return CostModel(cost.shape, cost.compute, {"redis": TierCost(bw, 0.5e-3)})


def test_busy_compute_turns_a_recompute_into_a_load():
    n = 4096
    cost = _balanced_redis(llama8b(2e-9), n)
    req = Request("late", 0, (Span("redis", n),), 16)
    tc = cost.recompute_s(0, n)
    # a little cheaper to recompute alone (the load also pays the link latency) ...
    idle = plan([req], cost, "cacheflow", LOAD_FRONT_ONLY)
    assert idle.requests["late"].shape == "recompute all"
    # ... but behind a compute queue of two recomputes, loading finishes first
    busy = plan([req], cost, "cacheflow", LOAD_FRONT_ONLY, busy={"compute": 2 * tc})
    validate(busy, [req], 32)
    assert busy.requests["late"].shape == "load all"
    assert busy.mean_ttft_s < 2 * tc + cost.recompute_s(0, n)
    assert busy.owed_s["redis"] == pytest.approx(cost.load_s("redis", n))
    assert busy.owed_s["compute"] == pytest.approx(2 * tc + cost.recompute_s(n, 16))


def test_steps_start_after_the_busy_clocks():
    cost = _balanced_redis(llama8b(2e-9), 2048)
    reqs = [Request(f"r{i}", 0, (Span("redis", 2048),), 16) for i in range(3)]
    wait = {"compute": 0.05, "redis": 0.07}
    for policy in ("recompute", "load", "cacheflow"):
        p = plan(reqs, cost, policy, LOAD_FRONT_ONLY, busy=wait)
        validate(p, reqs, 32)
        for rp in p.requests.values():
            for step in rp.steps:
                assert step.start_s >= wait[step.resource] - TOL
        for resource, owed in p.owed_s.items():
            work = sum(
                s.finish_s - s.start_s
                for rp in p.requests.values()
                for s in rp.steps
                if s.resource == resource
            )
            assert owed == pytest.approx(wait.get(resource, 0.0) + work)


def test_arrivals_planned_one_at_a_time_with_clocks_match_the_batch_plan():
    # SGLang sees returning conversations one or two per scheduling round. Carrying the
    # resource clocks from round to round must keep the batch's gain: half the requests load
    # while the other half recompute.
    n = 2048
    cost = _balanced_redis(llama8b(2e-9), n)
    reqs = [Request(f"c{i}", 0, (Span("redis", n),), 16) for i in range(8)]
    together = plan(reqs, cost, "cacheflow", LOAD_FRONT_ONLY)
    busy: dict[str, float] = {}
    ttfts = []
    for r in reqs:
        p = plan([r], cost, "cacheflow", LOAD_FRONT_ONLY, busy=busy)
        ttfts.append(p.mean_ttft_s)
        busy = p.owed_s
    online = sum(ttfts) / len(ttfts)
    assert online <= 1.10 * together.mean_ttft_s
    for other in ("recompute", "load"):
        assert online < 0.75 * plan(reqs, cost, other, LOAD_FRONT_ONLY).mean_ttft_s


def test_setup_time_delays_a_load_but_not_the_channel():
    # An executor's hand-offs after a load (SGLang: acknowledgement, admission) delay that
    # request, but the link already carries the next load meanwhile.
    base = _balanced_redis(llama8b(2e-9), 2048)
    t = base.tiers["redis"]
    slow = CostModel(
        base.shape, base.compute, {"redis": TierCost(t.bandwidth_Bps, t.latency_s, 0.05)}
    )
    reqs = [Request(f"r{i}", 0, (Span("redis", 2048),), 16) for i in range(4)]
    a = plan(reqs, base, "load", LOAD_FRONT_ONLY)
    b = plan(reqs, slow, "load", LOAD_FRONT_ONLY)
    validate(b, reqs, 32)
    assert b.owed_s["redis"] == pytest.approx(a.owed_s["redis"])  # the channel: no setup
    first = b.order[0]
    assert b.requests[first].predicted_ttft_s == pytest.approx(
        a.requests[first].predicted_ttft_s + 0.05
    )
    # pipelined: the setups overlap later loads, so 4 loads cost far less than 4 setups more
    assert b.makespan_s < a.makespan_s + 2 * 0.05


def test_sglang_splits_one_balanced_request():
    # One returning request alone on a balanced link: SGLang with the project's split restores
    # recomputes part of the span while the rest loads, far below either pure mode (about T*).
    n = 4096
    cost = _balanced_redis(llama8b(2e-9), n)
    req = Request("alone", 0, (Span("redis", n),), 16)
    p = plan([req], cost, "cacheflow", SGLANG)
    validate(p, [req], 32)
    assert p.requests["alone"].shape.split(" ")[:2] in (["token", "split"], ["layer", "split"])
    best_pure = min(plan([req], cost, q, SGLANG).mean_ttft_s for q in ("load", "recompute"))
    assert p.mean_ttft_s < 0.7 * best_pure
    # Cake's order: the front recomputed, the back loaded
    cake = plan([req], cost, "cake", SGLANG)
    validate(cake, [req], 32)
    assert cake.requests["alone"].shape.startswith("token split")
    steps = cake.requests["alone"].steps
    loads = [s for s in steps if s.action == "load"]
    recomputes = [s for s in steps if s.action == "recompute"]
    assert min(s.start for s in loads) == max(s.end for s in recomputes)  # front | back
    assert max(s.end for s in loads) == n
    assert cake.mean_ttft_s < 0.7 * best_pure


def test_the_link_decides_how_much_of_a_span_loads():
    # One request, the link from a tenth to ten times the balanced one: the share of the
    # span's KV loaded rises with the link, from almost none to almost all, about half at
    # the balanced one.
    n = 4096
    balanced = _balanced_redis(llama8b(2e-9), n)
    req = Request("r", 0, (Span("redis", n),), 16)
    loaded, shapes = [], []
    for factor in (0.1, 0.5, 1.0, 2.0, 10.0):
        tier = balanced.tier("redis")
        cost = CostModel(balanced.shape, balanced.compute, {
            "redis": TierCost(tier.bandwidth_Bps * factor, tier.latency_s)})  # fmt: skip
        p = plan([req], cost, "cacheflow", SGLANG)
        validate(p, [req], 32)
        rp = p.requests["r"]
        shapes.append(rp.shape)
        loaded.append(sum((s.end - s.start) * (s.layer_end - s.layer_start)
                          for s in rp.steps if s.action is Action.LOAD))  # fmt: skip
    share = [x / (n * balanced.shape.num_layers) for x in loaded]
    assert share == sorted(share) and len(set(share)) == len(share), (shapes, share)
    assert share[0] < 0.1 and 0.3 < share[2] < 0.7 and share[-1] > 0.85, (shapes, share)


@pytest.mark.parametrize(
    ("kind", "fraction", "shape"),
    [
        ("token", 0.5, "token split 1024+1024"),
        ("token", 0.0, "load all"),
        ("load_front", 0.25, "load front 1536+512"),
        ("load_front", 1.0, "recompute all"),
        ("layer", 0.5, "layer split 16/32"),
    ],
)
def test_a_forced_shape_is_what_every_request_gets(kind: str, fraction: float, shape: str):
    cost = llama8b(2e-9)
    reqs = [Request(f"r{i}", 0, (Span("redis", 2048),), 16) for i in range(3)]
    p = plan(reqs, cost, "cacheflow", SGLANG, chunk_tokens=256, force=(kind, fraction))
    validate(p, reqs, 32)
    assert {rp.shape for rp in p.requests.values()} == {shape}


@pytest.mark.parametrize("policy", ["recompute", "load", "cake", "cacheflow"])
def test_a_request_forcing_its_shape_gets_it_and_the_others_keep_the_policys(policy: str):
    cost = llama8b(2e-9)
    free = [Request(f"r{i}", 0, (Span("redis", 2048),), 16) for i in range(3)]
    alone = plan(free, cost, policy, SGLANG, chunk_tokens=256)
    # the middle request forces a layer split that no policy would take at this link
    reqs = [free[0], replace(free[1], force=("layer", 0.25)), free[2]]
    p = plan(reqs, cost, policy, SGLANG, chunk_tokens=256)
    validate(p, reqs, 32)
    assert p.requests["r1"].shape == "layer split 8/32"
    assert alone.requests["r1"].shape != "layer split 8/32"
    for rid in ("r0", "r2"):
        assert p.requests[rid].shape == alone.requests[rid].shape, (rid, p.requests, alone)
    assert p.order == ("r0", "r1", "r2")  # a round with a forced request: arrival order
    # a server-wide force overrides the request's
    everyone = plan(reqs, cost, policy, SGLANG, chunk_tokens=256, force=("token", 0.5))
    assert {rp.shape for rp in everyone.requests.values()} == {"token split 1024+1024"}


def test_a_request_forcing_a_shape_the_executor_cannot_run_is_refused():
    req = Request("a", 0, (Span("redis", 1024),), 8, force=("layer", 0.5))
    with pytest.raises(ValueError, match="cannot run a layer split"):
        plan([req], llama8b(), "cacheflow", RUNTIME_TOKENS)


def test_a_layer_split_chunk_is_priced_as_the_cost_model_prices_it():
    base = llama8b(2e-9)
    cost = CostModel(base.shape, ComputeCost(20000, 2e-9, 0.1, 0.25, unlayered_s=0.03), base.tiers)
    req = Request("r", 64, (Span("redis", 2048),), 16)
    p = plan([req], cost, "cacheflow", SGLANG, chunk_tokens=256, force=("layer", 0.25))
    (chunk,) = [s for s in p.requests["r"].steps if s.action == Action.RECOMPUTE]
    assert (chunk.layer_start, chunk.layer_end) == (0, 8)
    # the chunk runs beside its own loads: slowed, and it pays the unlayered part whole
    expected = 1.25 * cost.recompute_s(64, 2048, layers=8)
    assert chunk.finish_s - chunk.start_s == pytest.approx(expected)
    assert expected > 1.25 * cost.recompute_s(64, 2048) / 4 + 1.25 * 0.02


RUNTIME_TOKENS = Capabilities(token_split=True, layer_split=False, load_front=True)


def test_a_forced_shape_the_executor_cannot_run_is_refused():
    req = Request("a", 0, (Span("redis", 1024),), 8)
    with pytest.raises(ValueError, match="cannot run a layer split; it runs: token, load_front"):
        plan([req], llama8b(), "cacheflow", RUNTIME_TOKENS, force=("layer", 0.5))
    with pytest.raises(ValueError, match="within"):
        plan([req], llama8b(), "cacheflow", SGLANG, force=("token", 1.5))
    with pytest.raises(ValueError, match="unknown shape"):
        plan([req], llama8b(), "cacheflow", SGLANG, force=("diagonal", 0.5))


@settings(max_examples=60, deadline=None)
@given(reqs=requests(), cost=cost_models())
def test_reuses_evicted_kv_says_which_policies_ever_load(reqs, cost):
    # The executor applies this fact to evicted KV its plan did not cover; it must agree
    # with what plan() does: a policy that never reuses never loads, `load` always does.
    for policy in policies_for(SGLANG):
        loaded = sum(
            s.tokens
            for rp in plan(reqs, cost, policy, SGLANG).requests.values()
            for s in rp.steps
            if s.action.value == "load"
        )
        if not reuses_evicted_kv(policy):
            assert loaded == 0, policy
        elif policy == "load":
            assert loaded == sum(r.evicted_tokens for r in reqs)
    with pytest.raises(ValueError, match="unknown policy"):
        reuses_evicted_kv("lru")


def test_a_recompute_beside_earlier_loads_is_slowed_while_they_run() -> None:
    # The overlap slowdown is what loads in flight cost a forward, whoever's loads they
    # are: a recompute served while an earlier request's load still runs is slowed until
    # that load ends, at full speed after it.
    shape = ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=4)
    compute = ComputeCost(tokens_per_s=500.0, step_s=0.1, overlap_slowdown=0.25)
    cost = CostModel(shape, compute, {"redis": TierCost(bandwidth_Bps=25e6)})
    s = Shaper(Request("r", 0, (Span("redis", 512),), 0), cost, SGLANG_STREAMED, 16)
    alone = cost.recompute_s(0, 512)  # 1.124 s
    recompute_all = Shape(LOAD_FRONT, 0)
    assert s.run(recompute_all, 0.0, {}).ttft == pytest.approx(alone)
    assert s.run(recompute_all, 0.0, {"redis": 0.0}).ttft == pytest.approx(alone)  # idle
    beside = s.run(recompute_all, 0.0, {"redis": 10.0}).ttft  # loads outlast it
    assert beside == pytest.approx(alone * 1.25)
    partly = s.run(recompute_all, 0.0, {"redis": 0.5}).ttft  # 0.4 s of work beside them
    assert partly == pytest.approx(0.5 + (alone - 0.5 / 1.25))
    # a split's chunk runs beside its own load anyway: slowed throughout either way
    chunk = Shape(TOKEN, 256)
    assert s.run(chunk, 0.0, {}).compute_ready == s.run(chunk, 0.0, {"redis": 10.0}).compute_ready


def test_a_recompute_is_slowed_by_a_later_requests_load_in_the_same_round() -> None:
    # The link runs ahead of the compute: r1's load starts with r0's recompute, although r0
    # is planned first. Without the slowdown the two plans below would be identical.
    shape = ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=4)
    caps = Capabilities(
        token_split=False, layer_split=False, load_front=True, streamed_tiers=frozenset()
    )  # SGLang's extend over whole-span loads
    reqs = [Request(f"r{i}", 0, (Span("redis", 512),), 16) for i in range(2)]
    ends = {}
    for slow in (0.0, 0.25):
        compute = ComputeCost(tokens_per_s=500.0, step_s=0.1, overlap_slowdown=slow)
        cost = CostModel(shape, compute, {"redis": TierCost(bandwidth_Bps=15e6)})
        p = plan(reqs, cost, "cacheflow", caps, 512)
        assert [p.requests[r].shape for r in p.order] == ["recompute all", "load all"]
        (step,) = [s for s in p.requests[p.order[0]].steps if s.action == Action.RECOMPUTE]
        (load,) = p.requests[p.order[1]].steps[:1]
        assert load.start_s == 0.0 and load.finish_s > step.finish_s  # beside it throughout
        ends[slow] = step.finish_s - step.start_s
    assert ends[0.25] == pytest.approx(ends[0.0] * 1.25)
