"""HiCache host <-> device KV transfers on CPU: the ``sgl_kernel.kvcacheio`` functions.

SGLang's host pools (``srt/mem_cache/pool_host/mha.py``, ``mla.py``) call these
by name; on CUDA they come from ``sgl_kernel.kvcacheio``, on CPU nothing binds
them. Each function here keeps the CUDA op's signature and semantics
(``sgl-kernel/csrc/kvcacheio/transfer.cu``): an *item* is one token's KV row of
one layer, ``item_size`` bytes; indices are token slots; an item whose source or
destination index is negative is skipped. Memory is addressed as the kernel
addresses it:

- layer first (``lf``): ``base + index * item_size`` in one layer's buffer;
- page first (``pf``): ``base + index * layout_dim + layer * item_size``, where
  ``layout_dim`` is one token's bytes over all layers;
- page head (``ph``): ``[page, head, page_size, layer, head_dim]``, one head at a
  time;
- ``*_layers`` arguments are ``uint64`` tables of per-layer base addresses;
- ``direct`` functions copy tensor slices (page first direct host buffers are
  ``[page, layer, page_size, ...]``).

The ``block_quota`` and ``num_warps_per_block`` launch parameters are accepted
and ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sglang_cacheflow.sglang.cpu.memory import pointer_rows, pointers, tensor_rows

_DEFAULT_BLOCK_QUOTA = 2
_DEFAULT_WARPS = 32

RowsFn = Callable[[int, int], torch.Tensor]
"""``rows_fn(layer, rows)``: the row view of one side of a transfer for one layer."""


def _check_indices(src_indices: torch.Tensor, dst_indices: torch.Tensor) -> None:
    if src_indices.dtype != torch.int64 or dst_indices.dtype != torch.int64:
        raise TypeError("source and destination indices must be int64")
    if src_indices.numel() != dst_indices.numel():
        raise ValueError("source and destination indices must have the same length")


def _live(
    src_indices: torch.Tensor, dst_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened index pairs with both sides non-negative (the kernel skips the rest)."""
    src = src_indices.reshape(-1)
    dst = dst_indices.reshape(-1)
    keep = (src >= 0) & (dst >= 0)
    if not bool(keep.all()):
        src, dst = src[keep], dst[keep]
    return src, dst


def _check_item_size(item_size: int) -> None:
    if item_size <= 0 or item_size % 8 != 0:
        raise ValueError(f"item byte size must be a positive multiple of 8, got {item_size}")


def _transfer_items(
    src_rows: RowsFn,
    dst_rows: RowsFn,
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    layers: range,
) -> None:
    """For every layer: ``dst_rows[dst_indices] = src_rows[src_indices]``, gathered first."""
    _check_indices(src_indices, dst_indices)
    src, dst = _live(src_indices, dst_indices)
    if src.numel() == 0:
        return
    src_n = int(src.max()) + 1
    dst_n = int(dst.max()) + 1
    for layer in layers:
        rows = src_rows(layer, src_n).index_select(0, src)
        dst_rows(layer, dst_n).index_copy_(0, dst, rows)


def _lf(tensor: torch.Tensor, item_size: int, layer_dim: int = 0) -> RowsFn:
    return lambda layer, rows: tensor_rows(
        tensor, offset=layer * layer_dim, stride=item_size, width=item_size, rows=rows
    )


def _pf(tensor: torch.Tensor, item_size: int, layout_dim: int) -> RowsFn:
    return lambda layer, rows: tensor_rows(
        tensor, offset=layer * item_size, stride=layout_dim, width=item_size, rows=rows
    )


def _lf_table(table: torch.Tensor, item_size: int, num_layers: int) -> RowsFn:
    addresses = pointers(table)
    if len(addresses) < num_layers:
        raise ValueError(f"pointer table has {len(addresses)} layers, expected {num_layers}")
    return lambda layer, rows: pointer_rows(
        addresses[layer], offset=0, stride=item_size, width=item_size, rows=rows
    )


