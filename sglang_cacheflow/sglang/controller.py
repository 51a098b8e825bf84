"""The restore controller of one SGLang scheduler process: plans and calibrates (what each
restore then restored is counted by :mod:`~sglang_cacheflow.sglang.accounting`).

It runs in the scheduler thread (the L3 backend reports transfer times from SGLang's prefetch
thread, under a lock). Per scheduling round it does two kinds of planning, both batch-aware
(one :func:`~sglang_cacheflow.planner.plan` call for all the requests concerned):

- **arrivals** (:meth:`begin_arrivals` / :meth:`end_arrivals`, around
  ``Scheduler.process_input_requests``): SGLang asks the radix cache to prefetch each new
  request's L3 hit; the cache defers those calls here. At the end of the batch of arrivals
  the controller looks up every hit, plans them together with the ``redis`` tier's
  whole-span loads not streamed (the prefetch lands whole pages in host memory before the
  extend; a split's load streams, :mod:`~sglang_cacheflow.sglang.stream`), and issues the
  prefetches in the plan's service order, each capped at the front the plan loads
  (a cap of 0 issues none: the request recomputes its L3 span);
- **admission** (:meth:`begin_admission` / :meth:`end_admission`, around
  ``Scheduler._get_new_batch_prefill_raw``): the waiting requests whose prefix hits host
  memory are matched, planned together with the ``host`` tier streamed per layer, and the
  radix cache caps each one's host hit at the front the plan loads while SGLang admits them
  (``load_back`` loads that front layer by layer; the extend recomputes the rest with the
  new tokens).

Requests that return together reach the scheduler one or two per round, so each plan also
takes what the shared resources still owe earlier rounds (``busy``: planned seconds of
compute and of each tier, less the time gone by, cleared when every planned restore has run
its first forward), and the compute that runs before its requests can: the prefills queued
ahead and, while the device pool cannot hold them, running requests' decode steps. A
request arriving behind a queue of recomputes then loads, and one arriving behind a busy link
recomputes: the I/O of some requests overlaps the compute of others, as in a plan of the
whole group.

Decisions are identical on every TP rank: the inputs that differ between ranks (calibrated
cost model, L3 hit lengths, busy seconds) are reduced with one collective per planning round
(:mod:`sglang_cacheflow.sglang.tp`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from sglang_cacheflow.planner import (
    CostModel,
    ModelShape,
    Plan,
    Request,
    Span,
    is_baseline,
    plan,
    reuses_evicted_kv,
    serves_in_order,
)
from sglang_cacheflow.sglang.accounting import RestoreAccounting
from sglang_cacheflow.sglang.admission import (
    Waiting,
    decode_budget,
    pool_state,
    prefill_tokens,
    wait_s,
)
from sglang_cacheflow.sglang.blend import Blend, ChunkReuse
from sglang_cacheflow.sglang.capabilities import sglang_capabilities
from sglang_cacheflow.sglang.config import (
    CacheFlowConfig,
    ConfigError,
    request_blend_ratio,
    request_chunks,
    request_force,
)
from sglang_cacheflow.sglang.costs import CostTracker
from sglang_cacheflow.sglang.decision import (
    Decision,
    describe,
    loaded_tokens,
    planned_split,
    serve_in_plan_order,
)
from sglang_cacheflow.sglang.metrics import RestoreMetrics
from sglang_cacheflow.sglang.owed import OwedWork
from sglang_cacheflow.sglang.split_control import SplitControl
from sglang_cacheflow.sglang.tp import reduce_round
from sglang_cacheflow.tiers.names import HOST_TIER, L3_TIER

__all__ = ["CacheFlowController", "current_controller"]

logger = logging.getLogger("sglang_cacheflow.sglang")

_MAX_TRACKED = 4096
_DECODE_RATE = 0.3  # weight of the newest decode step in its moving average
_UNBOUNDED = 1 << 40  # host room of a cache that cannot tell it (exact in the float reduction)
_STALE_S = 60.0  # an L3 decision whose request left the queue unadmitted this long ago is dropped

_CONTROLLER: CacheFlowController | None = None


def current_controller() -> CacheFlowController | None:
    """The controller of this process's scheduler, if ``--enable-cacheflow`` is on."""
    return _CONTROLLER


def set_current_controller(ctl: CacheFlowController | None) -> None:
    global _CONTROLLER
    _CONTROLLER = ctl


