import pytest

from sglang_cacheflow.planner import ComputeCost, CostModel, ModelShape, TierCost


def llama8b(tp: int = 1) -> CostModel:
    return CostModel(
        ModelShape(32, 8, 128, 2, tp),
        ComputeCost(20000, 1e-9),
        {"redis": TierCost.from_gbps(2.5, 0.5)},
    )


def test_kv_bytes_per_token_matches_the_design_notes():
    # 2 * 32 layers * 8 heads * 128 dims * 2 bytes = 128 KiB
    assert llama8b().shape.kv_bytes_per_token == 128 * 1024
    assert llama8b(tp=2).shape.kv_bytes_per_token == 64 * 1024


def test_recompute_follows_the_scenario_formula():
    c = llama8b()
    p, n = 1000, 512
    expected = n / 20000 + 1e-9 * (n * p + n * (n - 1) / 2)
    assert c.recompute_s(p, n) == pytest.approx(expected)
    assert c.recompute_s(p, n, layers=8) == pytest.approx(expected / 4)
    assert c.recompute_s(p, 0) == 0.0


def test_a_layer_limited_forward_pays_the_unlayered_part_whole():
    shape = ModelShape(30, 3, 64, 4)
    c = CostModel(shape, ComputeCost(1000.0, 0.0, 0.1, unlayered_s=0.03))
    full = c.recompute_s(0, 300)
    assert full == pytest.approx(0.1 + 0.3)  # all layers: unchanged
    # 3 of 30 layers: a tenth of the layered work, all of the unlayered part
    assert c.recompute_s(0, 300, layers=3) == pytest.approx(0.03 + (full - 0.03) / 10)
    assert c.recompute_s(0, 300, layers=30) == pytest.approx(full)
    assert c.recompute_s(0, 0, layers=3) == 0.0
    # never more than the forward's fixed cost
    capped = CostModel(shape, ComputeCost(1000.0, 0.0, 0.01, unlayered_s=0.03))
    assert capped.recompute_s(0, 300, layers=3) == pytest.approx(0.01 + 0.3 / 10)


def test_load_is_latency_plus_bytes_over_bandwidth_per_rank():
    n = 4096
    one = llama8b().load_s("redis", n)
    assert one == pytest.approx(0.5e-3 + n * 128 * 1024 / 2.5e9)
    two = llama8b(tp=2).load_s("redis", n)
    assert two - 0.5e-3 == pytest.approx((one - 0.5e-3) / 2)
    assert llama8b().load_s("redis", n, layers=16) == pytest.approx(0.5e-3 + (one - 0.5e-3) / 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_layers": 0, "num_kv_heads": 8, "head_dim": 128}, "num_layers"),
        ({"num_layers": 2, "num_kv_heads": 8, "head_dim": 128, "tp": 3}, "tp=3"),
    ],
)
def test_bad_shapes_say_what_to_change(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelShape(**kwargs)


def test_unknown_tier_names_the_known_ones():
    with pytest.raises(KeyError, match="redis"):
        llama8b().tier("ssd")


def test_a_split_hand_off_may_be_negative_by_at_most_one_forward_fixed_cost():
    assert ComputeCost(1000.0, step_s=0.1, split_s=-0.1).split_s == -0.1
    with pytest.raises(ValueError, match="split_s must be >= -step_s"):
        ComputeCost(1000.0, step_s=0.1, split_s=-0.11)
    with pytest.raises(ValueError, match="overlap_slowdown and unlayered_s must be >= 0"):
        ComputeCost(1000.0, step_s=-0.1)
