"""Restore policies behind one function, :func:`plan`.

- ``recompute``: prefill every evicted token (no reuse of evicted KV);
- ``load``: load every evicted page (SGLang HiCache's behaviour);
- ``cake``: per request, compute from the front and one I/O worker from the back, meeting
  where Cake's run-time pointers would cross; requests served in arrival order;
- ``cacheflow``: the batch-aware scheduler. Requests share one compute resource and one I/O
  channel per tier. Shortest-restore-first order; each request takes the token-wise or
  layer-wise split (or, on SGLang, the load-front split) that finishes it earliest given what
  the shared resources still owe earlier requests, so I/O flows to whichever request it
  saves the most recompute for at that moment. The schedule is compared with the arrival
  order, Cake's and both pure modes, and the lowest predicted mean TTFT is kept: CacheFlow
  never predicts worse than any of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from sglang_cacheflow.planner.batching import batch_prefills
from sglang_cacheflow.planner.capabilities import RUNTIME, Capabilities
from sglang_cacheflow.planner.cost import CostModel
from sglang_cacheflow.planner.plan import COMPUTE, Plan, RequestPlan, Step
from sglang_cacheflow.planner.request import Request
from sglang_cacheflow.planner.shapes import (
    LAYER,
    LOAD_FRONT,
    NEG,
    TOKEN,
    Outcome,
    Shape,
    ShapeKind,
    Shaper,
)

POLICIES = ("recompute", "load", "cake", "cacheflow")
SHAPE_KINDS = tuple(ShapeKind)

Chooser = Callable[[Shaper, float, dict[str, float]], tuple[Shape, Outcome]]


def _fixed(kind: ShapeKind, full: bool) -> Chooser:
    def choose(s: Shaper, tc: float, io: dict[str, float]) -> tuple[Shape, Outcome]:
        shape = Shape(kind, s.evicted if full else 0)
        return shape, s.run(shape, tc, io)

    return choose


_recompute_all = _fixed(LOAD_FRONT, full=False)  # load nothing, recompute the rest
_load_all = _fixed(LOAD_FRONT, full=True)  # the load baseline: what the engine does alone


def _load_all_staged(s: Shaper, tc: float, io: dict[str, float]) -> tuple[Shape, Outcome]:
    """Load all where the engine can stage it, else recompute all (CacheFlow's candidate)."""
    return (_load_all if s.req.stages(s.evicted) else _recompute_all)(s, tc, io)


def _cake(s: Shaper, tc: float, io: dict[str, float]) -> tuple[Shape, Outcome]:
    split = s.cake_split(tc, io)
    if split == 0 and not s.req.stages(s.evicted):  # a whole-span load it cannot stage
        split = s.grid[1]
    return s.token_split(split, tc, io)


def _best(s: Shaper, tc: float, io: dict[str, float]) -> tuple[Shape, Outcome]:
    return s.best(tc, io)


# each policy's choice for one request, given what the resources owe (cacheflow also
# weighs whole schedules against each other: plan())
_PER_REQUEST: dict[str, Chooser] = {
    "recompute": _recompute_all,
    "load": _load_all,
    "cake": _cake,
    "cacheflow": _best,
}


def _forced(kind: ShapeKind, recompute: float) -> Chooser:
    """Every request takes ``kind`` with about ``recompute`` of its span recomputed (the
    nearest split point; the fraction is of tokens, or of layers for a layer split)."""

    def choose(s: Shaper, tc: float, io: dict[str, float]) -> tuple[Shape, Outcome]:
        if kind == LAYER:
            split = round(recompute * s.num_layers)
        else:
            want = recompute * s.evicted if kind == TOKEN else (1 - recompute) * s.evicted
            split = min(s.grid, key=lambda g: (abs(g - want), g))
        if kind == TOKEN:  # in one forward where the executor runs it so
            return s.token_split(split, tc, io, one=True)
        shape = Shape(kind, split)
        return shape, s.run(shape, tc, io)

    return choose


def _or_forced(default: Chooser) -> Chooser:
    """``default``, except for a request that forces its own shape (``Request.force``)."""

    def choose(s: Shaper, tc: float, io: dict[str, float]) -> tuple[Shape, Outcome]:
        force = s.req.force
        if force is None:
            return default(s, tc, io)
        return _forced(ShapeKind(force[0]), force[1])(s, tc, io)

    return choose


# (sum TTFT, makespan, shapes, when the round's loads end)
Schedule = tuple[float, float, list[tuple[Shaper, Shape]], float]


def _clocks(busy: Mapping[str, float] | None) -> tuple[float, dict[str, float]]:
    """Initial clocks of the compute resource and the tiers: what they still owe earlier work."""
    io = {k: max(0.0, v) for k, v in (busy or {}).items() if k != COMPUTE}
    return max(0.0, (busy or {}).get(COMPUTE, 0.0)), io


def _schedule(
    order: Sequence[Shaper], choose: Chooser, busy: Mapping[str, float] | None = None
) -> Schedule:
    """Serve ``order`` one request after another on the shared resources.

    A forward is slowed while any load runs beside it, a later request's too (the link runs
    ahead of the compute): the round is served once to find when its loads end, and again
    with every recompute before then priced as slowed."""
    first = _serve(order, choose, busy, NEG)
    if first[3] == NEG or not any(s.cost.compute.overlap_slowdown for s in order):
        return first
    return _serve(order, choose, busy, first[3])


def _serve(
    order: Sequence[Shaper], choose: Chooser, busy: Mapping[str, float] | None, reads_until: float
) -> Schedule:
    tc, io = _clocks(busy)
    total = makespan = 0.0
    chosen: list[tuple[Shaper, Shape]] = []
    for s in order:
        s.reads_until = reads_until
        shape, out = choose(s, tc, io)
        tc = out.compute_free
        io.update(out.io_free)
        total += out.ttft
        makespan = max(makespan, out.ttft)
        chosen.append((s, shape))
    return total, makespan, chosen, max(io.values(), default=NEG)


def _isolated_estimate(s: Shaper) -> float:
    """Harmonic-mean restore time alone plus the prefill: the shortest-first sort key."""
    tc = s.cost.recompute_s(s.device_tokens, s.evicted)
    tio = max((s.cost.load_s(t, b - a) for t, a, b in s.ranges), default=0.0)
    both = tc * tio / (tc + tio) if tc + tio > 0 else 0.0
    return both + s.prefill_s


def _request_splits(
    shapers: Sequence[Shaper], busy: Mapping[str, float] | None = None
) -> list[Schedule]:
    """Schedules where the k requests most worth loading load (or take their best split) and
    the others recompute, recomputing ones served first: I/O of some requests overlaps the
    compute of others even when no request can overlap its own I/O and compute (SGLang's
    storage prefetch). Requests are ranked by recompute time over load time."""
    if len(shapers) < 2:
        return []

    def worth(s: Shaper) -> float:
        tio = max((s.cost.load_s(t, b - a) for t, a, b in s.ranges), default=0.0)
        return s.cost.recompute_s(s.device_tokens, s.evicted) / max(tio, 1e-12)

    ranked = sorted(shapers, key=worth, reverse=True)
    out: list[Schedule] = []
    # k on a geometric grid (1, 2, 3, 4, 6, 8, 12, ...): a big round stays cheap to plan
    ks = sorted({k for e in range(len(ranked).bit_length()) for k in (1 << e, 3 << e >> 1)})
    for k in (k for k in ks if 1 <= k < len(ranked)):
        loaders = {id(s) for s in ranked[:k]}
        rest = sorted(ranked[k:], key=_isolated_estimate)
        order = rest + sorted(ranked[:k], key=_isolated_estimate)

        def choose(
            s: Shaper, tc: float, io: dict[str, float], loaders: set[int] = loaders
        ) -> tuple[Shape, Outcome]:
            return _best(s, tc, io) if id(s) in loaders else _recompute_all(s, tc, io)

        out.append(_schedule(order, choose, busy))
    return out


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")


def plan(
    requests: Sequence[Request],
    cost: CostModel,
    policy: str = "cacheflow",
    capabilities: Capabilities = RUNTIME,
    chunk_tokens: int = 256,
    busy: Mapping[str, float] | None = None,
    force: tuple[str, float] | None = None,
) -> Plan:
    """Plan one scheduling round: which evicted tokens and layers to recompute or load, when.

    ``requests`` are in arrival order. ``busy`` maps resources (``"compute"`` or a tier name)
    to the seconds of work they still owe earlier rounds: an executor that plans arrivals as
    they come passes the previous plan's :attr:`~Plan.owed_s` (less the time gone by), so that
    a request arriving behind a queue of recomputes can load instead. Times in the plan count
    from now, waits included. ``force=(kind, fraction)`` overrides the policy's choice for
    tests and experiments: every request takes shape ``kind`` (``token``, ``layer`` or
    ``load_front``) with about ``fraction`` of its span recomputed; a request's own
    ``force`` does so for that request (a round holding one is served in arrival order, the
    others taking the policy's shape for one request). Raises ``ValueError`` for
    an unknown policy, a policy or forced shape the executor cannot run, or requests naming
    a tier the cost model does not know.
    """
    _check_policy(policy)
    if policy == "cake" and not capabilities.token_split:
        raise ValueError(
            "policy 'cake' recomputes the front of a span while loading its back; this "
            "executor cannot (capabilities.token_split is False): use cacheflow, load or "
            "recompute"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    for f in (force, *(r.force for r in requests)):
        if f is not None:
            check_forced_shape(*f, capabilities)
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError(f"request ids must be unique, got {ids}")

    t0 = time.perf_counter()
    shapers = [Shaper(r, cost, capabilities, chunk_tokens) for r in requests]
    if force is not None:
        best = _schedule(shapers, _forced(ShapeKind(force[0]), force[1]), busy)
    elif any(r.force is not None for r in requests):  # served in arrival order
        best = _schedule(shapers, _or_forced(_PER_REQUEST[policy]), busy)
    elif policy != "cacheflow":
        best = _schedule(shapers, _PER_REQUEST[policy], busy)
    else:
        shortest_first = sorted(shapers, key=_isolated_estimate)
        candidates = [
            _schedule(shortest_first, _best, busy),
            _schedule(shapers, _recompute_all, busy),
            _schedule(shapers, _load_all_staged, busy),
        ]
        if capabilities.token_split:
            candidates.append(_schedule(shapers, _cake, busy))
        if capabilities.load_front or not (capabilities.token_split or capabilities.layer_split):
            # On an engine's extend (SGLang: one chunked request at a time, loads that land
            # before the extend), overlap also comes from different requests doing different
            # things: some load while the others recompute.
            candidates += _request_splits(shapers, busy)
        best = min(candidates, key=lambda c: (c[0], c[1]))
    served = _emit(best[2], cost.shape.num_layers, busy, best[3])
    if capabilities.batch_tokens and not serves_in_order(policy):
        by_id = {r.id: r for r in requests}
        served = batch_prefills(
            served, by_id, cost.compute, cost.shape.num_layers, capabilities.batch_tokens,
            _clocks(busy)[0],
        )  # fmt: skip
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    return Plan(
        policy,
        {r.id: served[r.id] for r in requests},  # report in arrival order
        planner_time_ms=elapsed_ms,
        order=tuple(served),
        owed_s=_owed(served.values(), busy),
    )


def reuses_evicted_kv(policy: str) -> bool:
    """Whether ``policy`` may load evicted KV at all (every policy but ``recompute``). An
    executor that meets evicted KV its plan did not cover (SGLang: the host pages in front
    of an L3 span planned on arrival) loads it only if so."""
    _check_policy(policy)
    return policy != "recompute"


def is_baseline(policy: str) -> bool:
    """Whether ``policy`` is a baseline, what the engine does on its own (``load``: every
    evicted span loaded as its cache would; ``recompute``): an executor plans it for its
    predictions and adds nothing of CacheFlow's to how it runs."""
    _check_policy(policy)
    return policy in ("load", "recompute")


def serves_in_order(policy: str) -> bool:
    """Whether an executor runs ``policy``'s restores one at a time in the plan's service
    order (one restore's recompute per forward, as the plan prices the compute resource):
    ``cacheflow``, whose schedule is that order. The other policies keep the engine's own
    batching: they are the baselines, what the engine does without CacheFlow's scheduler."""
    _check_policy(policy)
    return policy == "cacheflow"


def check_forced_shape(kind: str, recompute: float, capabilities: Capabilities) -> None:
    """Refuse a forced shape the executor cannot run, or a fraction outside [0, 1]."""
    if kind not in SHAPE_KINDS:
        raise ValueError(f"unknown shape {kind!r}; choose one of {', '.join(SHAPE_KINDS)}")
    runnable = {
        TOKEN: capabilities.token_split,
        LAYER: capabilities.layer_split,
        LOAD_FRONT: capabilities.load_front,
    }
    if not runnable[kind]:
        able = ", ".join(k for k in SHAPE_KINDS if runnable[k])
        raise ValueError(f"this executor cannot run a {kind} split; it runs: {able}")
    if not 0.0 <= recompute <= 1.0:
        raise ValueError(f"the recomputed fraction must be within [0, 1], got {recompute}")


def _emit(
    chosen: list[tuple[Shaper, Shape]],
    num_layers: int,
    busy: Mapping[str, float] | None,
    reads_until: float,
) -> dict[str, RequestPlan]:
    """Replay the chosen schedule, this time recording the timed steps (in service order)."""
    tc, io = _clocks(busy)
    plans: dict[str, RequestPlan] = {}
    for s, shape in chosen:
        s.reads_until = reads_until
        steps: list[Step] = []
        out = s.run(shape, tc, io, steps)
        tc = out.compute_free
        io.update(out.io_free)
        desc = shape.describe(s.evicted, num_layers)
        plans[s.req.id] = RequestPlan(
            s.req.id, desc, tuple(steps), out.ttft, s.runs_in_one_forward(shape)
        )
    return plans


def _owed(plans: Iterable[RequestPlan], busy: Mapping[str, float] | None) -> dict[str, float]:
    """The seconds of work each resource owes once ``plans`` are issued (``busy`` included)."""
    tc, io = _clocks(busy)
    owed = {COMPUTE: tc, **io}
    for rp in plans:
        for resource, seconds in rp.work_s().items():
            owed[resource] = owed.get(resource, 0.0) + seconds
    return owed
