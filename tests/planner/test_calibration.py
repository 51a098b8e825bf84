"""Calibration recovers a cost model from measurements and predicts them within 10%."""

import random
from dataclasses import replace

import pytest

from sglang_cacheflow.planner import (
    Calibrator,
    ComputeCost,
    CostModel,
    ModelShape,
    TierCost,
    attention_ratio,
)

SHAPE = ModelShape(30, 3, 64, 2)
PRIOR = CostModel(SHAPE, ComputeCost(1000.0), {"redis": TierCost(1e9, 1e-3)})


def test_compute_fit_predicts_its_samples_within_10_percent():
    truth = ComputeCost(tokens_per_s=8000, attention_s_per_token_pair=4e-8, step_s=0.004)
    rng = random.Random(0)
    cal = Calibrator(PRIOR)
    samples = []
    for _ in range(200):
        p, n = rng.randrange(0, 4096), rng.randrange(1, 2048)
        layers = rng.choice([None, 10, 30])
        frac = 1.0 if layers is None else layers / 30
        t = frac * truth.seconds(p, n) * rng.uniform(0.97, 1.03)  # measurement noise
        cal.add_compute(p, n, t, layers)
        samples.append((p, n, layers, t))
    fitted = cal.model()
    for p, n, layers, t in samples:
        assert fitted.recompute_s(p, n, layers) == pytest.approx(t, rel=0.10)
    assert fitted.compute.tokens_per_s == pytest.approx(8000, rel=0.05)
    assert fitted.compute.attention_s_per_token_pair == pytest.approx(4e-8, rel=0.10)


def test_negative_coefficients_are_dropped():
    # purely linear timings: the attention and step terms must come out as zero, not < 0
    cal = Calibrator(PRIOR)
    for n in range(10, 2000, 37):
        cal.add_compute(n, n, n / 5000)
    c = cal.compute_cost()
    assert c.attention_s_per_token_pair >= 0 and c.step_s >= 0
    assert c.tokens_per_s == pytest.approx(5000, rel=0.01)


def test_tier_tracks_bandwidth_and_latency_and_follows_changes():
    cal = Calibrator(PRIOR, decay=0.8)
    rng = random.Random(1)
    sizes = [rng.choice([2**16, 2**20, 2**23]) for _ in range(60)]
    for b in sizes:
        cal.add_transfer("redis", b, 2e-4 + b / 2.5e9)
    t = cal.model().tier("redis")
    assert t.bandwidth_Bps == pytest.approx(2.5e9, rel=0.02)
    assert t.latency_s == pytest.approx(2e-4, rel=0.05)
    for b in sizes:  # the link slows down: recent samples dominate
        cal.add_transfer("redis", b, 2e-4 + b / 1e9)
    assert cal.model().tier("redis").bandwidth_Bps == pytest.approx(1e9, rel=0.05)
    for b in sizes:
        assert cal.model().load_s("redis", b / SHAPE.kv_bytes_per_token) == pytest.approx(
            2e-4 + b / 1e9, rel=0.10
        )


def test_one_transfer_size_keeps_the_prior_latency():
    cal = Calibrator(PRIOR)
    for _ in range(10):
        cal.add_transfer("redis", 1e6, 1e-3 + 1e6 / 2e9)
    t = cal.model().tier("redis")
    assert t.latency_s == pytest.approx(1e-3)
    assert t.bandwidth_Bps == pytest.approx(2e9, rel=1e-6)


def test_too_few_samples_keep_the_prior():
    cal = Calibrator(PRIOR)
    cal.add_compute(0, 100, 0.1)
    assert cal.model().compute == PRIOR.compute


def test_forwards_overlapped_by_loads_give_the_slowdown():
    truth = ComputeCost(tokens_per_s=8000, attention_s_per_token_pair=4e-8, step_s=0.004)
    cal = Calibrator(PRIOR)
    rng = random.Random(2)
    for _ in range(100):
        p, n = rng.randrange(0, 4096), rng.randrange(1, 2048)
        cal.add_compute(p, n, truth.seconds(p, n))
        cal.add_compute(p, n, 1.4 * truth.seconds(p, n), overlapped=True)
    fitted = cal.model().compute
    assert fitted.overlap_slowdown == pytest.approx(0.4, rel=0.05)
    assert fitted.tokens_per_s == pytest.approx(8000, rel=0.05)


