"""The check every executor runs on a plan before executing it.

A plan is valid when, for every request:

- every (token, layer) of the evicted span is covered by exactly one RECOMPUTE or LOAD step,
  and the new tokens by PREFILL steps over all layers;
- a LOAD reads only tokens its tier holds;
- a RECOMPUTE of tokens [a, b) at layers [l0, l1) reads KV of [d, a) at those layers produced
  by steps listed before it, and the hidden states of [a, b) at layer l0 - 1 from a RECOMPUTE
  listed before it; a PREFILL reads the whole span at every layer;
- the predicted times agree: a step begins a layer only after the KV and hidden states it
  reads for that layer are predicted ready, and steps on one resource (the compute resource,
  one I/O channel per tier) never overlap;
- the predicted TTFT is not before the request's last step ends (it may be later: on an
  engine that batches prefills a restore's first token comes when its forward ends,
  :mod:`~sglang_cacheflow.planner.batching`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from sglang_cacheflow.planner.plan import Action, Plan, RequestPlan, Step
from sglang_cacheflow.planner.request import Request


class PlanError(ValueError):
    """A plan that an executor must not run."""


def _area(s: Step, a: int, b: int, l0: int, l1: int) -> int:
    return max(0, min(s.end, b) - max(s.start, a)) * max(
        0, min(s.layer_end, l1) - max(s.layer_start, l0)
    )


def _check_times(rid: str, c: Step, p: Step, l0: int, l1: int, eps: float) -> None:
    """``c`` reads ``p``'s output at layers [l0, l1) (``p`` may be one layer below)."""
    shift = 0 if p.layer_start <= l0 < p.layer_end else -1  # hidden-state read
    for m in {l0, l1 - 1}:
        need = p.layer_ready_s(m + shift)
        begin = c.layer_begin_s(m)
        if begin + eps < need:
            raise PlanError(
                f"request {rid!r}: {c.action} of tokens [{c.start}, {c.end}) begins layer {m} "
                f"at {begin:.6g}s but its input from {p.action} [{p.start}, {p.end}) is ready "
                f"only at {need:.6g}s"
            )


def _validate_request(req: Request, rp: RequestPlan, num_layers: int, eps: float) -> None:
    rid, d, e_end, L = req.id, req.device_tokens, req.evicted_end, num_layers
    restore: list[Step] = []
    prefill_area = 0
    for s in rp.steps:
        if not (0 <= s.layer_start < s.layer_end <= L) or s.start >= s.end:
            raise PlanError(f"request {rid!r}: empty or out-of-range step {s}")
        if not (math.isfinite(s.start_s) and s.finish_s + eps >= s.start_s >= -eps):
            raise PlanError(f"request {rid!r}: bad predicted times in {s}")
        if s.action is Action.PREFILL:
            if s.start < e_end or s.end > e_end + req.new_tokens or s.layer_start != 0:
                raise PlanError(f"request {rid!r}: prefill outside the new tokens: {s}")
            if _area(s, d, e_end, 0, L) != 0:
                raise PlanError(f"request {rid!r}: prefill overlaps the evicted span")
            need = (e_end - d) * L
            got = sum(_area(p, d, e_end, 0, L) for p in restore)
            if got != need:
                raise PlanError(
                    f"request {rid!r}: prefill listed before the span is restored "
                    f"({got} of {need} token-layers)"
                )
            for p in restore:
                _check_times(rid, s, p, max(p.layer_start, 0), p.layer_end, eps)
            prefill_area += s.tokens * s.layers
            continue
        if s.start < d or s.end > e_end:
            raise PlanError(
                f"request {rid!r}: step [{s.start}, {s.end}) is outside the evicted span "
                f"[{d}, {e_end})"
            )
        for p in restore:
            if _area(p, s.start, s.end, s.layer_start, s.layer_end):
                raise PlanError(f"request {rid!r}: steps overlap: {p} and {s}")
        if s.action is Action.LOAD:
            held = sum(
                max(0, min(b, s.end) - max(a, s.start))
                for t, a, b in req.tier_ranges()
                if t == s.tier
            )
            if held != s.tokens:
                raise PlanError(
                    f"request {rid!r}: load of [{s.start}, {s.end}) from tier {s.tier!r}, "
                    "which does not hold all of it"
                )
        else:
            need = (s.start - d) * s.layers
            got = sum(_area(p, d, s.start, s.layer_start, s.layer_end) for p in restore)
            if got != need:
                raise PlanError(
                    f"request {rid!r}: recompute of [{s.start}, {s.end}) at layers "
                    f"[{s.layer_start}, {s.layer_end}) reads KV of earlier tokens that no "
                    "earlier step restores"
                )
            if s.layer_start > 0:
                below = s.layer_start - 1
                hidden = sum(
                    _area(p, s.start, s.end, below, s.layer_start)
                    for p in restore
                    if p.action is Action.RECOMPUTE
                )
                if hidden != s.tokens:
                    raise PlanError(
                        f"request {rid!r}: recompute from layer {s.layer_start} needs the hidden "
                        f"states of [{s.start}, {s.end}) at layer {below}, which no earlier "
                        "recompute produces"
                    )
            for p in restore:
                lo = max(p.layer_start, s.layer_start)
                hi = min(p.layer_end, s.layer_end)
                if lo < hi and _area(p, d, s.start, lo, hi):
                    _check_times(rid, s, p, lo, hi, eps)
                below = s.layer_start - 1
                if (
                    p.action is Action.RECOMPUTE
                    and below >= 0
                    and _area(p, s.start, s.end, below, s.layer_start)
                ):
                    _check_times(rid, s, p, s.layer_start, s.layer_start + 1, eps)
        restore.append(s)
    covered = sum(s.tokens * s.layers for s in restore)
    if covered != (e_end - d) * L:
        raise PlanError(
            f"request {rid!r}: steps cover {covered} of {(e_end - d) * L} evicted token-layers"
        )
    if prefill_area != req.new_tokens * L:
        raise PlanError(f"request {rid!r}: the {req.new_tokens} new tokens are not prefilled once")
    last = max((s.finish_s for s in rp.steps), default=0.0)
    if rp.predicted_ttft_s + eps < last:
        raise PlanError(
            f"request {rid!r}: predicted TTFT {rp.predicted_ttft_s:.6g}s is before the finish "
            f"of its last step ({last:.6g}s)"
        )


def validate(plan: Plan, requests: Sequence[Request], num_layers: int) -> None:
    """Raise :class:`PlanError` unless ``plan`` is a valid plan for ``requests``."""
    by_id = {r.id: r for r in requests}
    if set(by_id) != set(plan.requests):
        raise PlanError(f"plan covers requests {sorted(plan.requests)}, expected {sorted(by_id)}")
    scale = max((s.finish_s for rp in plan.requests.values() for s in rp.steps), default=1.0)
    eps = 1e-9 * max(1.0, scale)
    for rid, rp in plan.requests.items():
        _validate_request(by_id[rid], rp, num_layers, eps)
    by_resource: dict[str, list[Step]] = {}
    for rp in plan.requests.values():
        for s in rp.steps:
            by_resource.setdefault(s.resource, []).append(s)
    for res, steps in by_resource.items():
        steps.sort(key=lambda s: (s.start_s, s.finish_s))
        for prev, nxt in itertools.pairwise(steps):
            if nxt.start_s + eps < prev.finish_s:
                raise PlanError(
                    f"resource {res!r} runs two steps at once: one until {prev.finish_s:.6g}s, "
                    f"the next from {nxt.start_s:.6g}s"
                )