# --- MHA, kernel io backend -------------------------------------------------------------


def transfer_kv_per_layer(
    src_k: torch.Tensor,
    dst_k: torch.Tensor,
    src_v: torch.Tensor,
    dst_v: torch.Tensor,
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    item_size: int,
    block_quota: int = _DEFAULT_BLOCK_QUOTA,
    num_warps_per_block: int = _DEFAULT_WARPS,
) -> None:
    """One layer, layer first on both sides."""
    _check_item_size(item_size)
    for src, dst in ((src_k, dst_k), (src_v, dst_v)):
        _transfer_items(
            _lf(src, item_size), _lf(dst, item_size), src_indices, dst_indices, range(1)
        )


def transfer_kv_per_layer_pf_lf(
    src_k: torch.Tensor,
    dst_k: torch.Tensor,
    src_v: torch.Tensor,
    dst_v: torch.Tensor,
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    layer_id: int,
    item_size: int,
    src_layout_dim: int,
    block_quota: int = _DEFAULT_BLOCK_QUOTA,
    num_warps_per_block: int = _DEFAULT_WARPS,
) -> None:
    """Layer ``layer_id`` of a page first source into a layer first destination."""
    _check_item_size(item_size)
    for src, dst in ((src_k, dst_k), (src_v, dst_v)):
        _transfer_items(
            _pf(src, item_size, src_layout_dim),
            _lf(dst, item_size),
            src_indices,
            dst_indices,
            range(layer_id, layer_id + 1),
        )


def transfer_kv_all_layer(
    src_k_layers: torch.Tensor,
    dst_k_layers: torch.Tensor,
    src_v_layers: torch.Tensor,
    dst_v_layers: torch.Tensor,
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    item_size: int,
    num_layers: int,
    block_quota: int = _DEFAULT_BLOCK_QUOTA,
    num_warps_per_block: int = _DEFAULT_WARPS,
) -> None:
    """All layers, layer first on both sides, through per-layer pointer tables."""
    _check_item_size(item_size)
    if src_k_layers.size(0) != num_layers:
        raise ValueError("number of layers in source k table does not match num_layers")
    for src, dst in ((src_k_layers, dst_k_layers), (src_v_layers, dst_v_layers)):
        _transfer_items(
            _lf_table(src, item_size, num_layers),
            _lf_table(dst, item_size, num_layers),
            src_indices,
            dst_indices,
            range(num_layers),
        )


def transfer_kv_all_layer_lf_pf(
    src_k_layers: torch.Tensor,
    dst_k: torch.Tensor,
    src_v_layers: torch.Tensor,
    dst_v: torch.Tensor,
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    item_size: int,
    dst_layout_dim: int,
    num_layers: int,
    block_quota: int = _DEFAULT_BLOCK_QUOTA,
    num_warps_per_block: int = _DEFAULT_WARPS,
) -> None:
    """All layers from layer first pointer tables into a page first destination."""
    _check_item_size(item_size)
    if src_k_layers.size(0) != num_layers:
        raise ValueError("number of layers in source k table does not match num_layers")
    for src, dst in ((src_k_layers, dst_k), (src_v_layers, dst_v)):
        _transfer_items(
            _lf_table(src, item_size, num_layers),
            _pf(dst, item_size, dst_layout_dim),
            src_indices,
            dst_indices,
            range(num_layers),
        )


# --- MHA, page head layout --------------------------------------------------------------