def test_the_slowdown_follows_the_recent_forwards_beside_reads_weighted_by_time():
    truth = ComputeCost(tokens_per_s=8000, attention_s_per_token_pair=0.0, step_s=0.004)
    cal = Calibrator(PRIOR)
    for n in range(100, 2100, 100):
        cal.add_compute(0, n, truth.seconds(0, n))
    for _ in range(40):  # an idle server: 10% slower beside reads
        cal.add_compute(0, 1000, 1.1 * truth.seconds(0, 1000), overlapped=True)
    assert cal.model().compute.overlap_slowdown == pytest.approx(0.1, rel=1e-6)
    for _ in range(cal.overlap_window):  # under load: 80%
        cal.add_compute(0, 1000, 1.8 * truth.seconds(0, 1000), overlapped=True)
    assert cal.model().compute.overlap_slowdown == pytest.approx(0.8, rel=1e-6)
    # a short forward's large excess counts by the time it costs, not one vote in two
    cal = Calibrator(PRIOR)
    for n in range(100, 2100, 100):
        cal.add_compute(0, n, truth.seconds(0, n))
    cal.add_compute(0, 2000, 1.2 * truth.seconds(0, 2000), overlapped=True)  # 0.3 s
    cal.add_compute(0, 10, 3.0 * truth.seconds(0, 10), overlapped=True)  # 5 ms
    long_s, short_s = truth.seconds(0, 2000), truth.seconds(0, 10)
    want = (1.2 * long_s + 3.0 * short_s) / (long_s + short_s) - 1
    assert cal.model().compute.overlap_slowdown == pytest.approx(want, rel=1e-6)


def test_the_unlayered_part_keeps_thin_chunks_from_reading_as_slowdown():
    # a forward pays 30 ms outside its layer loop whatever layers it runs; chunks through
    # 1-3 of 30 layers beside reads run 20% slower than that model
    truth = CostModel(SHAPE, ComputeCost(600.0, 0.0, 0.13, unlayered_s=0.03))
    rng = random.Random(3)
    samples = [(rng.randrange(0, 512), rng.randrange(16, 768)) for _ in range(60)]
    chunks = [(p, n, rng.randrange(1, 4)) for p, n in samples[:20]]
    fits = {}
    for measured in (False, True):
        cal = Calibrator(PRIOR)
        for p, n in samples:
            cal.add_compute(p, n, truth.recompute_s(p, n))
            if measured:
                cal.add_unlayered(0.03 * rng.uniform(0.95, 1.05))
        for p, n, layers in chunks:
            cal.add_compute(p, n, 1.2 * truth.recompute_s(p, n, layers), layers, True)
        fits[measured] = cal.model().compute
    with_u, without = fits[True], fits[False]
    assert with_u.unlayered_s == pytest.approx(0.03, rel=0.05)
    assert with_u.step_s == pytest.approx(0.13, rel=0.02)
    assert with_u.overlap_slowdown == pytest.approx(0.2, abs=0.02)
    # scaled with the layers, the unlayered part reads as a large slowdown
    assert without.unlayered_s == 0.0
    assert without.overlap_slowdown > 0.5


def test_restore_overhead_is_learnt_per_tier_and_added_to_its_setup() -> None:
    prior = CostModel(ModelShape(4, 2, 32, 4), ComputeCost(1e4), {"redis": TierCost(1e8, 1e-3)})
    cal = Calibrator(prior)
    assert cal.setup_s("redis") == 0.0

    def predicted() -> float:  # a load-all restore: the transfer, then the tier's setup
        model = cal.model()
        return model.load_s("redis", 256) + model.tiers["redis"].setup_s

    base = prior.load_s("redis", 256)
    for _ in range(30):  # restores take 50 ms longer than their transfer
        cal.add_restore("redis", base + 0.05, predicted())
    assert cal.setup_s("redis") == pytest.approx(0.05, rel=0.05)
    assert cal.model().tiers["redis"].setup_s == pytest.approx(0.05, rel=0.05)
    for _ in range(30):  # as fast as the transfer: the extra decays, never below 0
        cal.add_restore("redis", base, predicted())
    assert 0.0 <= cal.setup_s("redis") < 0.001


