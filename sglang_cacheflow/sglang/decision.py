"""One request's restore decision as the controller keeps it, and what is read off a plan
for it: the split it takes, the tokens it loads, its place in the service order, the line
that logs it (and how to read that line back)."""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableSequence
from dataclasses import dataclass
from typing import Any

from sglang_cacheflow.planner import Action, CostModel, Plan, Request
from sglang_cacheflow.sglang.split import SplitRestore


@dataclass
class Decision:
    """One request's restore decision, kept until its first forward has run."""

    rid: str
    tier: str  # where the evicted span was: host or redis
    t0: float  # when it was planned (the controller's clock)
    predicted_s: float
    evicted: int
    planned_load: int
    shape: str
    work: dict[str, float]  # planned seconds per resource, owed until it has run
    alone: bool = False  # planned with nothing else owed: its restore time is its own
    split: SplitRestore | None = None  # the part loaded while the rest is recomputed
    l3_faults: int = 0  # the L3 tier's fault count when planned (tells a refusal from a fault)
    order: tuple[int, int] = (0, 0)  # (planning round, place in its plan's service order)


def planned_split(plan_: Plan, req: Request) -> tuple[int, int, bool] | None:
    """``(front, layer, one_forward)`` of a split restore the plan gives ``req``: a token
    split recomputes its span's first ``front`` tokens and loads the rest (``layer`` 0); a
    layer split recomputes layers ``[0, layer)`` of the whole span and loads the others
    (``front`` 0); ``one_forward``: in its new tokens' forward. None when the plan loads the
    span's front, all of it or nothing."""
    rp = plan_.requests[req.id]
    loads = [s for s in rp.steps if s.action is Action.LOAD]
    if not loads:
        return None
    layer = min(s.layer_start for s in loads)
    if layer > 0:
        return 0, layer, rp.one_forward
    start = min(s.start for s in loads)
    if start <= req.device_tokens or max(s.end for s in loads) < req.evicted_end:
        return None
    return start - req.device_tokens, 0, rp.one_forward


def loaded_tokens(plan_: Plan, rid: str) -> int:
    """Tokens the plan loads for ``rid`` (any layer range counted as the whole token)."""
    return sum(s.tokens for s in plan_.requests[rid].steps if s.action is Action.LOAD)


def describe(plan_: Plan, req: Request, tier: str, cost: CostModel) -> str:
    """The decision log line of ``req`` (its fields are documented in docs/sglang.md)."""
    rp = plan_.requests[req.id]
    e = req.evicted_tokens
    # a layer range counts its share of a token (e.g. layer split 2/4: half of each)
    load = round(rp.tokens_by_action(cost.shape.num_layers).get(f"load:{tier}", 0.0))
    alone_load = cost.load_s(tier, e) + cost.recompute_s(req.evicted_end, req.new_tokens)
    alone_recompute = cost.recompute_s(req.device_tokens, e + req.new_tokens)
    c, t = cost.compute, cost.tier(tier)
    position = f"#{plan_.order.index(req.id) + 1} of {len(plan_.order)} in round"
    extra = ""
    if t.cpu_s_per_token or t.cpu_s_per_load:  # what a split's read costs the process
        extra = f", split read CPU {t.cpu_s_per_token * 1e6:.1f} us/token"
        extra += f" + {t.cpu_s_per_token_layer * 1e6:.2f} us/token-layer"
        extra += f" + {t.cpu_s_per_load * 1e3:.2f} ms"
    if req.staged_load is not None:  # what a load that is not a split may bring
        extra += f"; stages {req.staged_load[0]}-{req.staged_load[1]} tokens"
    return (
        f"cacheflow restore rid={req.id} policy={plan_.policy}: device {req.device_tokens}, "
        f"{e} evicted on {tier}, {req.new_tokens} new -> load {load} from {tier}, "
        f"recompute {e - load} ({rp.shape}, {position}); "
        f"predicted {rp.predicted_ttft_s * 1e3:.2f} ms (alone: load all {alone_load * 1e3:.2f} ms, "
        f"recompute all {alone_recompute * 1e3:.2f} ms; compute {c.tokens_per_s:.0f} tok/s + "
        f"{c.attention_s_per_token_pair:.2g} s/pair + {c.step_s * 1e3:.1f} ms/forward "
        f"({c.unlayered_s * 1e3:.1f} outside the layers), "
        f"overlap +{c.overlap_slowdown:.0%}, split hand-off {c.split_s * 1e3:.1f} ms, "
        f"{tier} {t.bandwidth_Bps / 1e9:.3f} GB/s + {t.latency_s * 1e3:.2f} ms{extra})"
    )


@dataclass(frozen=True)
class LoggedDecision:
    """What :func:`logged_decisions` reads back from a decision log line."""

    rid: str
    policy: str
    tier: str
    evicted: int
    loaded: int
    recomputed: int
    shape: str  # e.g. "load front 256+256", "layer split 12/30"
    round_size: int  # restores planned in the same round as this one


_LOGGED = re.compile(
    r"cacheflow restore rid=(\S+) policy=(\S+): device \d+, (\d+) evicted on (\S+), \d+ new "
    r"-> load (\d+) from \S+, recompute (\d+) \(([^,]+), #\d+ of (\d+) in round\)"
)


def logged_decisions(log: str, tier: str | None = None) -> list[LoggedDecision]:
    """The decisions :func:`describe` logged in ``log`` (a server's log text), in order;
    only those of ``tier`` when given."""
    out = [
        LoggedDecision(rid, policy, t, int(e), int(a), int(b), shape, int(n))
        for rid, policy, e, t, a, b, shape, n in _LOGGED.findall(log)
    ]
    return [d for d in out if tier is None or d.tier == tier]


def serve_in_plan_order(queue: MutableSequence[Any], order: Mapping[str, tuple[int, int]]) -> None:
    """Put the planned restores of SGLang's waiting ``queue`` (requests with a ``rid``) in
    the order their plans serve them, in the places they hold; other requests keep theirs.

    The plan's TTFTs assume that order (e.g. the request it recomputes first, while the
    next ones load, is admitted first); SGLang's FCFS admission would serve arrival order.
    A cache-aware schedule policy (``lpm``...) sorts the queue again after this."""
    places = [i for i, r in enumerate(queue) if r.rid in order]
    if len(places) < 2:
        return
    planned = sorted((queue[i] for i in places), key=lambda r: order[r.rid])
    for i, r in zip(places, planned, strict=True):
        queue[i] = r
