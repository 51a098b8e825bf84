"""The restore controller's planning between rounds: work owed by earlier rounds.

The controller is driven directly, with the radix cache reduced to the two calls it makes
(L3 lookup, prefetch issue); the end-to-end behaviour is in ``test_server.py``.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from sglang_cacheflow.planner import (
    ComputeCost,
    CostModel,
    ModelShape,
    Request,
    Span,
    TierCost,
    plan,
)
from sglang_cacheflow.sglang.capabilities import SGLANG
from sglang_cacheflow.sglang.config import parse_config
from sglang_cacheflow.sglang.controller import CacheFlowController
from sglang_cacheflow.sglang.decision import describe, logged_decisions, serve_in_plan_order
from sglang_cacheflow.sglang.split import PAGES_PER_READ
from sglang_cacheflow.tiers.probe import ClientCpu
from tests.sglang.fakes import Cache, Handle, Storage

SHAPE = ModelShape(num_layers=4, num_kv_heads=2, head_dim=32, dtype_bytes=4)  # 2 KiB/token


def _call(rid: str, n: int = 512) -> dict[str, Any]:
    return {
        "request": Handle(rid),
        "new_input_tokens": list(range(n)),
        "matched_prefix_tokens": [],
        "storage_hit_end": None,
    }


class Clock:
    """The controller's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _controller(
    clock: Clock | None = None, calibrate: bool = False, cache: Cache | None = None
) -> tuple[CacheFlowController, Cache]:
    # 512 tokens: recompute 93 ms at 5500 tok/s, load 106 ms at 10 MB/s + 1 ms
    prior = {"tokens_per_s": 5500.0, "redis_GBps": 0.01, "redis_latency_ms": 1.0}
    cfg = parse_config(
        "cacheflow",
        json.dumps({"redis_url": "redis://h:1/0", "calibrate": calibrate, "prior": prior}),
    )
    cache = cache or Cache()
    return CacheFlowController(cfg, cache, SHAPE, 16, clock=clock or Clock()), cache


def test_a_request_alone_splits_and_one_behind_it_plans_against_the_owed_work() -> None:
    ctl, cache = _controller()
    ctl.plan_prefetches([_call("first")])
    first = ctl.storage_plans["first"]
    # alone on a balanced link: half recomputed, half loaded by the split reader (SGLang's
    # prefetch, which can only bring the front, is not issued)
    assert first.shape in ("token split 256+256", "layer split 2/4"), first.shape
    assert first.split is not None and cache.issued == {} and ctl.splits["first"] is first
    busy = ctl.owed.busy()
    assert busy["compute"] == pytest.approx(256 / 5500, rel=0.01)
    assert busy["redis"] == pytest.approx(256 * 2048 / 1e7 + 1e-3, rel=0.01)
    ctl.plan_prefetches([_call("second")])  # right behind it: both resources still owe
    second = ctl.storage_plans["second"]
    assert second.predicted_s > first.predicted_s
    after = ctl.owed.busy()
    assert after["compute"] > busy["compute"] and after["redis"] > busy["redis"]
    assert second.split is not None  # a split too, against what the first still owes


def test_an_l3_load_sglangs_prefetch_cannot_stage_is_not_planned() -> None:
    # SGLang prefetches no fewer tokens than its threshold, into host memory it has free:
    # a planned load outside that comes to nothing, and the span is recomputed late.
    prior = {"tokens_per_s": 5500.0, "redis_GBps": 10.0, "redis_latency_ms": 0.1}
    cfg = parse_config(
        "cacheflow", json.dumps({"redis_url": "redis://h:1/0", "calibrate": False, "prior": prior})
    )
    shapes = {}
    for staged in (None, (64, 10**6), (16, 96)):
        cache = Cache()
        cache.staged = staged
        ctl = CacheFlowController(cfg, cache, SHAPE, 16, clock=Clock())
        ctl.plan_prefetches([_call("short", 48), _call("long", 512)])
        shapes[staged] = {rid: ctl.storage_plans[rid].shape for rid in ("short", "long")}
        lo, hi = staged or (0, 10**9)
        assert all(lo <= n <= hi for n in cache.issued.values()), (staged, cache.issued)
    assert shapes[None] == {"short": "load all", "long": "load all"}  # a fast link
    assert shapes[(64, 10**6)]["short"] != "load all"  # under the threshold
    assert shapes[(64, 10**6)]["long"] == "load all"
    assert shapes[(16, 96)]["long"] != "load all"  # more than the host holds


