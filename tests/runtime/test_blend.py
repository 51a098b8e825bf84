"""Chunk reuse on the reference runtime: the RoPE fix-up, the chunk store, sparse transfer,
selective recompute against full recompute, and the fallbacks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_cacheflow.blend.rope import KeyRotator
from sglang_cacheflow.blend.store import ChunkStore, chunk_key
from sglang_cacheflow.planner.blend import Selection
from sglang_cacheflow.runtime import ModelAdapter
from sglang_cacheflow.runtime.blend.restore import BlendPrompt, ChunkReuse
from sglang_cacheflow.tiers import HostTier
from sglang_cacheflow.tiers.base import KVTier, Namespace
from sglang_cacheflow.tiers.redis import RedisTier
from tests.runtime.helpers import VOCAB, logprob_diff, random_model

PAGE = 16
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
        "rope_theta": 10000.0}  # fmt: skip
ROPES = {"default": {}, "llama3": {"rope_parameters": LLAMA3}, "yarn": {"rope_parameters": YARN}}
MODELS = {name: random_model("llama", **over) for name, over in ROPES.items()}


def _keys_alone(model: torch.nn.Module, ids: torch.Tensor, offset: int) -> list[torch.Tensor]:
    """Each layer's keys ``(tokens, heads, dim)`` of ``ids`` computed alone at ``offset``."""
    positions = torch.arange(offset, offset + ids.numel())[None]
    with torch.no_grad():
        cache = model(ids[None], position_ids=positions, use_cache=True).past_key_values
    return [layer.keys[0].transpose(0, 1) for layer in cache.layers]


@pytest.mark.parametrize("rope", list(ROPES))
@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 24),
    src=st.integers(0, 150),
    dst=st.integers(0, 150),
    seed=st.integers(0, 1 << 16),
)
def test_rotated_keys_equal_a_fresh_computation_at_the_new_position(rope, n, src, dst, seed):
    """A chunk with no context before it: its keys computed at ``src`` and rotated by
    ``dst - src`` are the keys computed at ``dst``, in every layer (RoPE is relative; fp32
    within 1e-5 of the keys' scale)."""
    model = MODELS[rope]
    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    rotator = KeyRotator(model.model.rotary_emb, model.config)
    for moved, fresh in zip(
        _keys_alone(model, ids, src), _keys_alone(model, ids, dst), strict=True
    ):
        got = rotator.rotate(moved, dst - src)
        assert got.dtype == torch.float32
        err = float((got - fresh).abs().max() / fresh.abs().max())
        assert err <= 1e-5, err


def test_rotations_compose_and_a_wrong_delta_is_caught():
    """Moving by a then by b is moving by a + b; one position off is far outside 1e-5."""
    model = MODELS["llama3"]
    ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(1))
    rotator = KeyRotator(model.model.rotary_emb, model.config)
    moved = _keys_alone(model, ids, 7)[1]
    fresh = _keys_alone(model, ids, 130)[1]
    twice = rotator.rotate(rotator.rotate(moved, 100), 23)
    assert float((twice - fresh).abs().max() / fresh.abs().max()) <= 1e-5
    off_by_one = rotator.rotate(moved, 122)
    assert float((off_by_one - fresh).abs().max() / fresh.abs().max()) > 1e-2


def test_length_dependent_rope_is_refused():
    dynamic = random_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                     "rope_theta": 10000.0})  # fmt: skip
    with pytest.raises(ValueError, match=r"rope_type='dynamic'.*recompute"):
        KeyRotator(dynamic.model.rotary_emb, dynamic.config)


# -- restores ---------------------------------------------------------------------------------


