"""The restore controller's planning between rounds: work owed by earlier rounds.

The controller is driven directly, with the radix cache reduced to the two calls it makes
(L3 lookup, prefetch issue); the end-to-end behaviour is in ``test_server.py``.
"""

from __future__ import annotations

import json
from typing import Any

from sglang_cacheflow.planner import ModelShape
from sglang_cacheflow.sglang.controller import CacheFlowController
from sglang_cacheflow.sglang.flags import parse_config

SHAPE = ModelShape(num_layers=4, num_kv_heads=2, head_dim=32, dtype_bytes=4)  # 2 KiB/token


class _Handle:
    def __init__(self, rid: str) -> None:
        self.rid = rid


class _Cache:
    def __init__(self) -> None:
        self.issued: dict[str, int] = {}

    def cacheflow_storage_hit(self, call: dict[str, Any]) -> int:
        return len(call["new_input_tokens"]) // 16 * 16

    def cacheflow_issue_prefetch(self, call: dict[str, Any]) -> None:
        self.issued[call["request"].rid] = len(call["new_input_tokens"])


def _call(rid: str, n: int = 512) -> dict[str, Any]:
    return {
        "request": _Handle(rid),
        "new_input_tokens": list(range(n)),
        "matched_prefix_tokens": [],
        "storage_hit_end": None,
    }


def _controller() -> tuple[CacheFlowController, _Cache]:
    # 512 tokens: recompute 93 ms at 5500 tok/s, load 106 ms at 10 MB/s + 1 ms
    prior = {"tokens_per_s": 5500.0, "redis_GBps": 0.01, "redis_latency_ms": 1.0}
    cfg = parse_config(
        "cacheflow", json.dumps({"redis_url": "redis://h:1/0", "calibrate": False, "prior": prior})
    )
    cache = _Cache()
    return CacheFlowController(cfg, cache, SHAPE, 16), cache


def test_a_request_arriving_behind_recomputes_loads() -> None:
    ctl, cache = _controller()
    ctl.plan_prefetches([_call("first")])
    assert "first" not in cache.issued  # alone, recomputing is cheaper: no prefetch
    busy = ctl.busy(ctl._owed_at)
    assert 0.09 < busy["compute"] < 0.11 and "redis" not in busy
    ctl.plan_prefetches([_call("second")])  # right behind it: compute still owes ~93 ms
    assert set(cache.issued) == {"second"} and cache.issued["second"] >= 256  # loads (most)
    assert ctl.busy(ctl._owed_at)["redis"] > 0.08  # its load is owed on the link


def test_owed_work_runs_down_with_time() -> None:
    ctl, cache = _controller()
    ctl.plan_prefetches([_call("first")])
    t = ctl._owed_at
    assert ctl.busy(t + 0.05)["compute"] < ctl.busy(t)["compute"]
    assert ctl.busy(t + 1.0) == {}
    # a request arriving once the compute is free again recomputes, like the first
    ctl._owed_at -= 1.0
    ctl.plan_prefetches([_call("later")])
    assert cache.issued == {}


def test_decisions_of_requests_that_left_the_queue_are_dropped() -> None:
    class _Scheduler:
        def __init__(self) -> None:
            self.waiting_queue: list[Any] = []

    ctl, _ = _controller()
    ctl.plan_prefetches([_call("aborted"), _call("waiting")])
    assert set(ctl.storage_plans) == {"aborted", "waiting"}
    ctl.begin_admission(_Scheduler())  # just planned: kept, it may not be queued yet
    assert set(ctl.storage_plans) == {"aborted", "waiting"}
    for d in ctl.storage_plans.values():
        d.t0 -= 120.0
    sched = _Scheduler()
    sched.waiting_queue = [_Handle("waiting")]
    sched.waiting_queue[0].finished = lambda: True  # type: ignore[attr-defined]
    ctl.begin_admission(sched)
    assert set(ctl.storage_plans) == {"waiting"}