def test_owed_work_runs_down_with_time() -> None:
    clock = Clock()
    ctl, _ = _controller(clock)
    ctl.plan_prefetches([_call("first")])
    owed = ctl.owed.busy()
    clock.now += 0.02
    assert ctl.owed.busy()["compute"] == pytest.approx(owed["compute"] - 0.02)
    clock.now += 1.0
    assert ctl.owed.busy() == {}
    # a request arriving once the resources are free again is planned like the first
    ctl.plan_prefetches([_call("later")])
    assert ctl.storage_plans["later"].shape == ctl.storage_plans["first"].shape


def test_decisions_of_requests_that_left_the_queue_are_dropped() -> None:
    class _Scheduler:
        def __init__(self) -> None:
            self.waiting_queue: list[Any] = []

    clock = Clock()
    ctl, _ = _controller(clock)
    ctl.plan_prefetches([_call("aborted"), _call("waiting")])
    assert set(ctl.storage_plans) == {"aborted", "waiting"}
    ctl.begin_admission(_Scheduler())  # just planned: kept, it may not be queued yet
    assert set(ctl.storage_plans) == {"aborted", "waiting"}
    clock.now += 120.0
    sched = _Scheduler()
    sched.waiting_queue = [Handle("waiting")]
    sched.waiting_queue[0].finished = lambda: True  # type: ignore[attr-defined]
    ctl.begin_admission(sched)
    assert set(ctl.storage_plans) == {"waiting"}


def test_the_host_pages_of_a_planned_load_are_held_until_it_is_admitted() -> None:
    # SGLang's prefetch stages a planned load in host memory; while the request waits for
    # device room, host eviction took those pages and the span was recomputed after the wait
    prior = {"tokens_per_s": 5500.0, "redis_GBps": 10.0, "redis_latency_ms": 0.1}
    cfg = parse_config(
        "cacheflow", json.dumps({"redis_url": "redis://h:1/0", "calibrate": False, "prior": prior})
    )
    clock = Clock()
    cache = Cache()
    ctl = CacheFlowController(cfg, cache, SHAPE, 16, clock=clock)
    ctl.plan_prefetches([_call("admitted"), _call("aborted")])
    assert {ctl.storage_plans[r].shape for r in ("admitted", "aborted")} == {"load all"}
    assert ctl.holds_prefetch("admitted") and ctl.holds_prefetch("aborted")
    assert not ctl.holds_prefetch("unknown")
    waiting = [_Queued("admitted", 512), _Queued("aborted", 512)]
    sched = SimpleNamespace(waiting_queue=waiting)
    ctl.begin_admission(sched)
    assert cache.released == []  # both still wait: held
    admitted = SimpleNamespace(rid="admitted", storage_hit_length=512, host_loaded_length=512)
    ctl.end_admission(SimpleNamespace(reqs=[admitted]))
    assert cache.released == ["admitted"]  # its load-back holds them now
    clock.now += 120.0  # the other left the queue unadmitted long ago (an abort)
    ctl.begin_admission(SimpleNamespace(waiting_queue=[]))
    assert cache.released == ["admitted", "aborted"]
    # a split reads into its own staging: nothing of SGLang's is held for it
    ctl2, _ = _controller()
    ctl2.plan_prefetches([_call("split")])
    assert ctl2.storage_plans["split"].split is not None and not ctl2.holds_prefetch("split")
    # the load baseline runs as SGLang's HiCache does: nothing held
    base = CacheFlowController(
        parse_config("load", json.dumps({"redis_url": "redis://h:1/0", "calibrate": False})),
        Cache(), SHAPE, 16, clock=Clock(),
    )  # fmt: skip
    base.plan_prefetches([_call("baseline")])
    assert base.storage_plans["baseline"].shape == "load all"
    assert not base.holds_prefetch("baseline")


