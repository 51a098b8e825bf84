"""The CPU ops agree with SGLang's own Triton kernels, run by Triton's CPU interpreter.

A second, independent reference next to the plain-indexing tests: the Triton
originals (``assign_req_to_token_pool``, ``copy_all_layer_kv_cache_tiled``, the
EAGLE tree, verify, cache-location and rotation kernels) run in a separate
interpreter with ``TRITON_INTERPRET=1`` (``triton_reference.py``) on the same
inputs, and every output must be equal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sglang_cacheflow.sglang.cpu import kernels, speculative
from tests.sglang.cpu import triton_reference as ref

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def triton_out(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("triton") / "out.pt"
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_USE_CPU_ENGINE"}
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run(
        [sys.executable, str(Path(ref.__file__)), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


def test_assign_req_to_token_pool(triton_out: dict[str, Any]) -> None:
    a = ref.cases()["assign_req_to_token_pool"]
    r2t = a["req_to_token"].clone()
    kernels.assign_req_to_token_pool_cpu(
        a["req_pool_indices"], r2t, a["start"], a["end"], a["out_cache_loc"], r2t.shape[1]
    )
    assert torch.equal(r2t, triton_out["assign_req_to_token_pool"])


def test_copy_all_layer_kv_cache(triton_out: dict[str, Any]) -> None:
    k = ref.cases()["copy_all_layer_kv_cache"]
    bufs = [b.clone() for b in k["buffers"]]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in bufs])
    kernels.copy_all_layer_kv_cache_cpu(ptrs, strides, k["tgt"], k["src"])
    for mine, theirs in zip(bufs, triton_out["copy_all_layer_kv_cache"], strict=True):
        assert torch.equal(mine, theirs)


def test_eagle_small_ops(triton_out: dict[str, Any]) -> None:
    c = ref.cases()
    f = c["fill_bonus_tokens"]
    bonus = torch.zeros(3, dtype=torch.int64)
    speculative.fill_bonus_tokens_cpu(
        f["accept_tokens"], f["accept_lens"], bonus, f["accept_tokens"].shape[1]
    )
    assert torch.equal(bonus, triton_out["fill_bonus_tokens"])

    f = c["fill_accept_out_cache_loc"]
    packed = torch.full((8,), -5, dtype=torch.int64)
    speculative.fill_accept_out_cache_loc_cpu(f["accept_index"], f["out_cache_loc"], packed)
    assert torch.equal(packed, triton_out["fill_accept_out_cache_loc"])

    r = c["rotate_input_ids"]
    ids = r["input_ids"].clone()
    speculative.rotate_input_ids_cpu(
        ids, r["extend_start_loc"], r["extend_seq_lens"], r["topk_index"]
    )
    assert torch.equal(ids, triton_out["rotate_input_ids"])

    e = c["assign_extend_cache_locs"]
    locs = torch.empty(8, dtype=torch.int64)
    speculative.assign_extend_cache_locs_cpu(
        e["req_pool_indices"], e["req_to_token"], e["start"], e["end"], locs, 64
    )
    assert torch.equal(locs, triton_out["assign_extend_cache_locs"])

    d = c["assign_draft_cache_locs_contiguous"]
    draft = torch.zeros(2 * d["topk"] * d["steps"], dtype=torch.int64)
    speculative.assign_draft_cache_locs_contiguous_cpu(
        d["req_pool_indices"], d["req_to_token"], d["seq_lens"], draft, 64, d["topk"], d["steps"]
    )
    assert torch.equal(draft, triton_out["assign_draft_cache_locs_contiguous"])


@pytest.mark.parametrize("mode", [speculative.FULL_MASK, speculative.QLEN_ONLY])
def test_build_tree(triton_out: dict[str, Any], mode: int) -> None:
    t = ref.cases()["build_tree"]
    bufs = ref.tree_buffers(t, mode)
    speculative.build_tree_kernel_efficient_cpu(
        t["parent_list"], t["selected_index"], t["seq_lens"], bufs["tree_mask"],
        bufs["positions"], bufs["retrive_index"], bufs["retrive_next_token"],
        bufs["retrive_next_sibling"], t["topk"], t["depth"], t["draft_token_num"], mode,
    )  # fmt: skip
    for name, tensor in bufs.items():
        assert torch.equal(tensor, triton_out[f"build_tree_{mode}"][name]), name


def test_verify_tree_greedy(triton_out: dict[str, Any]) -> None:
    v = ref.cases()["verify_tree_greedy"]
    bufs = ref.verify_buffers(v)
    speculative.verify_tree_greedy_cpu(
        predicts=bufs["predicts"], accept_index=bufs["accept_index"],
        accept_token_num=bufs["accept_token_num"], candidates=v["candidates"],
        retrive_index=v["retrive_index"], retrive_next_token=v["retrive_next_token"],
        retrive_next_sibling=v["retrive_next_sibling"], target_predict=v["target_predict"],
    )  # fmt: skip
    for name, tensor in bufs.items():
        assert torch.equal(tensor, triton_out["verify_tree_greedy"][name]), name