def test_split_overhead_is_learnt_and_charged_to_split_shapes_only() -> None:
    # A split restore pays a hand-off between its chunk and its extend that no forward
    # measures; learnt from split restores that ran alone, charged to split shapes.
    from sglang_cacheflow.planner import Request, Span
    from sglang_cacheflow.planner.capabilities import RUNTIME
    from sglang_cacheflow.planner.shapes import LAYER, LOAD_FRONT, TOKEN, Shape, Shaper

    compute = ComputeCost(1e4, step_s=0.05)
    prior = CostModel(ModelShape(4, 2, 32, 4), compute, {"redis": TierCost(1e7)})
    cal = Calibrator(prior)
    req = Request("r", 0, (Span("redis", 512),), 16)

    def ttft(shape: Shape) -> float:
        return Shaper(req, cal.model(), RUNTIME, 64).run(shape, 0.0, {}).ttft

    split, whole = Shape(LAYER, 2), Shape(LOAD_FRONT, 0)
    base_split, base_whole, base_token = ttft(split), ttft(whole), ttft(Shape(TOKEN, 256))
    for _ in range(30):  # split restores take 40 ms longer than their forwards and read
        cal.add_split(ttft(split) - cal.model().compute.split_s + 0.04, ttft(split))
    assert cal.model().compute.split_s == pytest.approx(0.04, rel=0.05)
    assert ttft(split) == pytest.approx(base_split + 0.04, rel=1e-3)
    assert ttft(Shape(TOKEN, 256)) == pytest.approx(base_token + 0.04, rel=1e-3)  # Cake's too
    # pure shapes (recompute all, load all, as a layer or token "split" at an end) do not
    assert ttft(whole) == base_whole
    assert ttft(Shape(LAYER, 4)) == ttft(Shape(TOKEN, 512))
    for _ in range(40):  # as fast as predicted without it: it decays to 0
        cal.add_split(base_split, ttft(split))
    assert abs(cal.model().compute.split_s) < 0.001
    for _ in range(40):  # 30 ms faster than its forwards' prices: learnt below 0
        cal.add_split(base_split - 0.03, ttft(split))
    assert cal.model().compute.split_s == pytest.approx(-0.03, rel=0.05)
    assert ttft(split) == pytest.approx(base_split - 0.03, rel=1e-3)
    assert ttft(whole) == base_whole
    for _ in range(40):  # never below minus one forward's fixed cost
        cal.add_split(0.0, ttft(split))
    assert cal.model().compute.split_s == pytest.approx(-compute.step_s)


def test_an_attention_term_within_the_noise_is_left_out_until_samples_show_it():
    # Prefills of 64-512 tokens from an empty cache cannot tell the attention term from the
    # per-token one: the fit keeps it out rather than trade one for the other on noise.
    truth = ComputeCost(tokens_per_s=600, attention_s_per_token_pair=4e-7, step_s=0.1)
    rng = random.Random(3)
    cal = Calibrator(PRIOR)
    for _ in range(4):
        for n in (64, 128, 256, 512):
            cal.add_compute(0, n, truth.seconds(0, n) * rng.uniform(0.92, 1.08))
    short = cal.compute_cost()
    assert short.attention_s_per_token_pair == 0.0
    for n in (64, 256, 512):
        assert short.seconds(0, n) == pytest.approx(truth.seconds(0, n), rel=0.10)
    # long prefixes, where attention is most of a forward: now it is there to see
    for p in (4096, 8192, 16384):
        for n in (256, 1024):
            cal.add_compute(p, n, truth.seconds(p, n) * rng.uniform(0.97, 1.03))
    assert cal.compute_cost().attention_s_per_token_pair == pytest.approx(4e-7, rel=0.2)


def test_the_reads_cpu_charged_apart_is_not_read_as_slowdown():
    # A forward beside reads is delayed by the client CPU spent meanwhile, whatever its
    # length: charged apart, it leaves only the proportional slowdown.
    truth = ComputeCost(tokens_per_s=8000, step_s=0.004)
    cal = Calibrator(PRIOR)
    for n in (64, 256, 1024, 2048):
        cal.add_compute(0, n, truth.seconds(0, n))
    for n, cpu in ((64, 0.03), (1024, 0.01), (2048, 0.05)):
        cal.add_compute(0, n, 1.1 * truth.seconds(0, n) + cpu, overlapped=True, read_cpu_s=cpu)
    assert cal.model().compute.overlap_slowdown == pytest.approx(0.1, rel=1e-6)
    # not charged, the same delays inflate it
    blind = Calibrator(PRIOR)
    for n in (64, 256, 1024, 2048):
        blind.add_compute(0, n, truth.seconds(0, n))
    for n, cpu in ((64, 0.03), (1024, 0.01), (2048, 0.05)):
        blind.add_compute(0, n, 1.1 * truth.seconds(0, n) + cpu, overlapped=True)
    assert blind.model().compute.overlap_slowdown > 0.2


