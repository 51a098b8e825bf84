"""A split's chunk and extend, priced with the client CPU its own load spends beside them
(``TierCost.cpu_s_per_token``), checked against hand-computed times."""

import pytest

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
from sglang_cacheflow.planner.cost import ReadCpu
from sglang_cacheflow.planner.plan import Action

SHAPE = ModelShape(4, 2, 64, 2)  # 2 KiB of KV a token
REQ = Request("r", 0, (Span("redis", 512),), 16)
CAPS = Capabilities(token_split=True, layer_split=True)


def _cost(cpu_per_token: float) -> CostModel:
    # 1000 tokens a second, no fixed cost; 256 tokens load in 1 s, no latency
    tier = TierCost(256 * 2048, 0.0, cpu_s_per_token=cpu_per_token)
    return CostModel(SHAPE, ComputeCost(1000.0), {"redis": tier})


def _chunk_s(cpu_per_token: float) -> float:
    p = plan([REQ], _cost(cpu_per_token), "cacheflow", CAPS, force=("token", 0.5))
    validate(p, [REQ], SHAPE.num_layers)
    (chunk,) = (s for s in p.requests["r"].steps if s.action is Action.RECOMPUTE)
    return chunk.finish_s - chunk.start_s


def test_a_token_splits_chunk_is_delayed_by_the_cpu_its_load_spends_meanwhile() -> None:
    assert _chunk_s(0.0) == pytest.approx(0.256)
    # the load of the back (256 tokens, 1 s) spends 0.256 s of CPU evenly: the chunk x runs
    # beside it throughout, x = 0.256 + 0.256 * x
    assert _chunk_s(1e-3) == pytest.approx(0.256 / (1 - 0.256), rel=5e-3)


def test_the_delay_is_what_overlaps_the_load() -> None:
    cpu = ReadCpu(0.5, 1.0, 2.0)  # 0.5 s of CPU over [1, 2)
    assert cpu.during(0.0, 0.5) == 0.0  # done before the load starts
    assert cpu.during(3.0, 1.0) == 0.0  # after it
    assert cpu.during(1.0, 2.0) == pytest.approx(0.5)  # beside all of it: all of it
    # begun halfway: x = 0.1 + 0.5 * x until the load ends
    assert cpu.during(1.5, 0.1) == pytest.approx(0.1, rel=1e-2)


def test_a_dearer_read_loads_less() -> None:
    cheap = plan([REQ], _cost(0.0), "cacheflow", CAPS)
    dear = plan([REQ], _cost(2e-3), "cacheflow", CAPS)
    loaded = [
        p.requests["r"].tokens_by_action(SHAPE.num_layers).get("load:redis", 0.0)
        for p in (cheap, dear)
    ]
    assert loaded[1] < loaded[0]
    assert dear.mean_ttft_s > cheap.mean_ttft_s


def test_a_layer_splits_read_costs_cpu_per_layer_it_loads() -> None:
    # per token and layer only: loading layers [l, 4) of 512 tokens spends 512 * (4 - l) * c
    c = 1e-4
    tier = TierCost(256 * 2048, 0.0, cpu_s_per_token_layer=c)
    cost = CostModel(SHAPE, ComputeCost(1000.0), {"redis": tier})
    p = plan([REQ], cost, "cacheflow", CAPS, force=("layer", 0.5))  # layers [0, 2) recomputed
    validate(p, [REQ], SHAPE.num_layers)
    steps = p.requests["r"].steps
    (chunk,) = (s for s in steps if s.action is Action.RECOMPUTE)
    (load,) = (s for s in steps if s.action is Action.LOAD)
    assert (chunk.layer_end, load.layer_start) == (2, 2)
    alone = 0.5 * 0.512  # half the layers of the 512 evicted tokens (nothing fixed)
    read = ReadCpu(512 * 2 * c, load.start_s, load.finish_s)
    assert chunk.finish_s - chunk.start_s == pytest.approx(alone + read.during(0.0, alone))
    assert chunk.finish_s - chunk.start_s > alone
