"""Hypothesis strategies for random rounds and cost models."""

from __future__ import annotations

from hypothesis import strategies as st

from sglang_cacheflow.planner import ComputeCost, CostModel, ModelShape, Request, Span, TierCost

TIERS = ("host", "redis", "disk")


@st.composite
def cost_models(draw: st.DrawFn) -> CostModel:
    layers = draw(st.sampled_from([1, 2, 4, 30, 32]))
    heads = draw(st.sampled_from([1, 2, 8]))
    tp = draw(st.sampled_from([1, 2])) if heads % 2 == 0 else 1
    shape = ModelShape(layers, heads, draw(st.sampled_from([64, 128])), 2, tp)
    compute = ComputeCost(
        tokens_per_s=draw(st.floats(1e3, 1e5)),
        attention_s_per_token_pair=draw(st.sampled_from([0.0, 1e-10, 1e-9, 1e-8])),
        step_s=draw(st.sampled_from([0.0, 1e-3, 0.1])),
        overlap_slowdown=draw(st.sampled_from([0.0, 0.3])),
        unlayered_s=draw(st.sampled_from([0.0, 3e-4, 0.03])),
    )
    tiers = {
        t: TierCost(
            draw(st.floats(1e8, 5e10)),
            draw(st.sampled_from([0.0, 1e-4, 2e-3])),
            draw(st.sampled_from([0.0, 0.0, 5e-3])),  # setup after a load
        )
        for t in TIERS
    }
    return CostModel(shape, compute, tiers)


@st.composite
def requests(draw: st.DrawFn, max_requests: int = 6, max_span: int = 8192) -> list[Request]:
    n = draw(st.integers(1, max_requests))
    out = []
    for i in range(n):
        spans = tuple(
            Span(draw(st.sampled_from(TIERS)), draw(st.integers(0, max_span)))
            for _ in range(draw(st.integers(0, 3)))
        )
        out.append(
            Request(
                f"q{i}",
                draw(st.integers(0, 3000)),
                spans,
                draw(st.integers(0, 300)),
            )
        )
    return out
