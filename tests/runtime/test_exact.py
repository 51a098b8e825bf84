"""Every restore policy reproduces a fresh prefill: KV and next-token logprobs."""

from __future__ import annotations

import pytest
import torch

from sglang_cacheflow.planner import Action
from sglang_cacheflow.planner.capabilities import Capabilities
from sglang_cacheflow.runtime.workload import prepare
from sglang_cacheflow.tiers import HostTier
from tests.runtime.helpers import VOCAB, kv_diff, logprob_diff, make_executor, random_model

TOKEN_WISE = Capabilities(token_split=True, layer_split=False)
LAYER_WISE = Capabilities(token_split=False, layer_split=True)

POLICIES = {
    "recompute": ("recompute", None),
    "load": ("load", None),
    "cake": ("cake", None),
    "cacheflow-token": ("cacheflow", TOKEN_WISE),
    "cacheflow-layer": ("cacheflow", LAYER_WISE),
}


def _kinds(steps: tuple, num_layers: int) -> set[str]:
    kinds = set()
    for s in steps:
        if s.action is Action.LOAD:
            kinds.add("load")
        elif s.action is Action.RECOMPUTE:
            kinds.add("recompute-partial-layers" if s.layer_end < num_layers else "recompute")
    return kinds


EXPECTED_KINDS = {
    "recompute": {"recompute"},
    "load": {"load"},
    "cake": {"recompute", "load"},
    "cacheflow-token": {"recompute", "load"},
    "cacheflow-layer": {"recompute-partial-layers", "load"},
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def executor(request: pytest.FixtureRequest):
    return make_executor(random_model(request.param))


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_restores_exactly(executor, name: str) -> None:
    policy, caps = POLICIES[name]
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (341,))
    # 37 tokens on device (not page aligned), 296 evicted, 8 new
    prep = prepare(executor, "r", ids, 37, [("host", 296)], salt=name)
    kwargs = {"capabilities": caps} if caps else {}
    result = executor.run([prep.request], policy, chunk_tokens=32, **kwargs)
    steps = result.plan.requests["r"].steps
    assert _kinds(steps, executor.model.num_layers) == EXPECTED_KINDS[name], steps
    assert kv_diff(prep.request.kv.data, prep.reference_kv.data, ids.numel()) <= 1e-5
    assert logprob_diff(result.requests["r"].logits, prep.reference_logits) <= 1e-4
    assert result.stats.failed_pages == 0 and result.stats.repairs == 0


def test_batch_over_two_tiers_with_default_capabilities(executor) -> None:
    """Three requests, spans on two tiers, the full CacheFlow scheduler."""
    tiers = {"host": HostTier(1 << 28), "remote": HostTier(1 << 28)}
    ex = make_executor(executor.model.model, tiers)
    torch.manual_seed(2)
    preps = []
    for i, (n, d, spans) in enumerate(
        [(400, 0, [("host", 128), ("remote", 250)]), (200, 50, [("remote", 140)]),
         (90, 16, [("host", 64)])]
    ):  # fmt: skip
        ids = torch.randint(0, VOCAB, (n,))
        preps.append(prepare(ex, f"r{i}", ids, d, spans))
    result = ex.run([p.request for p in preps], "cacheflow", chunk_tokens=32)
    actions = {s.action for rp in result.plan.requests.values() for s in rp.steps}
    assert {Action.LOAD, Action.RECOMPUTE} <= actions
    for p in preps:
        rid = p.request.id
        assert kv_diff(p.request.kv.data, p.reference_kv.data, p.request.input_ids.numel()) <= 1e-5
        assert logprob_diff(result.requests[rid].logits, p.reference_logits) <= 1e-4
    assert result.stats.loaded_bytes > 0


def test_partial_layer_forward_matches_full(executor) -> None:
    """Layers [0, 2) then [2, 4) from the stored hidden states equal one pass."""
    adapter = executor.model
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (50,))
    kv_a = executor.new_kv(50)
    kv_b = executor.new_kv(50)
    adapter.prefill(kv_a, ids[:20])
    adapter.prefill(kv_b, ids[:20])
    full = adapter.run_layers(kv_a, adapter.embed(ids[20:]), 20, 0, 4)
    mid = adapter.run_layers(kv_b, adapter.embed(ids[20:]), 20, 0, 2)
    split = adapter.run_layers(kv_b, mid, 20, 2, 4)
    assert torch.allclose(full, split, atol=1e-6)
    assert torch.equal(kv_a.data[:, :, :50], kv_b.data[:, :, :50])


def test_unsupported_model_is_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from sglang_cacheflow.runtime import ModelAdapter

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="not supported"):
        ModelAdapter(model)
