"""Tensor parallelism: every rank takes the identical restore decision.

The fast unit test (real ``--tp 2`` servers: ``test_tp_server.py``). It drives the decision
path itself in two gloo processes: each rank's controller is fed different local measurements
(compute and L3 timings) and different local L3 hit lengths, plans a round of arrivals, and
records the prefetches it would issue. With the TP CPU group the decisions are identical and
cost one collective for the whole round; planning on each rank's own view gives different
decisions.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sglang_cacheflow.planner import ModelShape
from sglang_cacheflow.sglang.config import parse_config
from sglang_cacheflow.sglang.controller import CacheFlowController
from sglang_cacheflow.sglang.split import agree_pages
from sglang_cacheflow.sglang.tp import reduce_round
from tests.sglang.fakes import Cache, Handle

SHAPE = ModelShape(num_layers=4, num_kv_heads=2, head_dim=32, dtype_bytes=4, tp=2)


def _calls(n: int) -> list[dict[str, Any]]:
    return [
        {
            "request": Handle(f"r{i}"),
            "new_input_tokens": list(range(512 + 64 * i)),
            "matched_prefix_tokens": [],
            "storage_hit_end": None,
        }
        for i in range(n)
    ]


def _decide(rank: int, group: Any) -> dict[str, Any]:
    cfg = parse_config("cacheflow", json.dumps({"redis_url": "redis://h:1/0", "chunk_tokens": 16}))
    # rank-local measurements: rank 0 sees fast compute and a faster link than rank 1
    hits = {f"r{i}": 512 + 64 * i - (64 if rank == 1 and i == 3 else 0) for i in range(8)}
    cache = Cache(hits)
    ctl = CacheFlowController(cfg, cache, SHAPE, 16, tp_group=group, tp_rank=rank)
    for p in range(8):
        n = 64 + 32 * p
        seconds = n / (40_000.0 if rank == 0 else 8_000.0)
        ctl.costs.observe_compute([p * 16], [n], seconds)
    for k in range(1, 6):
        nbytes = k * 1 << 20
        ctl.costs.observe_transfer(
            "redis", nbytes, nbytes / (0.02e9 if rank == 0 else 0.01e9) + 1e-4
        )
    # what a split costs beyond its forwards (a 0.3 step toward the residual): rank 1 saw a
    # split 200 ms over its plan, rank 0 one 100 ms over
    ctl.costs.observe_split(0.6 if rank == 0 else 0.7, 0.5)
    # and the overlap slowdown: rank 0's split chunks ran 10% slower beside a read
    ctl.costs.observe_compute([0], [256], 1.1 * 256 / 40_000.0 if rank == 0 else 256 / 8_000.0,
                              None, True)  # fmt: skip
    # and the part of a forward outside its layer loop: rank 1 measured it larger
    ctl.costs.observe_unlayered(0.02 if rank == 0 else 0.03)
    ctl.plan_prefetches(_calls(6))
    # two late arrivals, planned behind the first round's work; the ranks read their clocks
    # at different times, so what that work still owes differs unless reduced
    time.sleep(0.05 * rank)
    ctl.plan_prefetches(_calls(8)[6:])
    busy = {"compute": 0.1 * (rank + 1), "redis": 0.3 - 0.1 * rank}
    # a split restore's back landed in part, differently on each rank: all splice the MIN
    landed = agree_pages(5 - 2 * rank, group)
    reduced, _, busy = reduce_round(ctl.costs.model(), [], group, busy)
    return {
        "landed": landed,
        "issued": cache.issue_order,
        "plans": {rid: d.planned_load for rid, d in ctl.storage_plans.items()},
        "shapes": {rid: d.shape for rid, d in ctl.storage_plans.items()},
        "collectives": ctl.collectives,
        "rounds": ctl.rounds,
        "busy": busy,
        "hand_off": [
            reduced.compute.split_s,
            reduced.compute.overlap_slowdown,
            reduced.compute.unlayered_s,
        ],
    }


def _worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        reduced = _decide(rank, dist.group.WORLD)
        local = _decide(rank, None)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"tp": reduced, "local": local}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_take_identical_decisions(tmp_path: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    mp.start_processes(
        _worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # identical decisions, prefetches issued in the same order, one collective per round
    assert r0["tp"]["issued"] == r1["tp"]["issued"]
    assert r0["tp"]["plans"] == r1["tp"]["plans"]
    assert r0["tp"]["shapes"] == r1["tp"]["shapes"]
    assert r0["tp"]["collectives"] == r1["tp"]["collectives"] == 2
    assert r0["tp"]["landed"] == r1["tp"]["landed"] == 3
    assert (r0["local"]["landed"], r1["local"]["landed"]) == (5, 3)
    # the work resources owe is agreed as the MAX over ranks
    assert r0["tp"]["busy"] == r1["tp"]["busy"] == pytest.approx({"compute": 0.2, "redis": 0.3})
    # and so are a split's hand-off and the overlap slowdown, at their MAX
    assert r0["tp"]["hand_off"] == r1["tp"]["hand_off"]
    assert r0["tp"]["hand_off"][0] == pytest.approx(0.06)
    assert r0["local"]["hand_off"][0] == pytest.approx(0.03)
    assert r0["tp"]["hand_off"][1] == max(r0["local"]["hand_off"][1], r1["local"]["hand_off"][1])
    assert r0["local"]["hand_off"][1] > 0
    assert r0["local"]["hand_off"][2] == pytest.approx(0.02)
    assert r0["tp"]["hand_off"][2] == pytest.approx(0.03)
    # the round mixes loading and recomputing, and uses the hit every rank has (MIN)
    plans = r0["tp"]["plans"]
    assert any(v > 0 for v in plans.values()) and any(v < 512 for v in plans.values())
    assert plans["r3"] <= 512 + 3 * 64 - 64
    # fed only their own measurements, the ranks would disagree
    assert r0["local"]["plans"] != r1["local"]["plans"]
    assert r0["local"]["collectives"] == 0
