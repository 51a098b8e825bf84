"""The executor: runs a validated plan on a real model, compute and I/O in parallel.

Compute runs on the calling thread (on CUDA, the current stream): the RECOMPUTE and PREFILL
steps of every request in the order of their predicted start. LOAD steps go to an
:class:`~sglang_cacheflow.runtime.io.IOEngine` (a few threads per tier). Before a forward
runs layer ``l`` it waits on the request's :class:`~sglang_cacheflow.runtime.readiness.Readiness`
for the KV it reads at ``l`` and nothing else, so a prefill starts on layer 0 while the top
layers are still loading. Cells a tier failed to deliver are recomputed from the embedding
(a *repair*: the lost tokens through layers ``0..l`` over the restored prefix), counted in
:class:`RestoreStats`; a lost page never reaches attention. Every step's measured time
feeds the planner's :class:`~sglang_cacheflow.planner.Calibrator`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sglang_cacheflow.planner import (
    Action,
    Calibrator,
    Capabilities,
    CostModel,
    Plan,
    Step,
    plan,
    validate,
)
from sglang_cacheflow.planner.capabilities import RUNTIME as RUNTIME_CAPABILITIES
from sglang_cacheflow.runtime.io import IOEngine, LoadTask, split_load
from sglang_cacheflow.runtime.kv import KVCache
from sglang_cacheflow.runtime.model import ModelAdapter
from sglang_cacheflow.runtime.readiness import FAILED, READY, REPAIRED, Readiness
from sglang_cacheflow.runtime.request import RestoreRequest
from sglang_cacheflow.runtime.tp import TPGroup
from sglang_cacheflow.tiers.base import KVTier, Namespace
from sglang_cacheflow.tiers.page import PageLayout

logger = logging.getLogger(__name__)


@dataclass
class StepTiming:
    """One executed step: what the plan predicted and what it took."""

    request: str
    action: str
    tier: str | None
    start: int
    end: int
    layer_start: int
    layer_end: int
    predicted_s: float
    measured_s: float  # compute: busy time without waits; load: first issue to last landing
    waited_s: float = 0.0


@dataclass
class RequestResult:
    id: str
    logits: torch.Tensor  # fp32 next-token logits after the last new token
    ttft_s: float  # round start to logits
    restore_s: float  # round start to the last evicted cell in place
    predicted_ttft_s: float
    shape: str


@dataclass
class RestoreStats:
    """Counters of a round (and, summed, of an executor's life)."""

    loaded_bytes: int = 0
    failed_pages: int = 0  # page reads a tier could not serve (miss, corrupt, dead)
    repairs: int = 0  # recomputes run to replace lost cells
    repaired_token_layers: int = 0

    def add(self, other: RestoreStats) -> None:
        self.loaded_bytes += other.loaded_bytes
        self.failed_pages += other.failed_pages
        self.repairs += other.repairs
        self.repaired_token_layers += other.repaired_token_layers


@dataclass
class RoundResult:
    plan: Plan
    requests: dict[str, RequestResult]
    steps: list[StepTiming]
    stats: RestoreStats
    wall_s: float
    plan_s: float = 0.0
    """Seconds the planner took for this round (set by :meth:`Executor.run`)."""


@dataclass
class _InFlight:
    """Per-request state while a round runs."""

    req: RestoreRequest
    readiness: Readiness
    hidden: torch.Tensor | None = None  # (evicted, hidden) states between layer ranges
    hidden_layer: np.ndarray | None = None  # output layer each row of ``hidden`` holds
    logits: torch.Tensor | None = None
    done_s: float = 0.0


@dataclass
class Executor:
    """Runs restore plans for one model (one TP rank) against a set of tiers.

    ``cost`` is the prior cost model; measured steps refine it (:attr:`calibrator`) when
    ``calibrate`` is true. ``namespace`` is where this rank's pages live in the tiers
    (see :meth:`for_model`).
    """

    model: ModelAdapter
    tiers: dict[str, KVTier]
    namespace: Namespace
    cost: CostModel
    tp: TPGroup = field(default_factory=lambda: TPGroup(0, 1))
    io_workers: int = 2
    task_bytes: int = 1 << 20
    calibrate: bool = True
    on_task_done: Callable[[LoadTask, int], None] | None = None
    wait_timeout_s: float = 600.0
    calibrator: Calibrator = field(init=False)
    totals: RestoreStats = field(init=False, default_factory=RestoreStats)

    def __post_init__(self) -> None:
        self.calibrator = Calibrator(self.cost)
        layout = self.namespace.layout
        info = self.model.info
        if (layout.num_layers, layout.kv_heads, layout.head_dim, layout.dtype) != (
            info.num_layers, info.num_kv_heads, info.head_dim, info.dtype,
        ):  # fmt: skip
            raise ValueError(f"namespace layout {layout} does not match the model {info}")

    @classmethod
    def for_model(
        cls,
        model: ModelAdapter,
        tiers: dict[str, KVTier],
        model_id: str,
        cost: CostModel,
        page_tokens: int = 256,
        tp: TPGroup | None = None,
        **options: object,
    ) -> Executor:
        tp = tp or TPGroup(0, 1)
        i = model.info
        layout = PageLayout(i.num_layers, page_tokens, i.num_kv_heads, i.head_dim, i.dtype)
        ns = Namespace(model_id, layout, tp_rank=tp.rank, tp_size=tp.size)
        return cls(model, tiers, ns, cost, tp=tp, **options)  # type: ignore[arg-type]

    @property
    def page_tokens(self) -> int:
        return self.namespace.layout.page_tokens

    def new_kv(self, tokens: int) -> KVCache:
        return self.model.new_kv(tokens, self.page_tokens)

    def cost_model(self) -> CostModel:
        """The calibrated cost model (the prior until steps have been measured)."""
        return self.calibrator.model() if self.calibrate else self.cost

    # -- planning ------------------------------------------------------------------------
    def plan(
        self,
        requests: Sequence[RestoreRequest],
        policy: str = "cacheflow",
        capabilities: Capabilities = RUNTIME_CAPABILITIES,
        chunk_tokens: int = 256,
    ) -> Plan:
        """Plan the round on rank 0 with the calibrated cost model; every rank gets it."""
        made = None
        if self.tp.rank == 0:
            made = plan(
                [r.planner_request() for r in requests],
                self.cost_model(),
                policy,
                capabilities,
                chunk_tokens,
            )
        return self.tp.broadcast_object(made)

    def run(
        self,
        requests: Sequence[RestoreRequest],
        policy: str = "cacheflow",
        capabilities: Capabilities = RUNTIME_CAPABILITIES,
        chunk_tokens: int = 256,
    ) -> RoundResult:
        """Plan and restore one round."""
        started = time.perf_counter()
        the_plan = self.plan(requests, policy, capabilities, chunk_tokens)
        planned = time.perf_counter() - started
        result = self.restore(requests, the_plan)
        result.plan_s = planned
        return result

    # -- execution -----------------------------------------------------------------------
    def restore(self, requests: Sequence[RestoreRequest], the_plan: Plan) -> RoundResult:
        """Validate ``the_plan`` for ``requests`` and run it; returns logits and timings."""
        L = self.model.num_layers
        validate(the_plan, [r.planner_request() for r in requests], L)
        live = {r.id: _InFlight(r, Readiness(L, r.device_tokens, r.evicted_end)) for r in requests}
        order = list(the_plan.order) or [r.id for r in requests]
        seq: list[tuple[float, int, str, int, Step]] = []
        for rid in order:
            for idx, step in enumerate(the_plan.requests[rid].steps):
                seq.append((step.start_s, len(seq), rid, idx, step))
                if step.action is Action.RECOMPUTE:
                    live[rid].readiness.own(step.start, step.end, step.layer_start, step.layer_end)
        seq.sort(key=lambda x: (x[0], x[1]))
        tasks: list[LoadTask] = []
        for _, _, rid, idx, step in seq:
            if step.action is not Action.LOAD:
                continue
            r = live[rid].req
            per_token_layer = r.kv.bytes_per_token // L
            for g0, g1 in split_load(
                step.start, step.end, step.layer_start, step.layer_end, per_token_layer,
                self.task_bytes,
            ):  # fmt: skip
                tasks.append(
                    LoadTask(
                        rid,
                        idx,
                        step.tier or "",
                        step.start,
                        step.end,
                        g0,
                        g1,
                        r.kv,
                        live[rid].readiness,
                        r.page_hashes,
                    )
                )
        stats = RestoreStats()
        timings: list[StepTiming] = []
        io = IOEngine(self.tiers, self.namespace, self.io_workers, self.on_task_done)
        t0 = time.perf_counter()
        io.submit(tasks)
        try:
            for _, _, rid, _idx, step in seq:
                if step.action is Action.LOAD:
                    continue
                timings.append(self._compute(live[rid], step, stats, io))
        finally:
            io.join()
        self._sync()
        wall = time.perf_counter() - t0
        for (rid, idx), tr in io.transfers.items():
            step = the_plan.requests[rid].steps[idx]
            timings.append(
                StepTiming(
                    rid,
                    "load",
                    step.tier,
                    step.start,
                    step.end,
                    step.layer_start,
                    step.layer_end,
                    step.finish_s - step.start_s,
                    tr.seconds,
                )
            )
            if self.calibrate and tr.failed_pages == 0 and tr.nbytes > 0:
                self.calibrator.add_transfer(step.tier or "", tr.nbytes, tr.seconds)
        stats.loaded_bytes = io.stats.loaded_bytes
        stats.failed_pages = io.stats.failed_pages
        self.totals.add(stats)
        results = {}
        for rid in order:
            lv = live[rid]
            rp = the_plan.requests[rid]
            assert lv.logits is not None
            restore_s = (
                max(lv.readiness.last_ready - t0, 0.0)
                if lv.readiness.end > lv.readiness.start
                else 0.0
            )
            results[rid] = RequestResult(
                rid, lv.logits, lv.done_s - t0, restore_s, rp.predicted_ttft_s, rp.shape
            )
        return RoundResult(the_plan, results, timings, stats, wall)

    def _sync(self) -> None:
        if self.model.info.device.type == "cuda":
            torch.cuda.synchronize()

    def _compute(self, lv: _InFlight, step: Step, stats: RestoreStats, io: IOEngine) -> StepTiming:
        r, board = lv.req, lv.readiness
        d, e, L = r.device_tokens, r.evicted_end, self.model.num_layers
        a, b, l0, l1 = step.start, step.end, step.layer_start, step.layer_end
        waited = 0.0
        repairs_before = stats.repairs
        reads_to = a if step.action is Action.RECOMPUTE else e

        def before(layer: int) -> None:
            nonlocal waited
            self._sync()  # the layers launched so far are compute, not waiting
            w0 = time.perf_counter()
            self._ensure(lv, layer, d, reads_to, stats)
            waited += time.perf_counter() - w0

        def after(layer: int) -> None:
            if step.action is Action.RECOMPUTE:
                board.mark(a, b, layer, layer + 1, READY)

        overlapped = io.busy()  # loads in flight slow a forward down (calibrated apart)
        t0 = time.perf_counter()
        if l0 == 0:
            hidden = self.model.embed(r.input_ids[a:b])
        else:
            if (
                lv.hidden is None
                or lv.hidden_layer is None
                or (lv.hidden_layer[a - d : b - d] != l0 - 1).any()
            ):
                raise RuntimeError(
                    f"request {r.id!r}: recompute of [{a}, {b}) from layer {l0} has no hidden "
                    f"states at layer {l0 - 1}"
                )
            hidden = lv.hidden[a - d : b - d].unsqueeze(0)
        hidden = self.model.run_layers(
            r.kv, hidden, a, l0, l1, before_layer=before, after_layer=after
        )
        if step.action is Action.RECOMPUTE and l1 < L:
            if lv.hidden is None or lv.hidden_layer is None:
                lv.hidden = torch.empty(
                    (e - d, hidden.shape[-1]), dtype=hidden.dtype, device=hidden.device
                )
                lv.hidden_layer = np.full(e - d, -1, dtype=np.int32)
            lv.hidden[a - d : b - d] = hidden[0]
            lv.hidden_layer[a - d : b - d] = l1 - 1
        if step.action is Action.PREFILL and b == r.input_ids.numel():
            lv.logits = self.model.logits(hidden[0, -1])
        self._sync()
        t1 = time.perf_counter()
        if step.action is Action.PREFILL:
            lv.done_s = t1
        busy = t1 - t0 - waited
        if self.calibrate and stats.repairs == repairs_before:
            self.calibrator.add_compute(a, b - a, busy, layers=l1 - l0, overlapped=overlapped)
        return StepTiming(
            r.id, str(step.action), None, a, b, l0, l1, step.finish_s - step.start_s, busy, waited
        )

    # -- readiness and repair --------------------------------------------------------------
    def _ensure(self, lv: _InFlight, layer: int, a: int, b: int, stats: RestoreStats) -> None:
        """Return once the KV of tokens ``[a, b)`` at ``layer`` is in place, repairing any
        cells a tier failed to deliver (agreed on by every TP rank)."""
        board = lv.readiness
        lo, hi = max(a, board.start), min(b, board.end)
        if lo >= hi:
            return
        failed = board.wait(layer, lo, hi, self.wait_timeout_s)
        if self.tp.size > 1:
            agreed = self.tp.all_reduce_max_mask(failed)
            for x, y in board.failed_runs(layer, lo, hi, agreed & ~failed):
                board.set_failed(layer, x, y)
            failed = agreed
        for x, y in board.failed_runs(layer, lo, hi, failed):
            self._repair(lv, x, y, layer, stats)

    def _repair(self, lv: _InFlight, x: int, y: int, layer: int, stats: RestoreStats) -> None:
        """Recompute tokens ``[x, y)`` through layers ``0..layer`` over the restored prefix,
        storing K and V only at the layers where they were lost."""
        r, board = lv.req, lv.readiness
        for j in range(layer + 1):
            self._ensure(lv, j, r.device_tokens, x, stats)
        lost = set(board.failed_layers(x, y, layer))
        if self.tp.size > 1:
            mask = np.zeros(layer + 1, dtype=bool)
            mask[list(lost)] = True
            lost = {int(i) for i in np.flatnonzero(self.tp.all_reduce_max_mask(mask))}
        logger.warning(
            "request %s: recomputing tokens [%d, %d) at layers %s lost by a tier",
            r.id, x, y, sorted(lost),
        )  # fmt: skip
        hidden = self.model.embed(r.input_ids[x:y])
        self.model.run_layers(r.kv, hidden, x, 0, layer + 1, store=lambda j: j in lost)
        for j in lost:
            board.mark(x, y, j, j + 1, REPAIRED)
        stats.repairs += 1
        stats.repaired_token_layers += (y - x) * len(lost)


__all__ = [
    "FAILED",
    "Executor",
    "RequestResult",
    "RestoreStats",
    "RoundResult",
    "StepTiming",
]
