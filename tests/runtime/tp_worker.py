"""Body of one tensor-parallel rank for test_tp (run under torch.multiprocessing.spawn)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sglang_cacheflow.planner import TierCost
from sglang_cacheflow.planner.capabilities import Capabilities
from sglang_cacheflow.runtime import ModelAdapter, TPGroup, shard_model
from sglang_cacheflow.runtime.workload import balanced_cost, prepare
from sglang_cacheflow.tiers import HostTier
from tests.runtime.helpers import VOCAB, make_executor, random_model

LAYER_WISE = Capabilities(token_split=False, layer_split=True)


def scenario(family: str, tp: TPGroup, out: Path, lose_on_rank: int | None) -> None:
    """Restore two requests (cacheflow layer-wise, then token-wise) and save logits, KV
    and plans under ``out``; ``lose_on_rank`` deletes pages on that rank only."""
    model = shard_model(random_model(family, seed=11), tp)
    host = HostTier(1 << 28)
    cost = balanced_cost(ModelAdapter(model), 2e4, ["host"], tp=tp.size)
    if tp.rank == 1:  # a prior that would plan "recompute all": only rank 0's plan counts
        cost = dataclasses.replace(cost, tiers={"host": TierCost(1.0)})
    ex = make_executor(model, {"host": host}, cost=cost, tp=tp)
    saved: dict[str, object] = {}
    for rnd, (policy, caps) in enumerate([("cacheflow", LAYER_WISE), ("cacheflow", None)]):
        torch.manual_seed(20 + rnd)
        ids = torch.randint(0, VOCAB, (230,))
        prep = prepare(ex, f"r{rnd}", ids, 20, [("host", 200)], salt=str(rnd))
        if lose_on_rank == tp.rank:
            host.delete(ex.namespace, [prep.request.page_hashes[p] for p in (9, 12)])
        kwargs = {"capabilities": caps} if caps else {}
        result = ex.run([prep.request], policy, chunk_tokens=32, **kwargs)
        saved[f"logits{rnd}"] = result.requests[f"r{rnd}"].logits
        saved[f"kv{rnd}"] = prep.request.kv.data[:, :, :230].clone()
        saved[f"plan{rnd}"] = result.plan.to_dict()["requests"]
        saved[f"repairs{rnd}"] = result.stats.repairs
    torch.save(saved, out / f"rank{tp.rank}.pt")


def rank_main(rank: int, size: int, port: int, families: list[str], out: str, lose: int) -> None:
    torch.set_num_threads(1)
    tp = TPGroup.init(rank, size, port, backend="gloo")
    try:
        for family in families:
            folder = Path(out) / family
            folder.mkdir(exist_ok=True)
            scenario(family, tp, folder, None if lose < 0 else lose)
    finally:
        torch.distributed.destroy_process_group()
