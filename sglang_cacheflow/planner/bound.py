"""A lower bound for a round (fluid relaxation) to judge plans against.

Relaxation: every (token, layer) of every evicted span may be recomputed or loaded
independently, resources overlap perfectly and ordering constraints vanish. Recomputing
token q (all layers) costs ``1/tokens_per_s + attention_s_per_token_pair * q``; loading it
from tier t costs ``kv_bytes_per_token / bandwidth_t``, plus the tier's latency once if
anything is loaded. Prefills of new tokens stay on the compute resource.

- makespan: the smallest T such that, loading from each tier the tokens whose recompute
  costs most (the latest positions) within T, the rest fits on the compute resource in T;
- mean TTFT: the k-th request to finish cannot finish before the k-th smallest single-request
  makespan, nor before the work of the k cheapest requests spread over all resources.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sglang_cacheflow.planner.cost import CostModel
from sglang_cacheflow.planner.request import Request


@dataclass(frozen=True)
class Bound:
    mean_ttft_s: float
    makespan_s: float

    def to_dict(self) -> dict[str, float]:
        return {"mean_ttft_s": self.mean_ttft_s, "makespan_s": self.makespan_s}


def _recompute_s(cost: CostModel, lo: float, hi: float) -> float:
    """Relaxed all-layer recompute time of tokens [lo, hi) (no per-forward overhead)."""
    n = hi - lo
    if n <= 0:
        return 0.0
    c = cost.compute
    return n / c.tokens_per_s + c.attention_s_per_token_pair * n * (lo + hi - 1) / 2


def _fluid_makespan(requests: Sequence[Request], cost: CostModel) -> float:
    by_tier: dict[str, list[tuple[int, int]]] = {}
    for r in requests:
        for t, a, b in r.tier_ranges():
            by_tier.setdefault(t, []).append((a, b))
    prefill = sum(_recompute_s(cost, r.evicted_end, r.evicted_end + r.new_tokens) for r in requests)
    all_recompute = sum(_recompute_s(cost, a, b) for spans in by_tier.values() for a, b in spans)
    bpt = cost.shape.kv_bytes_per_token

    def compute_needed(T: float) -> float:
        saved = 0.0
        for tier, spans in by_tier.items():
            tc = cost.tier(tier)
            budget = (T - tc.latency_s) * tc.bandwidth_Bps / bpt  # tokens loadable in T
            if budget <= 0:
                continue
            # Load the tokens at the highest positions: find threshold q with count >= q ~ budget.
            lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
            if sum(b - a for a, b in spans) <= budget:
                q = lo
            else:
                for _ in range(60):
                    mid = (lo + hi) / 2
                    if sum(max(0.0, b - max(a, mid)) for a, b in spans) > budget:
                        lo = mid
                    else:
                        hi = mid
                q = hi
            saved += sum(_recompute_s(cost, max(a, q), b) for a, b in spans if b > q)
        return prefill + all_recompute - saved

    lo, hi = 0.0, prefill + all_recompute
    if hi == 0.0:
        return 0.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if compute_needed(mid) <= mid:
            hi = mid
        else:
            lo = mid
    return hi


def _min_work(r: Request, cost: CostModel) -> float:
    """Least total resource-seconds the request needs: each token on its cheaper resource."""
    bpt = cost.shape.kv_bytes_per_token
    c = cost.compute
    work = _recompute_s(cost, r.evicted_end, r.evicted_end + r.new_tokens)
    for t, a, b in r.tier_ranges():
        load = bpt / cost.tier(t).bandwidth_Bps
        # recompute is cheaper below position q where 1/tps + att*q == load
        if c.attention_s_per_token_pair > 0:
            q = (load - 1 / c.tokens_per_s) / c.attention_s_per_token_pair
        else:
            q = float("inf") if 1 / c.tokens_per_s <= load else float("-inf")
        split = min(max(q, a), b)
        work += _recompute_s(cost, a, split) + (b - split) * load
    return work


def fluid_bound(requests: Sequence[Request], cost: CostModel) -> Bound:
    """Lower bounds of the round's mean TTFT and makespan under any plan."""
    if not requests:
        return Bound(0.0, 0.0)
    alone = sorted(_fluid_makespan([r], cost) for r in requests)
    work = sorted(_min_work(r, cost) for r in requests)
    resources = 1 + len({t for r in requests for t, _, _ in r.tier_ranges()})
    total = acc = 0.0
    for single, w in zip(alone, work, strict=True):
        acc += w
        total += max(single, acc / resources)
    return Bound(total / len(requests), _fluid_makespan(requests, cost))