class _Queued:
    """A request waiting in SGLang's queue: ``prefix_len`` tokens cached, the rest to prefill."""

    def __init__(self, rid: str, tokens: int, prefix_len: int = 0) -> None:
        self.rid = rid
        self.origin_input_ids = list(range(tokens))
        self.output_ids: list[int] = []
        self.prefix_len = prefix_len

    host_hit_length = 0  # nothing in host memory

    def finished(self) -> bool:
        return False

    def init_next_round_input(self, cache: Any, cow_mamba: bool = False) -> None:
        pass


def test_prefills_queued_ahead_count_as_owed_compute() -> None:
    # Under load the scheduler's queue holds prefills that run before a restore planned now:
    # the plan must count them, or the TTFT it predicts is not what the client sees.
    idle, _ = _controller()
    idle.plan_prefetches([_call("restore")])
    loaded, _ = _controller()
    queue = [
        _Queued("chat-1", 1024),
        _Queued("chat-2", 600, prefix_len=512),
        _Queued("restore", 512),
    ]
    loaded.begin_arrivals(SimpleNamespace(waiting_queue=queue))
    loaded.end_arrivals()
    loaded.plan_prefetches([_call("restore")])
    queued = (1024 + 88) / 5500  # the prefills ahead; the restore itself is being planned
    assert loaded.queued_compute_s(loaded.costs.model(), {"restore": 0}) == pytest.approx(queued)
    a, b = idle.storage_plans["restore"], loaded.storage_plans["restore"]
    assert b.predicted_s > queued > a.predicted_s  # the restore's first token comes after them
    # alone it splits its span; behind a busy compute resource it loads all of it
    assert a.split is not None and b.shape == "load all"
    # counted once: the next round sees the queue afresh, not also as owed work
    assert loaded.owed.busy()["compute"] < queued + 0.1


class _SlowStorage(Storage):
    """Every tier call takes 10 ms (a round trip) and is counted."""

    def __init__(self) -> None:
        self.calls = 0

    def read_pages(self, keys: list[str], pages: Any, layers: Any = None) -> list[bool]:
        self.calls += 1
        time.sleep(0.01)
        return super().read_pages(keys, pages, layers)


def test_a_split_read_calibrates_the_tier_as_one_transfer() -> None:
    # The reader reads a split's back in several tier calls; the planner prices the load as
    # one transfer with one latency, so calibration must see one transfer of all its bytes
    # (per-call samples taught it a per-call latency it then charged only once).
    storage = _SlowStorage()
    cache = Cache()
    cache.cacheflow_storage = lambda: storage  # type: ignore[method-assign]
    ctl, _ = _controller(calibrate=True, cache=cache)
    ctl.plan_prefetches([_call("r")])
    sp = ctl.split_of("r")
    assert sp is not None and sp.done.wait(5.0) and sp.landed_pages == sp.pages
    assert storage.calls > 1
    nbytes = sp.tokens * sp.layer_share * SHAPE.kv_bytes_per_token
    redis = ctl.costs.model().tier("redis")
    # one sample: the prior latency (1 ms) stays, the bandwidth is what the whole read took
    assert redis.latency_s == pytest.approx(1e-3)
    assert redis.bandwidth_Bps == pytest.approx(nbytes / (sp.read_s - 1e-3), rel=1e-6)


