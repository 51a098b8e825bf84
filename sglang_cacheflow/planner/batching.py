"""When a baseline's restores get their first token on an engine that batches prefills.

SGLang admits every waiting request that fits a prefill forward's token budget (its
``chunked_prefill_size``) into one forward; the request that does not fit runs its first
chunk there and the rest in the next forward. Every request of a forward gets its first
token when that forward ends. So restores that recompute everything (nothing to wait for)
and are planned together are not served one after another, as the planner's schedule
times its compute resource, but in forwards of up to ``budget`` tokens: the first restore
of a round of eight waits for all eight. CacheFlow's executor serves its restores one per
forward, in the order its schedule times them; the baselines (``recompute``, ``load``)
keep the engine's batching, and their predictions are re-timed here.

A round with loads (``load``, or ``cake`` and its streamed splits) keeps the schedule's
times. The re-timed steps keep the schedule's form: within a forward the pieces run one after
another in service order (the forward's fixed cost is paid once, by its first piece), and a
restore's predicted TTFT is the end of the forward that holds its last token, which may be
later than its last step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from sglang_cacheflow.planner.cost import ComputeCost
from sglang_cacheflow.planner.plan import Action, RequestPlan, Step
from sglang_cacheflow.planner.request import Request


def batch_prefills(
    plans: Mapping[str, RequestPlan],
    requests: Mapping[str, Request],
    compute: ComputeCost,
    num_layers: int,
    budget: int,
    start_s: float,
) -> dict[str, RequestPlan]:
    """Re-time ``plans`` (in service order) as the engine's batched forwards of up to
    ``budget`` tokens, the first one starting at ``start_s`` (when the compute resource is
    free), if none of them loads: a restore whose forward waits for its load joins
    whichever forward runs when the load ends, which the schedule's times do not say, so
    a round with loads keeps its schedule."""
    if budget < 1:
        raise ValueError(f"a prefill forward's token budget must be >= 1, got {budget}")
    if len(plans) < 2 or any(s.action is Action.LOAD for rp in plans.values() for s in rp.steps):
        return dict(plans)
    batched = [rid for rid, rp in plans.items() if rp.steps]
    steps: dict[str, list[Step]] = {rid: [] for rid in batched}
    ends: dict[str, float] = {}
    t = start_s
    room = budget  # tokens left in the forward being filled
    open_: list[str] = []  # requests with a piece in the forward being filled
    first_piece = True

    def close() -> None:
        nonlocal room, first_piece
        for rid in open_:
            ends[rid] = t  # its first token, if this forward holds its last piece
        open_.clear()
        room, first_piece = budget, True

    for rid in batched:
        req = requests[rid]
        pos, end, last = req.device_tokens, req.evicted_end, req.evicted_end + req.new_tokens
        while pos < last:
            if room == 0:
                close()
            hi = min(last, pos + room)
            room -= hi - pos
            pieces = ((pos, min(hi, end), Action.RECOMPUTE), (max(pos, end), hi, Action.PREFILL))
            for a, b, action in pieces:
                if a >= b:
                    continue
                # a forward's fixed cost is paid once, by its first piece
                dur = compute.seconds(a, b - a) - (0.0 if first_piece else compute.step_s)
                first_piece = False
                steps[rid].append(Step(a, b, 0, num_layers, action, None, t, t + dur))
                t += dur
            if rid not in open_:
                open_.append(rid)
            pos = hi
    close()
    out = dict(plans)
    for rid in batched:
        out[rid] = replace(plans[rid], steps=tuple(steps[rid]), predicted_ttft_s=ends[rid])
    return out