def test_a_tiers_cpu_terms_survive_its_calibration():
    cal = Calibrator(PRIOR)
    cpu = {"cpu_s_per_token": 3e-5, "cpu_s_per_load": 1e-3, "cpu_s_per_token_layer": 1e-6}
    cal.set_tier_prior("redis", TierCost(1e9, 1e-3, **cpu))
    for nbytes in (1e6, 4e6, 1e7):
        cal.add_transfer("redis", nbytes, 2e-3 + nbytes / 5e8)
    fitted = cal.model().tier("redis")
    assert fitted.bandwidth_Bps == pytest.approx(5e8, rel=1e-3)
    assert (fitted.cpu_s_per_token, fitted.cpu_s_per_load, fitted.cpu_s_per_token_layer) == (
        3e-5,
        1e-3,
        1e-6,
    )
    assert fitted.read_cpu_s(100, 10) == pytest.approx(1e-3 + 100 * (3e-5 + 10 * 1e-6))
    assert fitted.read_cpu_s(0, 10) == 0.0


def test_the_models_attention_ratio_prices_attention_the_prefills_cannot_show():
    # The same empty-cache prefills as above, on a model whose attention costs what its
    # arithmetic says: with the ratio known, a returning turn's extend over a long prefix is
    # priced within 10%; without it, the fit drops the term and misses that extend by far.
    ratio = 3.26e-4  # SmolLM2-135M: attention_ratio(576, 9, 3, 64, 1536)
    truth = ComputeCost(tokens_per_s=700, attention_s_per_token_pair=ratio / 700, step_s=0.1)
    shaped = CostModel(replace(SHAPE, attention_ratio=ratio), PRIOR.compute, PRIOR.tiers)
    rng = random.Random(4)
    fits = {}
    for name, prior in (("ratio", shaped), ("no ratio", PRIOR)):
        cal = Calibrator(prior)
        for _ in range(4):
            for n in (64, 128, 256, 512):
                cal.add_compute(0, n, truth.seconds(0, n) * rng.uniform(0.92, 1.08))
        fits[name] = cal.compute_cost()
    assert fits["no ratio"].attention_s_per_token_pair == 0.0
    assert fits["ratio"].attention_s_per_token_pair == pytest.approx(
        ratio / fits["ratio"].tokens_per_s
    )
    for p, n in ((400, 525), (2048, 16), (4096, 256)):
        assert fits["ratio"].seconds(p, n) == pytest.approx(truth.seconds(p, n), rel=0.10)
    assert fits["no ratio"].seconds(4096, 256) < 0.75 * truth.seconds(4096, 256)


def test_attention_the_samples_show_overrides_the_models_ratio():
    # CPU attention kernels can run well below their arithmetic's share: extends over long
    # prefixes show a term three times the ratio, and the fit takes it.
    ratio = 1e-4
    truth = ComputeCost(tokens_per_s=600, attention_s_per_token_pair=3 * ratio / 600, step_s=0.1)
    cal = Calibrator(CostModel(replace(SHAPE, attention_ratio=ratio), PRIOR.compute, PRIOR.tiers))
    rng = random.Random(5)
    for p in (0, 1024, 4096, 8192):
        for n in (16, 256, 1024):
            cal.add_compute(p, n, truth.seconds(p, n) * rng.uniform(0.97, 1.03))
    fitted = cal.compute_cost()
    assert fitted.attention_s_per_token_pair == pytest.approx(3 * ratio / 600, rel=0.2)
    assert fitted.tokens_per_s == pytest.approx(600, rel=0.1)


def test_attention_ratio_counts_a_layers_arithmetic():
    # SmolLM2-135M: 9 query heads of 64, 3 KV heads, hidden 576, gated MLP of 1536
    per_token = 576 * 64 * (2 * 9 + 2 * 3) + 3 * 576 * 1536
    assert attention_ratio(576, 9, 3, 64, 1536) == pytest.approx(2 * 9 * 64 / per_token)
    assert attention_ratio(576, 9, 3, 64, 1536, mlp_matrices=2) > attention_ratio(
        576, 9, 3, 64, 1536
    )
    with pytest.raises(ValueError, match="positive"):
        attention_ratio(576, 0, 3, 64, 1536)
    with pytest.raises(ValueError, match="attention_ratio"):
        ModelShape(30, 3, 64, 2, attention_ratio=1.5)