def test_forwards_beside_reads_calibrate_the_overlap_slowdown() -> None:
    ctl, _ = _controller(calibrate=True)
    costs = ctl.costs
    for n in (64, 128, 256, 512):  # alone: 1 ms + 5500 tokens a second
        costs.observe_compute([0], [n], 1e-3 + n / 5500)
    assert costs.model().compute.overlap_slowdown == 0.0
    # a layer split's chunk through 2 of 4 layers, beside a read, 30% slower than alone
    for n in (256, 512):
        costs.observe_compute([0], [n], 1.3 * (1e-3 + n / 5500) / 2, layers=2, overlapped=True)
    model = costs.model()
    assert model.compute.overlap_slowdown == pytest.approx(0.3, rel=1e-3)
    assert model.compute.tokens_per_s == pytest.approx(5500, rel=1e-3)  # the fit is unmoved


def test_admission_serves_the_planned_restores_in_the_plans_order() -> None:
    # Three returning requests arrive together, the longest first; the plan serves the
    # shortest first (its TTFTs assume so), and SGLang admits in queue order (FCFS): the
    # controller puts the restores in the plan's order, in the places they hold.
    ctl, _ = _controller()
    ctl.plan_prefetches([_call("long", 2048), _call("mid", 512), _call("short", 128)])
    order = sorted(ctl.storage_plans, key=lambda rid: ctl.storage_plans[rid].order)
    assert order != ["long", "mid", "short"], order  # the plan reorders them
    queue = [_Queued(rid, 10) for rid in ("long", "new-prompt", "mid", "short")]
    sched = SimpleNamespace(waiting_queue=queue, chunked_req=None)
    ctl.begin_admission(sched)
    assert [r.rid for r in sched.waiting_queue] == [order[0], "new-prompt", *order[1:]]
    # a request admitted leaves the plans; the others keep their order
    ctl.storage_plans.pop(order[0])
    ctl.begin_admission(sched)
    assert [r.rid for r in sched.waiting_queue][2:] == order[1:]


def test_serve_in_plan_order_moves_only_planned_requests() -> None:
    queue = [_Queued(rid, 1) for rid in ("x", "b", "y", "a", "c")]
    serve_in_plan_order(queue, {"a": (2, 0), "b": (2, 1), "c": (1, 0)})
    assert [r.rid for r in queue] == ["x", "c", "y", "a", "b"]
    serve_in_plan_order(queue, {"a": (0, 0)})  # one planned request: nothing to order
    assert [r.rid for r in queue] == ["x", "c", "y", "a", "b"]


def test_under_cacheflow_a_forward_carries_one_restore() -> None:
    # The plan times the compute resource one restore after another; SGLang would batch the
    # waiting restores into one forward, and on a compute-bound engine the first restore's
    # first token then waits for the last's recompute.
    ctl, _ = _controller()
    ctl.plan_prefetches([_call("a", 512), _call("b", 512)])
    restore, prompt = Handle("a"), Handle("new-prompt")
    assert ctl.holds_back("b", [restore])  # a restore behind another waits a forward
    assert not ctl.holds_back("b", [prompt])  # new prompts batch as SGLang does
    assert not ctl.holds_back("new-prompt", [restore])
    assert not ctl.holds_back("a", [restore])  # itself (a chunked request continuing)
    # the baselines keep SGLang's batching
    for policy in ("recompute", "load", "cake"):
        cfg = parse_config(policy, json.dumps({"redis_url": "redis://h:1/0", "calibrate": False}))
        base = CacheFlowController(cfg, Cache(), SHAPE, 16, clock=Clock())
        base.plan_prefetches([_call("a", 512), _call("b", 512)])
        assert base.is_restore("b") and not base.holds_back("b", [restore]), policy


class _Mode:
    def is_extend(self) -> bool:
        return True

    def is_decode(self) -> bool:
        return False

    def is_mixed(self) -> bool:
        return False


def _batch(rid: str, n: int) -> SimpleNamespace:
    return SimpleNamespace(
        forward_mode=_Mode(), prefix_lens=[0], extend_lens=[n], reqs=[Handle(rid)]
    )


