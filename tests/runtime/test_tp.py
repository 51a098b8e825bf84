"""Two tensor-parallel ranks over gloo restore what one rank restores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sglang_cacheflow.runtime import TPGroup
from sglang_cacheflow.testing.redis import free_port
from tests.runtime.helpers import logprob_diff
from tests.runtime.tp_worker import rank_main, scenario

FAMILIES = ["llama", "qwen2"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run both families on 2 gloo ranks, rank 1 losing two pages per round."""
    out = tmp_path_factory.mktemp("tp2")
    # forkserver: the ranks fork from a process that has torch and transformers imported
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.runtime.tp_worker"])
    mp.start_processes(
        rank_main, args=(2, free_port(), FAMILIES, str(out), 1), nprocs=2, join=True,
        start_method="forkserver",
    )  # fmt: skip
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_match_one(two_ranks: Path, tmp_path: Path, family: str) -> None:
    scenario(family, TPGroup(0, 1), tmp_path, None)
    one = torch.load(tmp_path / "rank0.pt")
    ranks = [torch.load(two_ranks / family / f"rank{r}.pt") for r in (0, 1)]
    for rnd in (0, 1):
        steps = ranks[0][f"plan{rnd}"]
        assert steps == ranks[1][f"plan{rnd}"]  # the plan broadcast from rank 0
        shapes = {s["action"] for rp in steps.values() for s in rp["steps"]}
        assert {"recompute", "load"} <= shapes
        for r in (0, 1):
            assert ranks[r][f"repairs{rnd}"] >= 1  # rank 0 repairs what rank 1 lost
            assert logprob_diff(ranks[r][f"logits{rnd}"], one[f"logits{rnd}"]) <= 1e-4
            assert torch.allclose(ranks[r][f"logits{rnd}"], one[f"logits{rnd}"], atol=1e-4)
        # each rank holds its half of the KV heads, equal to the single rank's
        full = one[f"kv{rnd}"]
        heads = full.shape[3] // 2
        for r in (0, 1):
            shard = full[:, :, :, r * heads : (r + 1) * heads]
            assert ranks[r][f"kv{rnd}"].shape == shard.shape
            assert (ranks[r][f"kv{rnd}"] - shard).abs().max() <= 1e-5
