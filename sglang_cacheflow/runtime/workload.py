"""Setting up restores to run: prefill a context, write its pages to tiers, evict it.

Used by the tests, the restore benchmark and engines' integration tests: the reference
KV of a fresh prefill is what a restore must reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglang_cacheflow.planner import ComputeCost, CostModel, ModelShape, Span, TierCost
from sglang_cacheflow.runtime.executor import Executor
from sglang_cacheflow.runtime.kv import KVCache
from sglang_cacheflow.runtime.model import ModelAdapter
from sglang_cacheflow.runtime.pages import page_hashes, store_pages
from sglang_cacheflow.runtime.request import RestoreRequest


@dataclass
class Prepared:
    """A request ready to restore, and the fresh prefill it must reproduce."""

    request: RestoreRequest
    reference_kv: KVCache  # KV of every token after a plain prefill
    reference_logits: torch.Tensor  # next-token logits after the last token


def prepare(
    executor: Executor,
    rid: str,
    input_ids: torch.Tensor,
    device_tokens: int,
    spans: Sequence[tuple[str, int]],
    *,
    salt: str = "",
    reference: bool = True,
) -> Prepared:
    """Prefill ``input_ids``, store the pages of the evicted ``spans`` (``(tier, tokens)``
    in prefix order after ``device_tokens``) in their tiers, then forget the evicted KV
    (NaN) and the new tokens' KV; returns the request and the reference."""
    ids = input_ids.reshape(-1)
    n = ids.numel()
    kv = executor.new_kv(n)
    T = executor.page_tokens
    hashes = page_hashes(ids, T, salt=f"{executor.namespace.model}:{salt}")
    logits = executor.model.prefill(kv, ids)
    pos = device_tokens
    for tier, tokens in spans:
        if tokens:
            store_pages(executor.tiers[tier], executor.namespace, kv, hashes,
                        pos // T, -(-(pos + tokens) // T))  # fmt: skip
        pos += tokens
    ref = KVCache(kv.data.clone(), T) if reference else kv
    kv.clear(device_tokens)
    req = RestoreRequest(rid, ids, device_tokens, tuple(Span(t, k) for t, k in spans), kv, hashes)
    return Prepared(req, ref, logits)


def model_shape(model: ModelAdapter, tp: int = 1) -> ModelShape:
    """The planner's view of ``model`` (``model`` is one rank's shard when ``tp > 1``)."""
    i = model.info
    itemsize = torch.empty((), dtype=i.dtype).element_size()
    return ModelShape(i.num_layers, i.num_kv_heads * tp, i.head_dim, itemsize, tp)


def balanced_cost(
    model: ModelAdapter,
    tokens_per_s: float,
    tiers: Sequence[str],
    attention_s_per_token_pair: float = 0.0,
    tp: int = 1,
) -> CostModel:
    """A prior where loading a token costs what recomputing it does (every tier alike)."""
    shape = model_shape(model, tp)
    bw = shape.kv_bytes_per_token * tokens_per_s
    return CostModel(
        shape,
        ComputeCost(tokens_per_s, attention_s_per_token_pair),
        {t: TierCost(bw) for t in tiers},
    )
