"""The ``sgl_kernel`` KV-pool ops vs references computed by plain tensor indexing."""

from __future__ import annotations

import pytest
import torch

from sglang_cacheflow.sglang.cpu.kernels import (
    assign_req_to_token_pool_cpu,
    copy_all_layer_kv_cache_cpu,
)


def _pool(seed: int) -> list[torch.Tensor]:
    """Per-layer K then V buffers of a small KV pool: [slots, heads, dim] each."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 2, 4, generator=g).to(torch.bfloat16) for _ in range(6)]


def _table(buffers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``data_ptrs`` and ``data_strides`` as MHATokenToKVPool builds them."""
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.dtype.itemsize for b in buffers])
    return ptrs, strides


@pytest.mark.parametrize(
    ("tgt", "src"),
    [
        ([5, 6, 7], [0, 1, 2]),  # disjoint
        ([1, 2, 3, 4], [0, 1, 2, 3]),  # overlapping: a shift by one slot
        ([0, 1], [1, 0]),  # a swap
        ([], []),
    ],
)
def test_copy_all_layer_kv_cache_gathers_first(tgt: list[int], src: list[int]) -> None:
    buffers = _pool(0)
    before = [b.clone() for b in buffers]
    tgt_t, src_t = torch.tensor(tgt, dtype=torch.int64), torch.tensor(src, dtype=torch.int64)
    copy_all_layer_kv_cache_cpu(*_table(buffers), tgt_t, src_t)
    for buffer, old in zip(buffers, before, strict=True):
        expected = old.clone()
        expected[tgt_t] = old[src_t]
        assert torch.equal(buffer, expected)


def test_copy_all_layer_kv_cache_length_mismatch() -> None:
    buffers = _pool(1)
    with pytest.raises(ValueError, match="same length"):
        copy_all_layer_kv_cache_cpu(*_table(buffers), torch.tensor([1]), torch.tensor([1, 2]))


def test_assign_req_to_token_pool() -> None:
    req_to_token = torch.full((4, 32), -7, dtype=torch.int32)
    req_pool_indices = torch.tensor([2, 0, 3], dtype=torch.int64)
    start = torch.tensor([5, 0, 9], dtype=torch.int64)
    end = torch.tensor([9, 3, 9], dtype=torch.int64)  # the last run is empty
    out_cache_loc = torch.arange(100, 107, dtype=torch.int64)
    expected = req_to_token.clone()
    expected[2, 5:9] = torch.tensor([100, 101, 102, 103], dtype=torch.int32)
    expected[0, 0:3] = torch.tensor([104, 105, 106], dtype=torch.int32)

    assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end, out_cache_loc, 32)
    assert torch.equal(req_to_token, expected)
    with pytest.raises(ValueError, match="pool_len"):
        assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end, out_cache_loc, 8)
