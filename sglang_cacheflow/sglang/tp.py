"""Identical restore decisions on every tensor-parallel rank.

The planner is deterministic, so ranks decide alike when they feed it identical inputs. What
differs between ranks is what each measured: its calibrated cost model and, for L3 hits, what
its own storage lookup found. :func:`reduce_round` makes those identical with **one**
``all_reduce(MIN)`` over the TP CPU (gloo) group per planning round, whatever the number of
requests in it: compute throughput and tier bandwidths take the minimum, per-token-pair,
per-forward (and its unlayered part), overlap, split hand-off, latency and read CPU costs
the maximum (so every rank plans with the most conservative view), hit lengths the minimum (a page
counts only if every rank has it), and the work the resources still owe earlier rounds the
maximum (ranks read their clocks at slightly different times).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from sglang_cacheflow.planner import ComputeCost, CostModel, TierCost
from sglang_cacheflow.planner.plan import COMPUTE

__all__ = ["cost_from_vector", "cost_vector", "reduce_round"]

_COMPUTE_FIELDS = 6  # ComputeCost's fields, in order, first in the vector
_TIER_FIELDS = 6  # TierCost's fields, in order, per tier after them


def cost_vector(cost: CostModel, tiers: Sequence[str]) -> list[float]:
    """The cost model as numbers whose MIN is the conservative choice (costs negated)."""
    c = cost.compute
    out = [c.tokens_per_s, -c.attention_s_per_token_pair, -c.step_s]
    out += [-c.overlap_slowdown, -c.split_s, -c.unlayered_s]
    for name in tiers:
        t = cost.tier(name)
        out += [t.bandwidth_Bps, -t.latency_s, -t.setup_s]
        out += [-t.cpu_s_per_token, -t.cpu_s_per_load, -t.cpu_s_per_token_layer]
    return out


def cost_from_vector(cost: CostModel, tiers: Sequence[str], vec: Sequence[float]) -> CostModel:
    compute = ComputeCost(vec[0], *(-x for x in vec[1:_COMPUTE_FIELDS]))
    new_tiers = dict(cost.tiers)
    for i, name in enumerate(tiers):
        j = _COMPUTE_FIELDS + _TIER_FIELDS * i
        new_tiers[name] = TierCost(vec[j], *(-x for x in vec[j + 1 : j + _TIER_FIELDS]))
    return replace(cost, compute=compute, tiers=new_tiers)


def reduce_round(
    cost: CostModel,
    hits: Sequence[int],
    group: Any | None,
    busy: Mapping[str, float] | None = None,
) -> tuple[CostModel, list[int], dict[str, float]]:
    """The cost model, hit lengths and busy seconds per resource (the planner's ``busy``)
    every rank of ``group`` agrees on, in one collective.

    ``group`` is a ``torch.distributed`` process group (SGLang's TP ``cpu_group``); None or a
    group of one rank returns the inputs unchanged.
    """
    busy = dict(busy or {})
    if group is None or torch.distributed.get_world_size(group) <= 1:
        return cost, list(hits), busy
    tiers = sorted(cost.tiers)
    resources = [COMPUTE, *tiers]
    vec = cost_vector(cost, tiers)
    t = torch.tensor(
        [*vec, *(-busy.get(r, 0.0) for r in resources), *(float(h) for h in hits)],
        dtype=torch.float64,
    )
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=group)
    values = t.tolist()
    n, m = len(vec), len(vec) + len(resources)
    agreed = {r: -v for r, v in zip(resources, values[n:m], strict=True) if v < 0}
    return cost_from_vector(cost, tiers, values[:n]), [int(v) for v in values[m:]], agreed