def _setup(
    tier: KVTier, family: str = "llama", model_name: str = "blend-test", probe: bool = False
):
    adapter = ModelAdapter(random_model(family))
    store = ChunkStore(tier, Namespace(model_name, adapter.new_kv(1, PAGE).layout()))
    gen = torch.Generator().manual_seed(3)
    preamble = torch.randint(0, VOCAB, (5,), generator=gen)
    chunks = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (40, 70, 57)]
    probe_ids = torch.randint(0, VOCAB, (9,), generator=gen) if probe else None
    reuse = ChunkReuse(adapter, store, preamble, probe_ids)
    for chunk in chunks:
        assert reuse.store_chunk(chunk)
    # chunk 0 sits where it was computed (an exact prefix); 2 and 1 are reused elsewhere
    prompt = BlendPrompt(preamble, (chunks[0], chunks[2], chunks[1]),
                         torch.randint(0, VOCAB, (7,), generator=gen))  # fmt: skip
    return reuse, prompt, chunks


@pytest.fixture(scope="module")
def host_setup():
    return _setup(HostTier(1 << 28))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("selection", list(Selection))
def test_ratio_one_is_full_recompute(selection, family):
    reuse, prompt, _ = _setup(HostTier(1 << 28), family)
    want_logits, want_kv, _ = reuse.full(prompt)
    got = reuse.restore(prompt, selection, 1.0)
    n = prompt.tokens
    assert (got.exact, got.reused, got.recomputed) == (40, 127, 127)
    assert logprob_diff(got.logits, want_logits) < 1e-4
    assert float((got.kv.data[:, :, :n] - want_kv.data[:, :, :n]).abs().max()) < 1e-4


def test_plain_reuse_is_wrong_and_selection_repairs_part_of_it(host_setup):
    """The negative control: reusing chunk KV as is (ratio 0) does not give full recompute's
    KV or logits; the exact prefix does, and recomputing more tokens gets closer."""
    reuse, prompt, _ = host_setup
    want_logits, want_kv, _ = reuse.full(prompt)
    plain = reuse.restore(prompt, Selection.OFFLINE, 0.0)
    assert plain.recomputed == 0 and plain.ratio == 0.0
    pre_and_exact = 5 + 40
    exact_err = float(
        (plain.kv.data[:, :, :pre_and_exact] - want_kv.data[:, :, :pre_and_exact]).abs().max()
    )
    assert exact_err < 1e-5
    errors = []
    for ratio in (0.0, 0.5):
        got = reuse.restore(prompt, Selection.OFFLINE, ratio)
        errors.append(logprob_diff(got.logits, want_logits))
    assert errors[0] > 1e-3
    assert errors[1] < errors[0]


