"""The ``sgl_kernel`` CPU ops of SGLang's speculative decoding (EAGLE).

The scheduler imports them at module level on the CPU engine
(``kernels/ops/speculative/{spec_tree,cache_locs,eagle,multi_layer_eagle}.py``).
Each follows the CUDA kernel (``jit/include/sgl_kernel/speculative/eagle.cuh``)
or the Triton kernel next to the caller, element for element; they are written
as plain loops over the batch because the batch and the draft tree are small.
"""

from __future__ import annotations

import torch

FULL_MASK = 0
QLEN_ONLY = 1
QLEN_ONLY_BITPACKING = 2


def _find(selected: list[int], value: int) -> int:
    """Position of ``value`` in ``selected``, or ``len(selected)`` when absent."""
    for pos, item in enumerate(selected):
        if item == value:
            return pos
    return len(selected)


def build_tree_kernel_efficient_cpu(
    parent_list: torch.Tensor,
    selected_index: torch.Tensor,
    verified_seq_len: torch.Tensor,
    tree_mask: torch.Tensor,
    positions: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    topk: int,
    depth: int,
    draft_token_num: int,
    tree_mask_mode: int,
) -> None:
    """Build the EAGLE draft tree: mask, positions and retrieval links, in place.

    ``parent_list`` [bs, topk * (depth - 1) + 1], ``selected_index``
    [bs, draft_token_num - 1], ``verified_seq_len`` [bs]. ``tree_mask`` is flat:
    FULL_MASK rows span ``seq_len + draft_token_num`` columns per request (the
    prefix columns are left as the caller set them), QLEN_ONLY rows
    ``draft_token_num`` columns, QLEN_ONLY_BITPACKING rows 1, 2 or 4 bytes of bits.
    ``retrive_next_token`` / ``retrive_next_sibling`` must come in filled with -1.
    """
    if tree_mask_mode not in (FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING):
        raise ValueError(f"unknown tree mask mode {tree_mask_mode}")
    bs = verified_seq_len.shape[0]
    n = draft_token_num
    seq_lens = [int(x) for x in verified_seq_len.tolist()]
    parents = parent_list.reshape(bs, -1).tolist() if bs else []
    selected_rows = selected_index.reshape(bs, -1).tolist() if bs else []
    mask = tree_mask.reshape(-1)
    if tree_mask_mode == QLEN_ONLY_BITPACKING:
        if n > 32:
            raise ValueError("bit-packed tree masks hold at most 32 draft tokens")
        bytes_per_item = 4 if n > 16 else (2 if n > 8 else 1)
        mask_bytes = mask.view(torch.uint8)
    pos_flat = positions.reshape(-1)
    r_index = retrive_index.reshape(bs, n)
    r_next = retrive_next_token.reshape(bs, n)
    r_sibling = retrive_next_sibling.reshape(bs, n)

    seq_tree_idx = 0
    for bid in range(bs):
        seq_len = seq_lens[bid]
        selected = selected_rows[bid]
        parent = parents[bid]

        # Thread 0 of the CUDA block: retrieval links.
        pos_flat[bid * n] = seq_len
        next_row = r_next[bid].tolist()
        sibling_row = r_sibling[bid].tolist()
        for i in range(n - 1, 0, -1):
            r_index[bid, i] = bid * n + i
            parent_tb_idx = selected[i - 1] // topk
            parent_position = 0
            if parent_tb_idx > 0:
                parent_token_idx = parent[parent_tb_idx]
                found = _find(selected[: n - 1], parent_token_idx)
                parent_position = found + 1 if found < n - 1 else n
            if parent_position == n:
                continue  # a token whose parent was not selected is ignored
            if next_row[parent_position] != -1:
                sibling_row[i] = next_row[parent_position]
            next_row[parent_position] = i
        r_index[bid, 0] = bid * n
        r_next[bid] = torch.tensor(next_row, dtype=r_next.dtype)
        r_sibling[bid] = torch.tensor(sibling_row, dtype=r_sibling.dtype)

        # Threads 0 .. n-1: one mask row and position per draft token.
        for tid in range(n):
            if tree_mask_mode == QLEN_ONLY_BITPACKING:
                base = (bid * n + tid) * bytes_per_item
                mask_bytes[base] = 1
            elif tree_mask_mode == FULL_MASK:
                row = seq_tree_idx + (seq_len + n) * tid + seq_len + 1
                mask[row - 1] = True
                mask[row : row + n - 1] = False
            else:
                row = n * n * bid + n * tid + 1
                mask[row - 1] = True
                mask[row : row + n - 1] = False
            if tid == 0:
                continue
            position = 0
            cur = tid - 1
            while cur < n - 1:
                position += 1
                if tree_mask_mode == QLEN_ONLY_BITPACKING:
                    byte = base + (cur + 1) // 8
                    mask_bytes[byte] = int(mask_bytes[byte]) | (1 << ((cur + 1) % 8))
                else:
                    mask[row + cur] = True
                parent_tb_idx = selected[cur] // topk
                if parent_tb_idx == 0:
                    break
                cur = _find(selected[: n - 1], parent[parent_tb_idx])
            pos_flat[bid * n + tid] = position + seq_len
        seq_tree_idx += n * n + seq_len * n


