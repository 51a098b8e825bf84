"""Run SGLang's own Triton kernels on CPU (Triton's interpreter) for the cross-check test.

``python tests/sglang/cpu/triton_reference.py OUT`` builds the cases of
:func:`cases`, runs the Triton originals of the CPU ops under
``TRITON_INTERPRET=1`` and saves every output tensor to ``OUT`` (``torch.save``).
It must run in its own interpreter: the variable has to be set before Triton is
imported, and SGLang must not be in CPU-engine mode there.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch


def cases() -> dict[str, dict[str, Any]]:
    """Inputs shared by both sides; tensors the kernels write are cloned by each side."""
    g = torch.Generator().manual_seed(0)
    buffers = [torch.randn(24, 2, 8, generator=g) for _ in range(4)]
    return {
        "assign_req_to_token_pool": {
            "req_pool_indices": torch.tensor([3, 0, 2], dtype=torch.int64),
            "req_to_token": torch.full((4, 48), -1, dtype=torch.int32),
            "start": torch.tensor([5, 0, 40], dtype=torch.int64),
            "end": torch.tensor([21, 3, 48], dtype=torch.int64),
            "out_cache_loc": torch.arange(1000, 1027, dtype=torch.int64),
        },
        "copy_all_layer_kv_cache": {
            "buffers": buffers,
            "tgt": torch.tensor([1, 2, 3, 9, 0], dtype=torch.int64),
            "src": torch.tensor([0, 1, 2, 20, 9], dtype=torch.int64),
        },
        "fill_bonus_tokens": {
            "accept_tokens": torch.randint(0, 500, (3, 5), generator=g),
            "accept_lens": torch.tensor([1, 5, 3], dtype=torch.int32),
        },
        "fill_accept_out_cache_loc": {
            "accept_index": torch.tensor([2, -1, 5, 6, -1, -1, 0, 7], dtype=torch.int32),
            "out_cache_loc": torch.arange(300, 308, dtype=torch.int64),
        },
        "rotate_input_ids": {
            "input_ids": torch.arange(100, 130, dtype=torch.int64),
            "extend_start_loc": torch.tensor([0, 7, 20], dtype=torch.int64),
            "extend_seq_lens": torch.tensor([7, 13, 1], dtype=torch.int64),
            "topk_index": torch.tensor([900, 901, 902], dtype=torch.int64),
        },
        "assign_extend_cache_locs": {
            "req_pool_indices": torch.tensor([1, 3], dtype=torch.int64),
            "req_to_token": torch.randint(0, 999, (4, 64), generator=g, dtype=torch.int64),
            "start": torch.tensor([10, 3], dtype=torch.int64),
            "end": torch.tensor([14, 7], dtype=torch.int64),
        },
        "assign_draft_cache_locs_contiguous": {
            "req_pool_indices": torch.tensor([2, 0], dtype=torch.int64),
            "req_to_token": torch.randint(0, 999, (3, 64), generator=g, dtype=torch.int32),
            "seq_lens": torch.tensor([17, 40], dtype=torch.int64),
            "topk": 2,
            "steps": 3,
        },
        "build_tree": {
            # topk 2, depth 3, 5 draft tokens; two requests (see test_speculative.py)
            "parent_list": torch.tensor([[-1, 0, 1, 2, 3], [-1, 0, 1, 2, 3]]),
            "selected_index": torch.tensor([[0, 1, 2, 6], [0, 1, 4, 5]]),
            "seq_lens": torch.tensor([7, 3]),
            "topk": 2,
            "depth": 3,
            "draft_token_num": 5,
        },
        "verify_tree_greedy": {
            "candidates": torch.tensor([[50, 11, 12, 13, 14], [60, 21, 22, 23, 24]]),
            "retrive_index": torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]),
            "retrive_next_token": torch.tensor([[1, 3, -1, 4, -1], [1, -1, 3, -1, -1]]),
            "retrive_next_sibling": torch.tensor([[-1, 2, -1, -1, -1], [-1, 2, -1, 4, -1]]),
            "target_predict": torch.tensor([[11, 13, 0, 99, 0], [22, 0, 24, 0, 77]]),
            "num_spec": 4,
        },
    }


def tree_buffers(case: dict[str, Any], mode: int) -> dict[str, torch.Tensor]:
    """Fresh output buffers of the tree builder for ``mode`` (0 full mask, 1 qlen only)."""
    bs, n = case["seq_lens"].numel(), case["draft_token_num"]
    size = int(case["seq_lens"].sum()) * n + bs * n * n if mode == 0 else bs * n * n
    return {
        "tree_mask": torch.ones(size, dtype=torch.bool),
        "positions": torch.zeros(bs * n, dtype=torch.int64),
        "retrive_index": torch.zeros(bs, n, dtype=torch.int64),
        "retrive_next_token": torch.full((bs, n), -1, dtype=torch.int64),
        "retrive_next_sibling": torch.full((bs, n), -1, dtype=torch.int64),
    }


def verify_buffers(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    bs, n = case["candidates"].shape
    return {
        "predicts": torch.full((bs * n,), -1, dtype=torch.int32),
        "accept_index": torch.full((bs, case["num_spec"]), -1, dtype=torch.int32),
        "accept_token_num": torch.zeros(bs, dtype=torch.int32),
    }


def _run_triton() -> dict[str, Any]:
    from sglang.kernels.ops.kvcache.cache_move import copy_all_layer_kv_cache_tiled
    from sglang.kernels.ops.speculative.cache_locs import (
        assign_draft_cache_locs_contiguous,
        assign_extend_cache_locs,
    )
    from sglang.kernels.ops.speculative.eagle import (
        fill_accept_out_cache_loc,
        fill_bonus_tokens,
    )
    from sglang.kernels.ops.speculative.multi_layer_eagle import rotate_input_ids_kernel
    from sglang.kernels.ops.speculative.spec_tree import (
        sgl_build_tree_kernel_triton,
        verify_tree_greedy_triton,
    )
    from sglang.srt.mem_cache.allocation import assign_req_to_token_pool
    from sglang.srt.utils import next_power_of_2

    c = cases()
    out: dict[str, Any] = {}

    a = c["assign_req_to_token_pool"]
    r2t = a["req_to_token"].clone()
    bs = a["req_pool_indices"].numel()
    assign_req_to_token_pool[(bs,)](
        a["req_pool_indices"], r2t, a["start"], a["end"], a["out_cache_loc"],
        r2t.shape[1], next_power_of_2(bs),
    )  # fmt: skip
    out["assign_req_to_token_pool"] = r2t

    k = c["copy_all_layer_kv_cache"]
    bufs = [b.clone() for b in k["buffers"]]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in bufs])
    n = k["tgt"].numel()
    copy_all_layer_kv_cache_tiled[(len(bufs), 1)](
        ptrs, strides, k["tgt"], k["src"], n, next_power_of_2(n), BYTES_PER_TILE=64
    )
    out["copy_all_layer_kv_cache"] = bufs

    f = c["fill_bonus_tokens"]
    bonus = torch.zeros(3, dtype=torch.int64)
    width = f["accept_tokens"].shape[1]
    fill_bonus_tokens[(3,)](f["accept_tokens"], f["accept_lens"], bonus, width)
    out["fill_bonus_tokens"] = bonus

    f = c["fill_accept_out_cache_loc"]
    packed = torch.full((8,), -5, dtype=torch.int64)
    fill_accept_out_cache_loc[(8,)](f["accept_index"], f["out_cache_loc"], packed, 8)
    out["fill_accept_out_cache_loc"] = packed

    r = c["rotate_input_ids"]
    ids = r["input_ids"].clone()
    rotate_input_ids_kernel[(3,)](
        ids, r["extend_start_loc"], r["extend_seq_lens"], r["topk_index"], None, BLOCK_SIZE=8
    )
    out["rotate_input_ids"] = ids

    e = c["assign_extend_cache_locs"]
    locs = torch.empty(8, dtype=torch.int64)
    assign_extend_cache_locs[(2,)](
        e["req_pool_indices"], e["req_to_token"], e["start"], e["end"], locs,
        e["req_to_token"].shape[1], next_power_of_2(2),
    )  # fmt: skip
    out["assign_extend_cache_locs"] = locs

    d = c["assign_draft_cache_locs_contiguous"]
    draft = torch.zeros(2 * d["topk"] * d["steps"], dtype=torch.int64)
    assign_draft_cache_locs_contiguous[(2,)](
        d["req_pool_indices"], d["req_to_token"], d["seq_lens"], draft,
        d["req_to_token"].shape[1], d["topk"], d["steps"], BS=2,
    )  # fmt: skip
    out["assign_draft_cache_locs_contiguous"] = draft

    t = c["build_tree"]
    for mode in (0, 1):
        bufs_t = tree_buffers(t, mode)
        sgl_build_tree_kernel_triton(
            t["parent_list"], t["selected_index"], t["seq_lens"], bufs_t["tree_mask"],
            bufs_t["positions"], bufs_t["retrive_index"], bufs_t["retrive_next_token"],
            bufs_t["retrive_next_sibling"], t["topk"], t["depth"], t["draft_token_num"], mode,
        )  # fmt: skip
        out[f"build_tree_{mode}"] = bufs_t

    v = c["verify_tree_greedy"]
    vb = verify_buffers(v)
    verify_tree_greedy_triton(
        predicts=vb["predicts"], accept_index=vb["accept_index"],
        accept_token_num=vb["accept_token_num"], candidates=v["candidates"],
        retrieve_index=v["retrive_index"], retrieve_next_token=v["retrive_next_token"],
        retrieve_next_sibling=v["retrive_next_sibling"], target_predict=v["target_predict"],
    )  # fmt: skip
    out["verify_tree_greedy"] = vb
    return out


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("SGLANG_USE_CPU_ENGINE"):
        raise SystemExit("run with TRITON_INTERPRET=1 and without SGLANG_USE_CPU_ENGINE")
    torch.save(_run_triton(), sys.argv[1])
