"""HiCache transfer functions vs references computed by plain tensor indexing.

The buffers have the shapes SGLang's CPU device pool and host pools give them
(``srt/mem_cache/pool_host/mha.py``: ``init_kv_buffer``), and the arguments are
the ones the pools pass (item size = one token's bytes in one layer, layout dim =
one token's bytes over all layers, pointer tables of ``data_ptr()``).
"""

from __future__ import annotations

import pytest
import torch

from sglang_cacheflow.sglang.cpu import transfer

LAYERS, HEADS, DIM = 3, 2, 8
DEVICE_SIZE, HOST_SIZE = 40, 64


def _device(dtype: torch.dtype, seed: int, heads: int = HEADS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(DEVICE_SIZE, heads, DIM, generator=g).to(dtype) for _ in range(LAYERS)]


def _ptrs(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.uint64)


def _indices(n: int, high: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(high, generator=g)[:n].to(torch.int64)


def _item_size(dtype: torch.dtype, heads: int = HEADS) -> int:
    return heads * DIM * torch.empty(0, dtype=dtype).element_size()


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_first_round_trip(dtype: torch.dtype) -> None:
    dev_k, dev_v = _device(dtype, 0), _device(dtype, 1)
    host = torch.zeros(2, LAYERS, HOST_SIZE, HEADS, DIM, dtype=dtype)
    dev_idx, host_idx = _indices(12, DEVICE_SIZE, 2), _indices(12, HOST_SIZE, 3)
    item = _item_size(dtype)

    transfer.transfer_kv_all_layer(
        _ptrs(dev_k),
        _ptrs([host[0, i] for i in range(LAYERS)]),
        _ptrs(dev_v),
        _ptrs([host[1, i] for i in range(LAYERS)]),
        dev_idx,
        host_idx,
        item,
        LAYERS,
    )
    for layer in range(LAYERS):
        assert torch.equal(host[0, layer][host_idx], dev_k[layer][dev_idx])
        assert torch.equal(host[1, layer][host_idx], dev_v[layer][dev_idx])
    untouched = torch.ones(HOST_SIZE, dtype=torch.bool)
    untouched[host_idx] = False
    assert not host[:, :, untouched].any()

    back_k = [torch.zeros_like(t) for t in dev_k]
    back_v = [torch.zeros_like(t) for t in dev_v]
    new_dev_idx = _indices(12, DEVICE_SIZE, 4)
    for layer in range(LAYERS):
        transfer.transfer_kv_per_layer(
            host[0, layer], back_k[layer], host[1, layer], back_v[layer],
            host_idx, new_dev_idx, item,
        )  # fmt: skip
        assert torch.equal(back_k[layer][new_dev_idx], dev_k[layer][dev_idx])
        assert torch.equal(back_v[layer][new_dev_idx], dev_v[layer][dev_idx])


@pytest.mark.parametrize("dtype", DTYPES)
def test_page_first_round_trip(dtype: torch.dtype) -> None:
    dev_k, dev_v = _device(dtype, 5), _device(dtype, 6)
    host = torch.zeros(2, HOST_SIZE, LAYERS, HEADS, DIM, dtype=dtype)
    item = _item_size(dtype)
    layout_dim = item * LAYERS
    dev_idx, host_idx = _indices(9, DEVICE_SIZE, 7), _indices(9, HOST_SIZE, 8)

    transfer.transfer_kv_all_layer_lf_pf(
        _ptrs(dev_k), host[0], _ptrs(dev_v), host[1], dev_idx, host_idx, item, layout_dim, LAYERS
    )
    for layer in range(LAYERS):
        assert torch.equal(host[0, host_idx, layer], dev_k[layer][dev_idx])
        assert torch.equal(host[1, host_idx, layer], dev_v[layer][dev_idx])

    for layer in range(LAYERS):
        out_k, out_v = torch.zeros_like(dev_k[layer]), torch.zeros_like(dev_v[layer])
        dst = _indices(9, DEVICE_SIZE, 9 + layer)
        transfer.transfer_kv_per_layer_pf_lf(
            host[0], out_k, host[1], out_v, host_idx, dst, layer, item, layout_dim
        )
        assert torch.equal(out_k[dst], host[0, host_idx, layer])
        assert torch.equal(out_v[dst], host[1, host_idx, layer])
        rest = torch.ones(DEVICE_SIZE, dtype=torch.bool)
        rest[dst] = False
        assert not out_k[rest].any() and not out_v[rest].any()


@pytest.mark.parametrize("page_size", [1, 4])
def test_page_head_round_trip(page_size: int) -> None:
    dtype = torch.bfloat16
    dev_k, dev_v = _device(dtype, 10), _device(dtype, 11)
    pages = HOST_SIZE // page_size
    # [2, page, head, page_size, layer, dim] (init_kv_buffer's page_head dims)
    host = torch.zeros(2, pages, HEADS, page_size, LAYERS, DIM, dtype=dtype)
    item = _item_size(dtype)
    layout_dim = item * LAYERS
    dev_idx, host_idx = _indices(8, DEVICE_SIZE, 12), _indices(8, HOST_SIZE, 13)

    transfer.transfer_kv_all_layer_lf_ph(
        _ptrs(dev_k), host[0], _ptrs(dev_v), host[1], dev_idx, host_idx,
        item, layout_dim, LAYERS, page_size, HEADS,
    )  # fmt: skip
    page, slot = host_idx // page_size, host_idx % page_size
    for layer in range(LAYERS):
        for head in range(HEADS):
            assert torch.equal(host[0, page, head, slot, layer], dev_k[layer][dev_idx, head])
            assert torch.equal(host[1, page, head, slot, layer], dev_v[layer][dev_idx, head])

    layer = 1
    out_k, out_v = torch.zeros_like(dev_k[layer]), torch.zeros_like(dev_v[layer])
    transfer.transfer_kv_per_layer_ph_lf(
        host[0], out_k, host[1], out_v, host_idx, dev_idx, layer, item, layout_dim,
        page_size, HEADS,
    )  # fmt: skip
    assert torch.equal(out_k[dev_idx], dev_k[layer][dev_idx])
    assert torch.equal(out_v[dev_idx], dev_v[layer][dev_idx])


def test_negative_indices_are_skipped() -> None:
    dtype = torch.float32
    src, dst = torch.randn(10, HEADS, DIM), torch.zeros(10, HEADS, DIM)
    src_idx = torch.tensor([0, -1, 2, 3], dtype=torch.int64)
    dst_idx = torch.tensor([5, 6, -1, 7], dtype=torch.int64)
    transfer.transfer_kv_per_layer_mla(src, dst, src_idx, dst_idx, _item_size(dtype))
    assert torch.equal(dst[5], src[0]) and torch.equal(dst[7], src[3])
    assert not dst[[0, 1, 2, 3, 4, 6, 8, 9]].any()


def test_argument_checks() -> None:
    a, b = torch.zeros(4, HEADS, DIM), torch.zeros(4, HEADS, DIM)
    idx = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="multiple of 8"):
        transfer.transfer_kv_per_layer_mla(a, b, idx, idx, 12)
    with pytest.raises(TypeError, match="int64"):
        transfer.transfer_kv_per_layer_mla(a, b, idx.int(), idx.int(), 64)
    with pytest.raises(ValueError, match="same length"):
        transfer.transfer_kv_per_layer_mla(a, b, idx, idx[:1], 64)
    with pytest.raises(IndexError, match="outside"):
        transfer.transfer_kv_per_layer_mla(a, b, torch.tensor([9]), torch.tensor([0]), 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mla_forms(dtype: torch.dtype) -> None:
    latent = 24  # kv_lora_rank + rope dim, one "head"
    g = torch.Generator().manual_seed(14)
    dev = [torch.randn(DEVICE_SIZE, 1, latent, generator=g).to(dtype) for _ in range(LAYERS)]
    item = latent * torch.empty(0, dtype=dtype).element_size()
    dev_idx, host_idx = _indices(10, DEVICE_SIZE, 15), _indices(10, HOST_SIZE, 16)

    lf_host = torch.zeros(LAYERS, HOST_SIZE, 1, latent, dtype=dtype)
    transfer.transfer_kv_all_layer_mla(
        _ptrs(dev), _ptrs([lf_host[i] for i in range(LAYERS)]), dev_idx, host_idx, item, LAYERS
    )
    pf_host = torch.zeros(HOST_SIZE, LAYERS, 1, latent, dtype=dtype)
    transfer.transfer_kv_all_layer_mla_lf_pf(
        _ptrs(dev), pf_host, dev_idx, host_idx, item, item * LAYERS, LAYERS
    )
    for layer in range(LAYERS):
        assert torch.equal(lf_host[layer][host_idx], dev[layer][dev_idx])
        assert torch.equal(pf_host[host_idx, layer], dev[layer][dev_idx])
        out_lf, out_pf = torch.zeros_like(dev[layer]), torch.zeros_like(dev[layer])
        transfer.transfer_kv_per_layer_mla(lf_host[layer], out_lf, host_idx, dev_idx, item)
        transfer.transfer_kv_per_layer_mla_pf_lf(
            pf_host, out_pf, host_idx, dev_idx, layer, item, item * LAYERS
        )
        assert torch.equal(out_lf[dev_idx], dev[layer][dev_idx])
        assert torch.equal(out_pf[dev_idx], dev[layer][dev_idx])


def test_direct_layer_first() -> None:
    dev_k, dev_v = _device(torch.bfloat16, 17), _device(torch.bfloat16, 18)
    host = torch.zeros(2, LAYERS, HOST_SIZE, HEADS, DIM, dtype=torch.bfloat16)
    host_refs = [host[0, i] for i in range(LAYERS)] + [host[1, i] for i in range(LAYERS)]
    # Runs of consecutive slots, as the radix tree hands them out.
    dev_idx = torch.tensor([3, 4, 5, 6, 20, 21, 30, 31], dtype=torch.int64)
    host_idx = torch.tensor([10, 11, 12, 13, 14, 15, 40, 41], dtype=torch.int64)
    transfer.transfer_kv_direct(dev_k + dev_v, host_refs, dev_idx, host_idx, page_size=2)
    for layer in range(LAYERS):
        assert torch.equal(host[0, layer][host_idx], dev_k[layer][dev_idx])
        assert torch.equal(host[1, layer][host_idx], dev_v[layer][dev_idx])
    with pytest.raises(ValueError, match="divisible by page size"):
        transfer.transfer_kv_direct(dev_k, host_refs[:LAYERS], dev_idx[:3], host_idx[:3], 2)


@pytest.mark.parametrize("mla", [False, True])
def test_page_first_direct_round_trip(mla: bool) -> None:
    page_size, dtype = 4, torch.float16
    heads = 1 if mla else HEADS
    dev_k = _device(dtype, 19, heads)
    dev_v = [] if mla else _device(dtype, 20, heads)
    pages = HOST_SIZE // page_size
    # [page, layer, page_size, head, dim] per component (page_first_direct dims)
    host = [torch.zeros(pages, LAYERS, page_size, heads, DIM, dtype=dtype)]
    if not mla:
        host.append(torch.zeros_like(host[0]))
    dev_pages = torch.tensor([1, 7, 3], dtype=torch.int64)
    host_pages = torch.tensor([10, 2, 5], dtype=torch.int64)
    offsets = torch.arange(page_size)
    dev_idx = (dev_pages[:, None] * page_size + offsets).reshape(-1)
    host_idx = (host_pages[:, None] * page_size + offsets).reshape(-1)

    transfer.transfer_kv_all_layer_direct_lf_pf(dev_k + dev_v, host, dev_idx, host_idx, page_size)
    for layer in range(LAYERS):
        expect = dev_k[layer][dev_idx].view(len(host_pages), page_size, heads, DIM)
        assert torch.equal(host[0][host_pages, layer], expect)
        if not mla:
            expect_v = dev_v[layer][dev_idx].view(len(host_pages), page_size, heads, DIM)
            assert torch.equal(host[1][host_pages, layer], expect_v)

    new_pages = torch.tensor([0, 9, 4], dtype=torch.int64)
    new_idx = (new_pages[:, None] * page_size + offsets).reshape(-1)
    for layer in range(LAYERS):
        out = [torch.zeros_like(dev_k[layer])]
        if not mla:
            out.append(torch.zeros_like(dev_v[layer]))
        transfer.transfer_kv_per_layer_direct_pf_lf(host, out, host_idx, new_idx, layer, page_size)
        assert torch.equal(out[0][new_idx], dev_k[layer][dev_idx])
        if not mla:
            assert torch.equal(out[1][new_idx], dev_v[layer][dev_idx])


def test_every_kvcacheio_name_sglang_binds_is_provided() -> None:
    names = {
        "transfer_kv_all_layer", "transfer_kv_all_layer_direct_lf_pf",
        "transfer_kv_all_layer_lf_pf", "transfer_kv_all_layer_lf_ph",
        "transfer_kv_all_layer_mla", "transfer_kv_all_layer_mla_lf_pf", "transfer_kv_direct",
        "transfer_kv_per_layer", "transfer_kv_per_layer_direct_pf_lf",
        "transfer_kv_per_layer_mla", "transfer_kv_per_layer_mla_pf_lf",
        "transfer_kv_per_layer_pf_lf", "transfer_kv_per_layer_ph_lf",
    }  # fmt: skip
    assert names <= set(transfer.KVCACHEIO_FUNCTIONS)
