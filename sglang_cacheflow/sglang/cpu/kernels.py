"""The ``sgl_kernel`` CPU ops SGLang's memory code calls on the CPU engine.

SGLang imports these at module level when ``SGLANG_USE_CPU_ENGINE=1``
(``kernels/ops/kvcache/cache_move.py``, ``srt/mem_cache/allocation.py``); the
CUDA/Triton functions they stand for are ``copy_all_layer_kv_cache_tiled`` and
``assign_req_to_token_pool``. Pure torch, same arguments, same effect.
"""

from __future__ import annotations

import torch

from sglang_cacheflow.sglang.cpu.memory import pointer_rows, pointers


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """For every buffer ``b``: rows ``tgt_loc`` of ``b`` = rows ``src_loc`` of ``b``.

    ``data_ptrs[b]`` is the base address of buffer ``b`` and ``strides[b]`` its row
    size in bytes (both the row stride and the copy width, as in the Triton
    kernel). All source rows are read before any target row is written, so
    overlapping ``src_loc`` / ``tgt_loc`` are safe.
    """
    if tgt_loc.numel() != src_loc.numel():
        raise ValueError("tgt_loc and src_loc must have the same length")
    if tgt_loc.numel() == 0:
        return
    src = src_loc.reshape(-1).to(torch.int64)
    tgt = tgt_loc.reshape(-1).to(torch.int64)
    rows = int(torch.maximum(src.max(), tgt.max())) + 1
    for address, stride in zip(pointers(data_ptrs), strides.tolist(), strict=True):
        view = pointer_rows(address, offset=0, stride=int(stride), width=int(stride), rows=rows)
        view.index_copy_(0, tgt, view.index_select(0, src))


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """``req_to_token[rpi[i], start[i]:end[i]]`` = the i-th run of ``out_cache_loc``.

    The runs are consecutive in ``out_cache_loc``: run i starts at the sum of
    ``end - start`` over runs ``0 .. i-1`` (as the Triton kernel computes it).
    """
    if req_to_token.shape[1] != pool_len:
        raise ValueError(f"pool_len {pool_len} != req_to_token width {req_to_token.shape[1]}")
    starts = start_offset.reshape(-1).tolist()
    ends = end_offset.reshape(-1).tolist()
    rows = req_pool_indices.reshape(-1).tolist()
    flat = out_cache_loc.reshape(-1)
    taken = 0
    for row, start, end in zip(rows, starts, ends, strict=True):
        length = int(end) - int(start)
        if length > 0:
            req_to_token[int(row), int(start) : int(end)] = flat[taken : taken + length].to(
                req_to_token.dtype
            )
        taken += length


KERNEL_FUNCTIONS = {
    fn.__name__: fn for fn in (copy_all_layer_kv_cache_cpu, assign_req_to_token_pool_cpu)
}
"""Top-level ``sgl_kernel`` names this module provides."""