def _ph_row_index(indices: torch.Tensor, page_size: int, head_num: int) -> torch.Tensor:
    """Row of token ``index`` in a ``[page, head, page_size, ...]`` buffer cut into head rows."""
    return (indices // page_size) * page_size * head_num + indices % page_size


def _transfer_heads(
    src_rows: Callable[[int, int, int], torch.Tensor],
    dst_rows: Callable[[int, int, int], torch.Tensor],
    src_index: torch.Tensor,
    dst_index: torch.Tensor,
    layers: range,
    head_num: int,
) -> None:
    """Per layer and head: ``dst_rows[dst_index] = src_rows[src_index]``."""
    if src_index.numel() == 0:
        return
    src_n = int(src_index.max()) + 1
    dst_n = int(dst_index.max()) + 1
    for layer in layers:
        for head in range(head_num):
            rows = src_rows(layer, head, src_n).index_select(0, src_index)
            dst_rows(layer, head, dst_n).index_copy_(0, dst_index, rows)


def transfer_kv_per_layer_ph_lf(
    src_k: torch.Tensor,
    dst_k: torch.Tensor,
    src_v: torch.Tensor,
    dst_v: torch.Tensor,
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    layer_id: int,
    item_size: int,
    src_layout_dim: int,
    page_size: int,
    head_num: int,
    block_quota: int = _DEFAULT_BLOCK_QUOTA,
    num_warps_per_block: int = _DEFAULT_WARPS,
) -> None:
    """Layer ``layer_id`` of a page head source into a layer first destination."""
    _check_item_size(item_size)
    _check_indices(src_indices, dst_indices)
    src, dst = _live(src_indices, dst_indices)
    head_bytes = item_size // head_num
    head_stride = src_layout_dim // head_num
    for src_t, dst_t in ((src_k, dst_k), (src_v, dst_v)):
        _transfer_heads(
            lambda layer, head, rows, t=src_t: tensor_rows(
                t,
                offset=head * head_stride * page_size + layer * head_bytes,
                stride=head_stride,
                width=head_bytes,
                rows=rows,
            ),
            lambda layer, head, rows, t=dst_t: tensor_rows(
                t, offset=head * head_bytes, stride=item_size, width=head_bytes, rows=rows
            ),
            _ph_row_index(src, page_size, head_num),
            dst,
            range(layer_id, layer_id + 1),
            head_num,
        )


def transfer_kv_all_layer_lf_ph(
    src_k_layers: torch.Tensor,
    dst_k: torch.Tensor,
    src_v_layers: torch.Tensor,
    dst_v: torch.Tensor,
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    item_size: int,
    dst_layout_dim: int,
    num_layers: int,
    page_size: int,
    head_num: int,
    block_quota: int = _DEFAULT_BLOCK_QUOTA,
    num_warps_per_block: int = _DEFAULT_WARPS,
) -> None:
    """All layers from layer first pointer tables into a page head destination."""
    _check_item_size(item_size)
    if src_k_layers.size(0) != num_layers:
        raise ValueError("number of layers in source k table does not match num_layers")
    _check_indices(src_indices, dst_indices)
    src, dst = _live(src_indices, dst_indices)
    head_bytes = item_size // head_num
    head_stride = dst_layout_dim // head_num
    for table, dst_t in ((src_k_layers, dst_k), (src_v_layers, dst_v)):
        addresses = pointers(table)
        _transfer_heads(
            lambda layer, head, rows, a=addresses: pointer_rows(
                a[layer], offset=head * head_bytes, stride=item_size, width=head_bytes, rows=rows
            ),
            lambda layer, head, rows, t=dst_t: tensor_rows(
                t,
                offset=head * head_stride * page_size + layer * head_bytes,
                stride=head_stride,
                width=head_bytes,
                rows=rows,
            ),
            src,
            _ph_row_index(dst, page_size, head_num),
            range(num_layers),
            head_num,
        )


# --- MLA, kernel io backend -------------------------------------------------------------


def transfer_kv_per_layer_mla(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    item_size: int,
    block_quota: int = _DEFAULT_BLOCK_QUOTA,
    num_warps_per_block: int = _DEFAULT_WARPS,
) -> None:
    """One layer of the single MLA latent buffer, layer first on both sides."""
    _check_item_size(item_size)
    _transfer_items(_lf(src, item_size), _lf(dst, item_size), src_indices, dst_indices, range(1))


def transfer_kv_per_layer_mla_pf_lf(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    layer_id: int,
    item_size: int,
    src_layout_dim: int,
    block_quota: int = _DEFAULT_BLOCK_QUOTA,
    num_warps_per_block: int = _DEFAULT_WARPS,
) -> None:
    """Layer ``layer_id`` of a page first MLA source into a layer first destination."""
    _check_item_size(item_size)
    _transfer_items(
        _pf(src, item_size, src_layout_dim),
        _lf(dst, item_size),
        src_indices,
        dst_indices,
        range(layer_id, layer_id + 1),
    )


def transfer_kv_all_layer_mla(
    src_layers: torch.Tensor,
    dst_layers: torch.Tensor,
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    item_size: int,
    num_layers: int,
    block_quota: int = _DEFAULT_BLOCK_QUOTA,
    num_warps_per_block: int = _DEFAULT_WARPS,
) -> None:
    """All MLA layers, layer first on both sides, through pointer tables."""
    _check_item_size(item_size)
    if src_layers.size(0) != num_layers:
        raise ValueError("number of layers in source table does not match num_layers")
    _transfer_items(
        _lf_table(src_layers, item_size, num_layers),
        _lf_table(dst_layers, item_size, num_layers),
        src_indices,
        dst_indices,
        range(num_layers),
    )


def transfer_kv_all_layer_mla_lf_pf(
    src_layers: torch.Tensor,
    dst: torch.Tensor,
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    item_size: int,
    dst_layout_dim: int,
    num_layers: int,
    block_quota: int = _DEFAULT_BLOCK_QUOTA,
    num_warps_per_block: int = _DEFAULT_WARPS,
) -> None:
    """All MLA layers from layer first pointer tables into a page first destination."""
    _check_item_size(item_size)
    if src_layers.size(0) != num_layers:
        raise ValueError("number of layers in source table does not match num_layers")
    _transfer_items(
        _lf_table(src_layers, item_size, num_layers),
        _pf(dst, item_size, dst_layout_dim),
        src_indices,
        dst_indices,
        range(num_layers),
    )


# --- direct io backend ------------------------------------------------------------------


def _check_direct(src_indices: torch.Tensor, dst_indices: torch.Tensor, page_size: int) -> None:
    if src_indices.numel() != dst_indices.numel():
        raise ValueError("source and destination indices must have the same length")
    if page_size <= 0:
        raise ValueError("page size must be positive")
    if src_indices.numel() % page_size != 0:
        raise ValueError("source indices size must be divisible by page size")


def _copy_rows(
    src: torch.Tensor, dst: torch.Tensor, src_rows: torch.Tensor, dst_rows: torch.Tensor
) -> None:
    dst.index_copy_(0, dst_rows, src.index_select(0, src_rows).to(dst.dtype))


def transfer_kv_direct(
    src_layers: Sequence[torch.Tensor],
    dst_layers: Sequence[torch.Tensor],
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    page_size: int,
) -> None:
    """``dst_layers[j][dst_indices] = src_layers[j][src_indices]`` for every j (dim 0 rows).

    The CUDA op copies runs of consecutive indices as slices; for distinct
    destination rows that is the same as this gather and scatter.
    """
    if len(src_layers) != len(dst_layers):
        raise ValueError("source and destination layers must have the same number of layers")
    _check_direct(src_indices, dst_indices, page_size)
    src = src_indices.reshape(-1).to(torch.int64)
    dst = dst_indices.reshape(-1).to(torch.int64)
    if src.numel() == 0:
        return
    for src_t, dst_t in zip(src_layers, dst_layers, strict=True):
        _copy_rows(src_t, dst_t, src, dst)


def _page_rows(starts: torch.Tensor, page_size: int) -> torch.Tensor:
    """Token rows ``start .. start + page_size - 1`` of every page, flattened."""
    offsets = torch.arange(page_size, dtype=torch.int64, device=starts.device)
    return (starts.reshape(-1, 1) + offsets).reshape(-1)


def transfer_kv_per_layer_direct_pf_lf(
    src_ptrs: Sequence[torch.Tensor],
    dst_ptrs: Sequence[torch.Tensor],
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    layer_id: int,
    page_size: int,
) -> None:
    """Layer ``layer_id`` of page first direct host buffers into layer first tensors.

    ``src_ptrs`` holds ``[page, layer, page_size, ...]`` buffers (K and V, or the
    MLA buffer alone); ``dst_ptrs`` the per-layer device tensors (K layers then V
    layers). The first index of every page decides where the page goes.
    """
    _transfer_page_first_direct(
        src_ptrs, dst_ptrs, src_indices, dst_indices, layer_id, page_size, to_page_first=False
    )


def transfer_kv_all_layer_direct_lf_pf(
    src_ptrs: Sequence[torch.Tensor],
    dst_ptrs: Sequence[torch.Tensor],
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    page_size: int,
) -> None:
    """Every layer of layer first device tensors into page first direct host buffers."""
    _transfer_page_first_direct(
        src_ptrs, dst_ptrs, src_indices, dst_indices, 0, page_size, to_page_first=True
    )


def _transfer_page_first_direct(
    src_ptrs: Sequence[torch.Tensor],
    dst_ptrs: Sequence[torch.Tensor],
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    start_layer_id: int,
    page_size: int,
    *,
    to_page_first: bool,
) -> None:
    _check_direct(src_indices, dst_indices, page_size)
    src_first = src_indices.reshape(-1)[::page_size].to(torch.int64)
    dst_first = dst_indices.reshape(-1)[::page_size].to(torch.int64)
    if src_first.numel() == 0:
        return
    if to_page_first:
        is_mla = len(dst_ptrs) == 1
        num_layers = len(src_ptrs) if is_mla else len(src_ptrs) // 2
        token_rows = _page_rows(src_first, page_size)
        host_pages = dst_first // page_size
        for j in range(num_layers):
            pairs = [(src_ptrs[j], dst_ptrs[0])]
            if not is_mla:
                pairs.append((src_ptrs[j + num_layers], dst_ptrs[1]))
            for device_t, host_t in pairs:
                host_layer = host_t.select(1, start_layer_id + j)  # [page, page_size, ...]
                rows = device_t.index_select(0, token_rows).to(host_t.dtype)
                host_layer.index_copy_(0, host_pages, rows.view(-1, *host_layer.shape[1:]))
    else:
        is_mla = len(src_ptrs) == 1
        num_layers = len(dst_ptrs) if is_mla else len(dst_ptrs) // 2
        host_pages = src_first // page_size
        token_rows = _page_rows(dst_first, page_size)
        for j in range(num_layers):
            pairs = [(src_ptrs[0], dst_ptrs[j])]
            if not is_mla:
                pairs.append((src_ptrs[1], dst_ptrs[j + num_layers]))
            for host_t, device_t in pairs:
                pages = host_t.select(1, start_layer_id + j).index_select(0, host_pages)
                device_t.index_copy_(
                    0, token_rows, pages.reshape(-1, *device_t.shape[1:]).to(device_t.dtype)
                )


KVCACHEIO_FUNCTIONS: dict[str, Callable[..., None]] = {
    fn.__name__: fn
    for fn in (
        transfer_kv_per_layer,
        transfer_kv_per_layer_pf_lf,
        transfer_kv_per_layer_ph_lf,
        transfer_kv_all_layer,
        transfer_kv_all_layer_lf_pf,
        transfer_kv_all_layer_lf_ph,
        transfer_kv_per_layer_mla,
        transfer_kv_per_layer_mla_pf_lf,
        transfer_kv_all_layer_mla,
        transfer_kv_all_layer_mla_lf_pf,
        transfer_kv_direct,
        transfer_kv_per_layer_direct_pf_lf,
        transfer_kv_all_layer_direct_lf_pf,
    )
}
"""The ``sgl_kernel.kvcacheio`` names this module provides, by name."""