def verify_tree_greedy_cpu(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
) -> None:
    """Greedy verification of a draft tree against the target's predictions, in place.

    Walks from the root: at each level take the first child (then its siblings)
    whose draft token equals the target's prediction at the last accepted node.
    ``predicts`` and ``target_predict`` are indexed by the flat retrieve index.
    """
    bs = candidates.shape[0]
    num_spec = accept_index.shape[1]
    cand = candidates.tolist()
    r_index = retrive_index.tolist()
    r_next = retrive_next_token.tolist()
    r_sibling = retrive_next_sibling.tolist()
    target = target_predict.reshape(-1).tolist()
    pred = predicts.reshape(-1)
    for bx in range(bs):
        last = r_index[bx][0]
        accept_index[bx, 0] = last
        accepted = 0
        cur = 0
        for _ in range(1, num_spec):
            cur = r_next[bx][cur]
            while cur != -1:
                draft_index = r_index[bx][cur]
                if cand[bx][cur] == target[last]:
                    pred[last] = target[last]
                    accepted += 1
                    accept_index[bx, accepted] = draft_index
                    last = draft_index
                    break
                cur = r_sibling[bx][cur]
            if cur == -1:
                break
        accept_token_num[bx] = accepted
        pred[last] = target[last]


def assign_draft_cache_locs_contiguous_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
    topk: int,
    speculative_num_steps: int,
) -> None:
    """``out_cache_loc[i*c : (i+1)*c] = req_to_token[rpi[i], seq_lens[i] : seq_lens[i]+c]``.

    ``c = topk * speculative_num_steps``: the slots already reserved for request
    i's draft tokens, copied out in request order.
    """
    if req_to_token.shape[1] != pool_len:
        raise ValueError(f"pool_len {pool_len} != req_to_token width {req_to_token.shape[1]}")
    copy_len = topk * speculative_num_steps
    flat = out_cache_loc.reshape(-1)
    for i, (row, start) in enumerate(
        zip(req_pool_indices.tolist(), seq_lens.tolist(), strict=True)
    ):
        src = req_to_token[int(row), int(start) : int(start) + copy_len]
        flat[i * copy_len : i * copy_len + copy_len] = src.to(flat.dtype)


def assign_extend_cache_locs_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """The inverse of ``assign_req_to_token_pool``: gather runs out of ``req_to_token``.

    Run i, ``req_to_token[rpi[i], start[i]:end[i]]``, lands in ``out_cache_loc``
    after the lengths of runs ``0 .. i-1``.
    """
    if req_to_token.shape[1] != pool_len:
        raise ValueError(f"pool_len {pool_len} != req_to_token width {req_to_token.shape[1]}")
    flat = out_cache_loc.reshape(-1)
    taken = 0
    for row, start, end in zip(
        req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist(), strict=True
    ):
        length = int(end) - int(start)
        if length > 0:
            src = req_to_token[int(row), int(start) : int(end)]
            flat[taken : taken + length] = src.to(flat.dtype)
        taken += length


def fill_bonus_tokens_cpu(
    accept_tokens: torch.Tensor,
    accept_lens: torch.Tensor,
    bonus_tokens: torch.Tensor,
    accept_stride: int,
) -> None:
    """``bonus_tokens[i]`` = the last accepted token of request i (row stride ``accept_stride``)."""
    flat = accept_tokens.reshape(-1)
    lens = accept_lens.reshape(-1).to(torch.int64)
    rows = torch.arange(lens.numel(), dtype=torch.int64) * accept_stride
    bonus_tokens.reshape(-1).copy_(flat.index_select(0, rows + lens - 1))


def fill_accept_out_cache_loc_cpu(
    accept_index: torch.Tensor,
    out_cache_loc: torch.Tensor,
    accept_out_cache_loc: torch.Tensor,
) -> None:
    """Pack ``out_cache_loc[accept_index[j]]`` for the accepted ``j`` (index != -1), in order."""
    index = accept_index.reshape(-1).to(torch.int64)
    dst = torch.cumsum((index != -1).to(torch.int64), 0) - (index != -1).to(torch.int64)
    keep = index > -1
    values = out_cache_loc.reshape(-1).index_select(0, index[keep])
    accept_out_cache_loc.reshape(-1).index_copy_(
        0, dst[keep], values.to(accept_out_cache_loc.dtype)
    )


def rotate_input_ids_cpu(
    input_ids: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    topk_index: torch.Tensor,
    select_index: torch.Tensor | None = None,
) -> None:
    """Shift each request's ids left by one and put its new token last, in place.

    For request i with run ``[s, s + n)``: ids ``s .. s+n-2`` take the values of
    ``s+1 .. s+n-1``; then the new token ``topk_index[i]`` goes to
    ``select_index[i]`` when given, else to ``s + n - 1``.
    """
    flat = input_ids.reshape(-1)
    new_tokens = topk_index.reshape(-1).tolist()
    selects = None if select_index is None else select_index.reshape(-1).tolist()
    for i, (start, length) in enumerate(
        zip(extend_start_loc.tolist(), extend_seq_lens.tolist(), strict=True)
    ):
        start, length = int(start), int(length)
        if length > 1:
            flat[start : start + length - 1] = flat[start + 1 : start + length].clone()
        if length > 0:
            last = int(selects[i]) if selects is not None else start + length - 1
            flat[last] = int(new_tokens[i])


SPECULATIVE_FUNCTIONS = {
    fn.__name__: fn
    for fn in (
        build_tree_kernel_efficient_cpu,
        verify_tree_greedy_cpu,
        assign_draft_cache_locs_contiguous_cpu,
        assign_extend_cache_locs_cpu,
        fill_bonus_tokens_cpu,
        fill_accept_out_cache_loc_cpu,
        rotate_input_ids_cpu,
    )
}
"""Top-level ``sgl_kernel`` names this module provides."""