def test_only_a_splits_own_chunk_beside_a_read_measures_the_overlap() -> None:
    gate = threading.Event()

    class _Held(Storage):
        def read_pages(self, keys: list[str], pages: Any, layers: Any = None) -> list[bool]:
            gate.wait(10)
            return super().read_pages(keys, pages, layers)

    cache = Cache()
    cache.cacheflow_storage = lambda: _Held()  # type: ignore[method-assign]
    ctl, _ = _controller(calibrate=True, cache=cache)
    alone = {n: 1e-3 + n / 5500 for n in (64, 128, 256, 512)}
    for n, s in alone.items():  # the reader idle: the machine alone
        ctl.forward_done(_batch("warm-up", n), s, None, time.perf_counter())
    ctl.plan_prefetches([_call("r")])  # a split: its read is held under way
    assert ctl.split_of("r") is not None
    t0 = time.perf_counter()
    # another request's forward beside the read, slowed by whatever else runs: not counted
    ctl.forward_done(_batch("other", 256), 3 * alone[256], None, t0)
    assert ctl.costs.model().compute.overlap_slowdown == 0.0
    # the split's own chunk beside its read, 20% slower than alone: the overlap slowdown
    ctl.forward_done(_batch("r", 512), 1.2 * alone[512], None, t0)
    gate.set()
    model = ctl.costs.model()
    assert model.compute.overlap_slowdown == pytest.approx(0.2, rel=1e-3)
    assert model.compute.tokens_per_s == pytest.approx(5500, rel=1e-3)


def test_decision_log_lines_read_back() -> None:
    """The decision line :func:`describe` writes is what :func:`logged_decisions` parses
    (tests and operators read restores per request from it)."""
    # balanced: 512 tokens recompute in 93 ms and load in about as long from either tier
    cost = CostModel(SHAPE, ComputeCost(5500.0), {"host": TierCost(1e7), "redis": TierCost(1e7)})
    reqs = [Request("a", 0, (Span("redis", 256),), 16), Request("b", 32, (Span("host", 64),), 8)]
    plan_ = plan(reqs, cost, "cacheflow", SGLANG, 16)
    lines = [describe(plan_, r, r.spans[0].tier, cost) for r in reqs]
    log = "\n".join(f"[2026-11-26 19:00:00 TP0] {line}" for line in ["noise", *lines])
    got = logged_decisions(log)
    assert [(d.rid, d.tier, d.evicted, d.policy) for d in got] == [
        ("a", "redis", 256, "cacheflow"),
        ("b", "host", 64, "cacheflow"),
    ]
    for d, r in zip(got, reqs, strict=True):
        assert d.loaded + d.recomputed == d.evicted
        assert d.shape == plan_.requests[r.id].shape
        assert d.round_size == 2
    assert [d.rid for d in logged_decisions(log, "host")] == ["b"]


def test_a_baselines_round_is_predicted_as_sglangs_batched_prefill() -> None:
    # SGLang runs the waiting prefills of a baseline's round in one forward (up to its
    # chunked_prefill_size): both restores get their first token when it ends.
    prior = {"tokens_per_s": 2e4, "step_s": 0.01}  # a fixed cost per forward
    conf = {"redis_url": "redis://h:1/0", "calibrate": False, "prior": prior}
    cfg = parse_config("recompute", json.dumps(conf))
    batched = CacheFlowController(cfg, Cache(), SHAPE, 16, batch_tokens=4096, clock=Clock())
    batched.plan_prefetches([_call("a", 512), _call("b", 512)])
    a, b = (batched.storage_plans[rid].predicted_s for rid in ("a", "b"))
    assert a == pytest.approx(b)
    one = CacheFlowController(cfg, Cache(), SHAPE, 16, clock=Clock())  # one per forward
    one.plan_prefetches([_call("a", 512), _call("b", 512)])
    first, second = sorted(one.storage_plans[rid].predicted_s for rid in ("a", "b"))
    assert first < a < second  # one fixed cost fewer than the chain's last