def test_sparse_transfer_reads_only_the_unselected_tokens_pages(host_setup):
    reuse, prompt, _ = host_setup
    store = reuse.store
    layer_bytes = store.layout.layer_bytes
    page_bytes = store.layout.page_bytes
    for ratio, selection in (
        (0.25, Selection.OFFLINE),
        (0.25, Selection.RANDOM),
        (0.25, Selection.ONLINE),
    ):
        before = store.tier.stats.get_bytes
        got = reuse.restore(prompt, selection, ratio)
        read = store.tier.stats.get_bytes - before
        meta = 3 * layer_bytes  # one meta layer per chunk
        exact_pages = -(-40 // PAGE)
        skipped = {70: 32 // PAGE, 57: 16 // PAGE}  # 25% rounded up to whole pages
        reused_pages = sum(-(-n // PAGE) for n in (70, 57))
        if selection is Selection.OFFLINE:
            want = (exact_pages + reused_pages - sum(skipped.values())) * page_bytes
        elif selection is Selection.RANDOM:
            want = (exact_pages + reused_pages) * page_bytes
        else:  # every chunk token from layer 1 on (layer 0 is recomputed in full)
            num_layers = store.layout.num_layers
            want = (exact_pages + reused_pages) * (num_layers - 1) * layer_bytes
        assert read == meta + want, selection
        assert got.loaded_bytes == want
        assert got.recomputed == 32 + 16


def test_a_chunk_round_trips_with_its_scores_through_redis(redis_server):
    with RedisTier(redis_server.url) as redis:
        reuse, prompt, chunks = _setup(redis, model_name="blend-redis")
        host, *_ = _setup(HostTier(1 << 28))
        for chunk in chunks:
            key = reuse.key(chunk)
            got = reuse.store.meta(key, chunk.numel())
            want = host.store.meta(key, chunk.numel())
            assert got is not None and want is not None
            assert torch.equal(got.scores, want.scores)  # the bytes that were stored
            assert torch.equal(got.order, torch.argsort(want.scores, descending=True, stable=True))
            assert got.start == 5
            assert reuse.store.meta(key, chunk.numel() + 1) is None  # another length: a miss
        from_redis = reuse.restore(prompt, Selection.OFFLINE, 0.25)
        from_host = host.restore(prompt, Selection.OFFLINE, 0.25)
        assert torch.equal(from_redis.logits, from_host.logits)


def test_a_missing_chunk_is_recomputed_and_counted():
    tier = HostTier(1 << 28)
    reuse, prompt, chunks = _setup(tier)
    want, _, _ = reuse.full(prompt)
    key = reuse.key(chunks[2])
    assert tier.delete(reuse.store.namespace, [f"{key}-m0"]) == 1
    got = reuse.restore(prompt, Selection.OFFLINE, 1.0)
    assert got.missing_chunks == 1 and not got.fallback
    assert got.reused == 70  # chunk 2 is no longer reused: it is recomputed in full
    assert got.recomputed == 70  # counted apart from the reused tokens recomputed
    assert logprob_diff(got.logits, want) < 1e-4
    for selection in Selection:  # its tokens are computed whatever the choice
        plain = reuse.restore(prompt, selection, 0.0)
        assert (plain.missing_chunks, plain.recomputed) == (1, 0)


def test_a_page_lost_mid_restore_falls_back_to_full_recompute():
    tier = HostTier(1 << 28)
    reuse, prompt, chunks = _setup(tier)
    want, _, _ = reuse.full(prompt)
    key = reuse.key(chunks[1])
    assert tier.delete(reuse.store.namespace, [f"{key}-p4"]) == 1  # meta still there
    got = reuse.restore(prompt, Selection.OFFLINE, 0.0)
    assert got.fallback
    assert logprob_diff(got.logits, want) < 1e-4


def test_corrupt_meta_is_a_miss():
    tier = HostTier(1 << 28)
    reuse, _, chunks = _setup(tier)
    ns = reuse.store.namespace
    key = reuse.key(chunks[0])
    page = tier.get(ns, f"{key}-m0")
    assert page is not None
    raw = page.view(torch.uint8).reshape(-1)
    raw[24 + 4 * 3] = 0xFF  # the order is no longer a permutation
    tier.put(ns, f"{key}-m0", page)
    assert reuse.store.meta(key, chunks[0].numel()) is None


def test_bad_input_is_refused(host_setup):
    reuse, prompt, _ = host_setup
    with pytest.raises(ValueError, match="ratio"):
        reuse.restore(prompt, Selection.OFFLINE, 1.5)
    with pytest.raises(ValueError, match="offline"):
        reuse.restore(prompt, "best", 0.2)
    other = BlendPrompt(prompt.preamble[1:], prompt.chunks, prompt.query)
    with pytest.raises(ValueError, match="preamble"):
        reuse.restore(other, Selection.OFFLINE, 0.2)
    with pytest.raises(ValueError, match="query"):
        BlendPrompt(prompt.preamble, prompt.chunks, torch.empty(0, dtype=torch.long))


def test_the_probe_scorer_orders_tokens_by_how_far_their_kv_moves():
    tier = HostTier(1 << 28)
    spectral, *_ = _setup(tier)
    probed, prompt, chunks = _setup(tier, probe=True)
    chunk = chunks[1]
    assert probed.key(chunk) == chunk_key(chunk, probed.preamble, "probe")
    assert probed.key(chunk) != spectral.key(chunk)  # two orders never share pages
    got = probed.store.meta(probed.key(chunk), chunk.numel())
    assert got is not None
    # the first stored tokens are the ones whose KV moved most after the probe
    assert torch.equal(got.order, torch.argsort(got.scores, descending=True, stable=True))
    assert float(got.scores[got.order[0]]) > float(got.scores[got.order[-1]]) > 0
    want, _, _ = probed.full(prompt)
    assert logprob_diff(probed.restore(prompt, Selection.OFFLINE, 1.0).logits, want) < 1e-4