class CacheFlowController(SplitControl):
    """See the module doc. ``cache`` is the process's
    :class:`~sglang_cacheflow.sglang.radix_cache.CacheFlowRadixCache`."""

    def __init__(
        self,
        cfg: CacheFlowConfig,
        cache: Any,
        shape: ModelShape,
        page_size: int,
        *,
        tp_group: Any | None = None,
        tp_rank: int = 0,
        enable_metrics: bool = False,
        batch_tokens: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        self.shape = shape
        self.page_size = max(1, page_size)
        self.tp_group = tp_group
        self.tp_rank = tp_rank
        self.costs = CostTracker(cfg, shape)
        self.host_caps: dict[str, int] = {}
        self.forced: dict[str, tuple[str, float]] = {}  # rid -> the shape it asks for
        self.blends: ChunkReuse | None = None  # chunk reuse, where chunk_store is set
        self._round: dict[str, Decision] = {}
        self.storage_plans: OrderedDict[str, Decision] = OrderedDict()
        self.pending: OrderedDict[str, Decision] = OrderedDict()
        self.collecting = False
        self.deferred: list[dict[str, Any]] = []
        self.rounds = 0
        self.collectives = 0
        self.clock = clock
        self.owed = OwedWork(clock)
        self._init_splits(cfg, cache)
        self.caps = sglang_capabilities(
            cfg.stream_groups,
            batch_tokens,
            cfg.stream_front_loads,
            bool(cfg.one_forward_layer_splits),
            bool(cfg.one_forward_token_splits),
        )
        # L3 front loads (load front, load all) go through the split reader, streamed
        self.front_loads = self.caps.streams(L3_TIER) and self.layers is not None
        self.scheduler: Any = None  # SGLang's scheduler, as of the last round
        self.queue: Sequence[Any] = ()  # the scheduler's waiting queue, as of the last round
        self._queued_s = 0.0  # queued compute seconds counted in the last round's busy
        self._decode_s: float | None = None  # measured decode step (moving average)
        self._log = logger.info if cfg.log_decisions else logger.debug
        metrics = RestoreMetrics(enable_metrics and tp_rank == 0)
        self.account = RestoreAccounting(metrics, self._log)
        self.metrics = metrics  # what the controller counts itself: planned shapes
        self.in_order = serves_in_order(cfg.policy)

    # -- planning ------------------------------------------------------------------------

    def _round_inputs(
        self, hits: Sequence[int], now: float, planned: Mapping[str, int | None]
    ) -> tuple[CostModel, list[int], dict[str, float]]:
        """Cost model, hit lengths and busy seconds of this round, identical on every rank.
        The compute resource also owes the prefills queued ahead of the ``planned``
        requests and the decode steps they wait for (:meth:`queued_compute_s`; ``planned``
        maps each to the tokens it needs in the device pool, None for none to wait for)."""
        self.rounds += 1
        if self.tp_group is not None:
            self.collectives += 1
        self._plan_read_cpu()
        cost = self.costs.model()
        busy = self.owed.busy(now)
        self._queued_s = self.queued_compute_s(cost, planned)
        if self._queued_s > 0:
            busy["compute"] = busy.get("compute", 0.0) + self._queued_s
        return reduce_round(cost, hits, self.tp_group, busy)

    def queued_compute_s(self, cost: CostModel, planned: Mapping[str, int | None]) -> float:
        """Predicted compute seconds before the ``planned`` requests (rid -> tokens each
        needs in the device pool, with its decode budget) can run. SGLang admits its queue
        in order: the prefills ahead of the first planned request run first (those of
        restores are owed already), and, while the device pool cannot hold what comes
        next, the running requests' decode steps run (:mod:`.admission`). A round planned
        as SGLang admits its requests (host hits: a decision counts only if admitted in its
        round) has no room to wait for: its needs are None."""
        known = set(planned) | set(self.storage_plans) | set(self.splits) | set(self.pending)
        pool = None not in planned.values() and self._sees_pool()
        queue: list[Waiting] = []
        first: int | None = None
        for req in list(self.queue)[: self.cfg.max_round_requests]:
            if req.finished():
                continue
            if req.rid in planned:  # what is queued behind it is admitted after it
                first = planned[req.rid]
                break
            n = prefill_tokens(req)
            prefill = cost.recompute_s(req.prefix_len, n) if req.rid not in known else 0.0
            queue.append(Waiting(max(n, 0), decode_budget(req) if pool else 0, prefill))
        if not pool:
            return sum(w.prefill_s for w in queue)
        if first is None:  # not queued yet: it arrives behind the queue
            first = next(iter(planned.values()), 0)
        queue.append(Waiting(first or 0, 0))
        free, running = pool_state(self.scheduler)
        return wait_s(free, running, queue, self.decode_step_s(cost))

    def decode_step_s(self, cost: CostModel) -> float:
        """A decode step's time: measured (a moving average), else the model's per-forward
        cost."""
        return self._decode_s if self._decode_s is not None else cost.compute.step_s

    def _sees_pool(self) -> bool:
        """Whether the last round's scheduler shows its pool and running batch (a real one)."""
        return self.scheduler is not None and hasattr(self.scheduler, "running_batch")

    def _call_need(self, call: dict[str, Any]) -> int:
        """Tokens a prefetch ``call``'s request needs in the device pool, its decode budget
        as SGLang's admission counts it included: found in the queue (its handle carries
        the rid only; a batch of arrivals has queued it by its planning), else the span it
        looks up; 0 off a real scheduler."""
        if not self._sees_pool():
            return 0
        rid = call["request"].rid
        req = next((r for r in self.queue if r.rid == rid), None)
        if req is None:
            return len(call["new_input_tokens"])
        return max(0, prefill_tokens(req)) + decode_budget(req)

    # -- decisions -----------------------------------------------------------------------

    def take_request_params(self, req: Any) -> str | None:
        """Read what a request arriving in the queue asks of CacheFlow itself (its
        ``custom_params``: a forced shape, the chunks it marks and their ratio); returns why
        it cannot be served, or None."""
        params = getattr(req.sampling_params, "custom_params", None)
        try:
            force = request_force(params, self.caps)
            spans = request_chunks(params, len(req.origin_input_ids))
            ratio = request_blend_ratio(params)
        except ConfigError as e:
            return str(e)
        if force is not None:
            self.forced[req.rid] = force
        if spans is not None and self.blends is not None:
            self.blends.take(req.rid, list(req.origin_input_ids), spans, ratio)
        return None

    def plan_blend(self, req: Any, prefix_len: int, extend_len: int) -> Blend | None:
        """``req``'s chunk reuse for this admission (:mod:`~sglang_cacheflow.sglang.blend`),
        or None; a request with a split restore of its own is not blended."""
        if self.blends is None or self.split_of(req.rid) is not None:
            return None
        return self.blends.plan(req, prefix_len, extend_len, self.costs.model())

    def _plan(self, reqs: list[Request], cost: CostModel, busy: dict[str, float]) -> Plan:
        if self.forced:
            reqs = [replace(r, force=self.forced.get(r.id)) for r in reqs]
        return plan(
            reqs, cost, self.cfg.policy, self.caps, self.cfg.chunk_tokens, busy, self.cfg.force
        )

    def _align(self, tokens: int) -> int:
        return tokens - tokens % self.page_size

    # -- admission rounds (host hits) ----------------------------------------------------

    def begin_admission(self, scheduler: Any) -> None:
        """Plan the host hits of the requests SGLang is about to consider for admission, and
        put the planned restores of its queue in their plans' service order."""
        self.host_caps = {}
        self._round = {}
        self.queue = scheduler.waiting_queue
        self.scheduler = scheduler
        self._drop_stale(scheduler.waiting_queue, getattr(scheduler, "chunked_req", None))
        self._plan_host_hits(scheduler)
        planned = (*self.storage_plans.values(), *self.splits.values(), *self._round.values())
        serve_in_plan_order(scheduler.waiting_queue, {d.rid: d.order for d in planned})

    def _plan_host_hits(self, scheduler: Any) -> None:
        cache = self.cache
        cands = []
        for req in list(scheduler.waiting_queue)[: self.cfg.max_round_requests]:
            if req.finished():
                continue
            if req.rid in self.splits:  # admitted up to its span (host_limit)
                self.host_caps[req.rid] = 0
                continue
            if req.rid in self.storage_plans:
                if not reuses_evicted_kv(self.cfg.policy):  # its host pages are not planned
                    self.host_caps[req.rid] = 0
                continue
            if cache.enable_storage and cache.has_ongoing_prefetch(req.cache_request_handle):
                continue
            req.init_next_round_input(cache, cow_mamba=False)
            if req.host_hit_length > 0:
                cands.append(req)
        if not cands:
            return
        now = self.clock()
        cost, hits, busy = self._round_inputs(
            [r.host_hit_length for r in cands],
            now,
            dict.fromkeys((r.rid for r in cands), None),  # admitted now, or planned again
        )
        reqs = []
        for r, hit in zip(cands, hits, strict=True):
            hit = self._align(min(hit, r.host_hit_length))
            if hit <= 0:
                self.host_caps[r.rid] = 0
                continue
            new = max(1, len(r.full_untruncated_fill_ids) - r.prefix_len - hit)
            reqs.append(Request(r.rid, r.prefix_len, (Span(HOST_TIER, hit),), new))
        if not reqs:
            return
        plan_ = self._plan(reqs, cost, busy)
        by_rid = {r.rid: r for r in cands}
        for req in reqs:
            load = min(self._align(loaded_tokens(plan_, req.id)), req.evicted_tokens)
            rp = plan_.requests[req.id]
            split = None
            shape = planned_split(plan_, req)
            if shape is not None:
                split = self._start_host_split(by_rid[req.id], req, *shape)
                load = split.tokens if split is not None else 0
            self.host_caps[req.id] = 0 if shape is not None else load
            d = Decision(
                req.id,
                HOST_TIER,
                now,
                rp.predicted_ttft_s,
                req.evicted_tokens,
                load,
                rp.shape,
                rp.work_s(),
                split=split,
                order=(self.rounds, plan_.order.index(req.id)),
            )
            self._round[req.id] = d
            if split is not None:
                self.splits[req.id] = d
            self._log(describe(plan_, req, HOST_TIER, cost))

    def host_limit(self, rid: str, device_prefix: int) -> int | None:
        """Where ``rid``'s host hit ends at this admission (a position in its tokens; None:
        not capped): a split restore's at its span's start (host pages before an L3 span load
        back; the span is the split's to restore), a planned host hit's at the front its plan
        loads. Never below the device prefix (a device hit is not undone)."""
        d = self.splits.get(rid)
        if d is not None and d.split is not None:
            return max(d.split.span_start, device_prefix)
        cap = self.host_caps.get(rid)
        return None if cap is None else device_prefix + cap

    def _drop_stale(self, waiting: Sequence[Any], chunked: Any = None) -> None:
        """Forget decisions of requests that left the queue without being admitted (an
        abort): they would keep the owed work from being cleared, and a split restore would
        keep its staging memory and its host pages locked."""
        now = self.clock()
        live = {r.rid for r in waiting}
        if chunked is not None:
            live.add(chunked.rid)
        self.forced = {rid: f for rid, f in self.forced.items() if rid in live}
        if self.blends is not None:
            self.blends.keep_only(live)
        for plans in (self.storage_plans, self.splits):
            for rid in [r for r, d in plans.items() if r not in live and now - d.t0 > _STALE_S]:
                d = plans.pop(rid)
                if d.split is not None:
                    d.split.close()
                else:
                    self.cache.cacheflow_release_prefetch(rid)

    def end_admission(self, new_batch: Any) -> None:
        """Count what the admitted requests restored; caps end with the round."""
        self.host_caps = {}
        round_, self._round = self._round, {}
        if new_batch is None:
            return
        now = self.clock()
        for req in new_batch.reqs:
            d = round_.get(req.rid)
            if d is None and req.rid in self.splits and req.rid not in self.pending:
                d = self.splits[req.rid]  # a split planned in an earlier round, admitted now
                if d.tier == L3_TIER:
                    self.storage_plans.pop(req.rid, None)
                    self._track(d)
                    continue
            if d is not None:  # admitted: its planned work is now owed (not re-planned)
                self.owed.add(d.work, now)
                self.metrics.planned(self.cfg.policy, d.shape)
                if d.split is None:  # else counted at the splice
                    self.account.host_admitted(d, req)
                self._track(d)
                continue
            d = self.storage_plans.pop(req.rid, None)
            if d is None:
                continue
            if d.split is None:  # else counted at the splice
                self.account.l3_admitted(d, req, self._l3_faults() > d.l3_faults)
                self.cache.cacheflow_release_prefetch(req.rid)
            self._track(d)

    def lookup_failed(self, rid: str, tokens: int) -> None:
        """The L3 lookup of ``rid``'s span failed (tier down): its ``tokens`` are recomputed."""
        self.account.lookup_failed(rid, tokens)

    def _track(self, d: Decision) -> None:
        self.pending[d.rid] = d
        while len(self.pending) > _MAX_TRACKED:
            self.pending.popitem(last=False)

    def forward_done(
        self,
        batch: Any,
        seconds: float,
        layers: int | None = None,
        started: float | None = None,
        streamed: dict[str, bool] | None = None,
        outside: float | None = None,
    ) -> None:
        """An extend forward of ``batch`` through its first ``layers`` layers (default all),
        begun at ``started`` (``perf_counter()``), took ``seconds``, ``outside`` of them
        outside its layer loop where measured: calibrate, and measure its restores. A
        split's own chunk that ran beside reads calibrates the overlap slowdown the planner
        charges a split's recompute. ``streamed``: the streamed splits it took
        (:meth:`finish_streams`); it waited for their loads, so it does not calibrate the
        compute, and those cut back got no token from it."""
        mode = batch.forward_mode
        if mode.is_decode():
            prev = self._decode_s
            self._decode_s = seconds if prev is None else prev + _DECODE_RATE * (seconds - prev)
        if not mode.is_extend():
            return
        streamed = streamed or {}
        if (
            not streamed
            and not mode.is_mixed()
            and batch.prefix_lens is not None
            and batch.extend_lens
        ):
            overlapped = started is not None and self.reader.busy_since(started)
            # The planner charges the slowdown to a split's own chunk: only that forward
            # measures it. Others beside a read measure neither it nor the machine alone.
            if not overlapped or any(r.rid in self.splits for r in batch.reqs):
                cpu = self.read_cpu_during(batch.reqs, started, seconds) if overlapped else 0.0
                self.costs.observe_compute(
                    batch.prefix_lens, batch.extend_lens, seconds, layers, overlapped, cpu
                )
            if outside is not None and not overlapped:
                self.costs.observe_unlayered(outside)
        if not self.pending:
            return
        now = self.clock()
        for req in batch.reqs:
            if req.rid in self.splits or not streamed.get(req.rid, True):
                continue  # a split's first chunk, or cut back: the restore goes on
            if getattr(req, "inflight_middle_chunks", 0) > 0:
                continue  # a chunk before its last (its prefill was over the budget)
            d = self.pending.pop(req.rid, None)
            if d is None:
                continue
            measured = now - d.t0
            self.account.restore_done(d, measured)
            sp = d.split
            whole = sp is None or sp.landed_pages == sp.pages
            if not d.alone or not whole:
                continue
            if sp is None and d.tier == L3_TIER and d.planned_load > 0:  # SGLang's prefetch
                self.costs.observe_restore(L3_TIER, measured, d.predicted_s)
            elif sp is not None and not sp.loads_front:  # its forwards and a hand-off
                self.costs.observe_split(measured, d.predicted_s)
            # a streamed front load pays neither: its read calibrates the tier
        if not self.pending and not self.storage_plans and not self.splits:
            self.owed.clear()

    # -- arrivals (L3 hits) --------------------------------------------------------------

    def begin_arrivals(self, scheduler: Any = None) -> None:
        self.collecting = True
        self.deferred = []
        if scheduler is not None:
            self.queue = scheduler.waiting_queue
            self.scheduler = scheduler

    def end_arrivals(self) -> None:
        self.collecting = False
        calls, self.deferred = self.deferred, []
        if calls:
            self.plan_prefetches(calls)

    def on_prefetch(self, call: dict[str, Any]) -> None:
        """SGLang asks to prefetch one request's L3 hit: defer it to the round's plan (or
        plan it alone outside a batch of arrivals, e.g. a retry)."""
        if self.collecting:
            self.deferred.append(call)
        else:
            self.plan_prefetches([call])

    def plan_prefetches(self, calls: list[dict[str, Any]]) -> None:
        cache = self.cache
        probed: list[tuple[dict[str, Any], int]] = []
        keys: dict[str, list[str]] = {}
        for call in calls:
            if call["request"].rid in self.splits:  # its restore is under way already
                continue
            found = cache.cacheflow_storage_hit(call)
            if found is None:  # SGLang will decline or dedupe it: let it
                cache.cacheflow_issue_prefetch(call)
            else:
                probed.append((call, found[0]))
                keys[call["request"].rid] = found[1]
        if not probed:
            return
        now = self.clock()
        planned = {call["request"].rid: self._call_need(call) for call, _ in probed}
        # What SGLang's prefetch can stage, agreed by the ranks in the round's one reduction:
        # it takes the MIN of the hit lengths, so the two bounds ride after them, the
        # threshold negated (the ranks' largest threshold is the binding one).
        staged = cache.cacheflow_staged_load()
        lo, room = staged if staged is not None else (0, _UNBOUNDED)
        found = [h for _, h in probed]
        cost, hits, busy = self._round_inputs([*found, -lo, room], now, planned)
        *hits, lo, room = hits
        staged_load = (-lo, room) if room < _UNBOUNDED else None
        reqs: list[Request] = []
        by_id: dict[str, dict[str, Any]] = {}
        for (call, _), hit in zip(probed, hits, strict=True):
            hit = self._align(hit)
            rid = call["request"].rid
            if hit <= 0 or rid in by_id:
                cache.cacheflow_issue_prefetch(call)
                continue
            device = len(call["matched_prefix_tokens"] or ())
            new = max(1, len(call["new_input_tokens"]) + 1 - hit)
            bound = None if self.front_loads else staged_load  # SGLang stages no front load
            reqs.append(Request(rid, device, (Span(L3_TIER, hit),), new, bound))
            by_id[rid] = call
        if not reqs:
            return
        plan_ = self._plan(reqs, cost, busy)
        # prefetches are issued now, so the whole round's work is owed from now on
        owed = dict(plan_.owed_s)  # the queued prefills are counted afresh every round
        owed["compute"] = owed.get("compute", 0.0) - self._queued_s
        self.owed.set(owed, now)
        for rid in plan_.order:
            req = next(r for r in reqs if r.id == rid)
            load = min(self._align(loaded_tokens(plan_, rid)), req.evicted_tokens)
            rp = plan_.requests[rid]
            split = None
            shape = planned_split(plan_, req)
            if shape is not None:  # the split reader loads; SGLang prefetches nothing
                split = self._start_l3_split(req, *shape, keys[rid])
                load = split.tokens if split is not None else 0
            elif load > 0 and self.front_loads:  # so does a front load, streamed
                split = self._start_l3_split(req, 0, 0, False, keys[rid], load)
                load = split.tokens if split is not None else 0
            d = self.storage_plans[rid] = Decision(
                rid,
                L3_TIER,
                now,
                rp.predicted_ttft_s,
                req.evicted_tokens,
                load,
                rp.shape,
                rp.work_s(),
                alone=not busy and len(reqs) == 1,
                split=split,
                l3_faults=self._l3_faults(),
                order=(self.rounds, plan_.order.index(rid)),
            )
            if split is not None:
                self.splits[rid] = d
            self.metrics.planned(self.cfg.policy, d.shape)  # L3 decisions are not re-planned
            while len(self.storage_plans) > _MAX_TRACKED:
                self.cache.cacheflow_release_prefetch(self.storage_plans.popitem(last=False)[0])
            self._log(describe(plan_, req, L3_TIER, cost))
            if load > 0 and split is None:
                call = dict(by_id[rid])
                call["new_input_tokens"] = call["new_input_tokens"][:load]
                call["storage_hit_end"] = None
                cache.cacheflow_issue_prefetch(call)

    # -- restores in flight ----------------------------------------------------------------

    def _l3_faults(self) -> int:
        """Errors, corrupt records and misses of the L3 tier so far (0 without one)."""
        storage = self.cache.cacheflow_storage()
        tier = getattr(storage, "redis_tier", None)
        if tier is None:
            return 0
        stats = tier.stats.snapshot()
        return stats["errors"] + stats["corrupt"] + stats["misses"]

    def holds_prefetch(self, rid: str) -> bool:
        """Whether SGLang's prefetch of ``rid`` is a load this controller planned, whose
        host pages are held until the request is admitted (not under a baseline policy,
        which runs as SGLang's HiCache does)."""
        d = self.storage_plans.get(rid)
        if d is None or is_baseline(self.cfg.policy):
            return False
        return d.split is None and d.planned_load > 0

    def is_restore(self, rid: str) -> bool:
        """Whether ``rid`` is a planned restore whose first token is not out yet."""
        return (
            rid in self.pending or rid in self.splits or rid in self.storage_plans
            or rid in self._round
        )  # fmt: skip

    def holds_back(self, rid: str, batch: Sequence[Any]) -> bool:
        """Whether the restore ``rid`` must wait for a later forward than the one being
        built of ``batch``: under a policy served in order, a forward carries one restore's
        recompute, as the plan times them (on a compute-bound engine, batching restores
        makes the first wait for the last)."""
        return (
            self.in_order
            and self.is_restore(rid)
            and any(r.rid != rid and self.is_restore(r.rid) for r in batch)
        )