def test_a_chunk_before_a_restores_last_gives_it_no_first_token() -> None:
    clock = Clock()
    cfg = parse_config("recompute", json.dumps({"redis_url": "redis://h:1/0", "calibrate": False}))
    ctl = CacheFlowController(cfg, Cache(), SHAPE, 16, batch_tokens=256, clock=clock)
    ctl.plan_prefetches([_call("a", 512)])
    ctl._track(ctl.storage_plans.pop("a"))
    chunk = _batch("a", 256)
    chunk.reqs[0].inflight_middle_chunks = 1  # SGLang's mark of a chunk before the last
    clock.now += 0.05
    ctl.forward_done(chunk, 0.05)
    assert "a" in ctl.pending  # over the budget: its prefill goes on
    clock.now += 0.05
    ctl.forward_done(_batch("a", 256), 0.05)
    assert "a" not in ctl.pending


def test_a_split_reads_cpu_measured_by_the_backend_is_planned_and_calibrated() -> None:
    # The L3 backend's probe: 1 ms a call, 40 us a page and 2 us a page's layer; the
    # controller's splits read 16-token pages, 4 pages a call (not streamed).
    cpu = ClientCpu(per_call_s=1e-3, per_page_s=40e-6, per_page_layer_s=2e-6)

    class _Probed(Storage):
        read_cpu = cpu

    cache = Cache()
    cache.cacheflow_storage = lambda: _Probed()  # type: ignore[method-assign]
    ctl, _ = _controller(calibrate=True, cache=cache)
    ctl.plan_prefetches([_call("r")])
    tier = ctl.costs.model().tier("redis")
    per_token = (40e-6 + 1e-3 / PAGES_PER_READ) / 16
    assert tier.cpu_s_per_token == pytest.approx(per_token)
    assert tier.cpu_s_per_token_layer == pytest.approx(2e-6 / 16)
    # the split's own chunk beside its read: the CPU its read spent meanwhile is charged
    # apart from the slowdown (here the chunk ran beside all of a 0.1-s read, then half)
    sp = ctl.splits["r"].split
    assert sp is not None and sp.done.wait(5)
    sp.began, sp.read_s = 100.0, 0.1
    spent = ctl.read_cpu_during([Handle("r")], 99.9, 0.5)
    assert spent == pytest.approx(tier.read_cpu_s(sp.tokens, sp.layer_share * 4)) and spent > 0
    assert ctl.read_cpu_during([Handle("r")], 100.05, 0.5) == pytest.approx(spent / 2)
    assert ctl.read_cpu_during([Handle("other")], 99.9, 0.5) == 0.0


def test_a_split_is_admitted_up_to_its_span_and_a_host_hit_up_to_its_plan() -> None:
    # An L3 span after 64 cached tokens (16 on the device, 48 in host memory): the split's
    # request is admitted with its prefix up to the span, the host pages loaded back.
    ctl, _ = _controller()
    call = _call("split")
    call["matched_prefix_tokens"] = list(range(64))
    ctl.plan_prefetches([call])
    sp = ctl.splits["split"].split
    assert sp is not None and sp.span_start == 64
    assert ctl.host_limit("split", device_prefix=16) == 64
    assert ctl.host_limit("split", device_prefix=80) == 80  # a device hit is not undone
    # a planned host hit: its device prefix and the front its plan loads
    ctl.host_caps["host"] = 32
    assert ctl.host_limit("host", device_prefix=16) == 48
    assert ctl.host_limit("other", device_prefix=16) is None


class _Allocator:
    """The device KV allocator a front load takes its slots from: ``free`` slots left."""

    def __init__(self, free: int) -> None:
        self.free, self.next = free, 100
        self.pool = SimpleNamespace(layer_transfer_counter=None)
        self.pool.register_layer_transfer_counter = lambda c: setattr(
            self.pool, "layer_transfer_counter", c
        )

    def get_kvcache(self) -> Any:
        return self.pool

    def alloc(self, n: int) -> Any:
        if n > self.free:
            return None
        import torch

        self.free -= n
        self.next += n
        return torch.arange(self.next - n, self.next, dtype=torch.int32)


def _streamed(policy: str, free: int = 4096, **config: Any) -> tuple[CacheFlowController, Cache]:
    prior = {"tokens_per_s": 5500.0, "redis_GBps": 0.01, "redis_latency_ms": 1.0}
    data = {
        "redis_url": "redis://h:1/0", "calibrate": False, "prior": prior, "stream_groups": 3,
        "stream_front_loads": policy == "cacheflow",
    }  # fmt: skip
    cfg = parse_config(policy, json.dumps({**data, **config}))
    cache = Cache()
    cache.token_to_kv_pool_allocator = _Allocator(free)  # type: ignore[attr-defined]
    return CacheFlowController(cfg, cache, SHAPE, 16, clock=Clock()), cache


def _admitted(rid: str) -> Any:
    return SimpleNamespace(
        rid=rid, kv=SimpleNamespace(holds_kv=False), skip_radix_cache_insert=False,
        finished=lambda: False,
    )  # fmt: skip


@pytest.mark.parametrize(("recompute", "shape"), [(0.5, "load front 256+256"), (0.0, "load all")])
def test_a_streamed_front_load_is_read_by_the_reader_and_joins_the_prefix_at_admission(
    recompute: float, shape: str
) -> None:
    ctl, cache = _streamed("cacheflow", force_shape="load_front", force_recompute=recompute)
    assert ctl.caps.streams("redis") and ctl.front_loads
    ctl.plan_prefetches([_call("r")])
    d = ctl.storage_plans["r"]
    sp = d.split
    assert d.shape == shape and sp is not None and sp.loads_front
    assert cache.issued == {}  # no SGLang prefetch: the reader streams it
    assert (sp.start, sp.tokens) == (0, 512 - int(512 * recompute))
    assert ctl.front_load("r") is sp
    req = _admitted("r")
    assert ctl.admit_front_load(req, 0) == sp.tokens
    slots = ctl.front_slots["r"]
    assert slots.tolist() == list(range(100, 100 + sp.tokens))  # the prefix's continuation
    assert cache.token_to_kv_pool_allocator.free == 4096 - sp.tokens
    assert req.skip_radix_cache_insert  # out of the tree until every layer is in
    assert ctl.streaming(req) and "r" in ctl.layers.streams and "r" not in ctl.splits
    assert ctl.front_load("r") is None  # admitted once
    sp.close()


def test_a_front_load_that_cannot_start_where_planned_is_recomputed() -> None:
    ctl, cache = _streamed("cacheflow", force_shape="load_front", force_recompute=0.5)
    ctl.plan_prefetches([_call("moved"), _call("full")])
    # its prefix grew since the plan (the front got cached): the load no longer fits
    assert ctl.admit_front_load(_admitted("moved"), 64) == 0
    assert "moved" not in ctl.splits and "moved" not in ctl.front_slots
    # no device memory for the front's slots, and a tree with nothing to evict
    cache.token_to_kv_pool_allocator.free = 0
    cache.supports_prefix_sharing = lambda: False  # type: ignore[attr-defined]
    assert ctl.admit_front_load(_admitted("full"), 0) == 0
    assert "full" not in ctl.splits and not ctl.streamed


def test_front_loads_are_sglangs_prefetch_unless_asked_for() -> None:
    # by default (and under every baseline) an L3 front load is SGLang's prefetch
    for policy in ("cacheflow", "load", "cake", "recompute"):
        ctl, cache = _streamed(policy, stream_front_loads=False)
        assert not ctl.caps.streams("redis") and not ctl.front_loads
    ctl, cache = _streamed("cacheflow", stream_front_loads=False)
    ctl.plan_prefetches([_call("r")])
    assert "r" in cache.issued or "r" in ctl.splits  # a prefetch, or a split
    assert ctl.storage_plans["r"].split is None or not ctl.storage_plans["r"].split.loads_front
