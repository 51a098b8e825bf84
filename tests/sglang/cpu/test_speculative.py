"""The EAGLE ``sgl_kernel`` ops vs references written from the tree they describe.

The draft-tree references work on explicit parent/children lists, not on the
kernels' next-token / next-sibling arrays, so they check the encoding too.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sglang_cacheflow.sglang.cpu import speculative as spec

TOPK, DEPTH, N = 2, 3, 5  # draft_token_num N: the root plus 4 selected tokens


def _tree(selected: list[int], parent_list: list[int]) -> list[int]:
    """Parent node of every draft node (node 0 is the root, node i+1 is selected[i])."""
    parents = [-1]
    for token in selected:
        tb = token // TOPK
        if tb == 0:
            parents.append(0)
        else:
            parents.append(selected.index(parent_list[tb]) + 1)
    return parents


def _depth(parents: list[int], node: int) -> int:
    depth = 0
    while node != 0:
        node, depth = parents[node], depth + 1
    return depth


def _ancestors(parents: list[int], node: int) -> set[int]:
    out = {node}
    while node != 0:
        node = parents[node]
        out.add(node)
    return out


# Two requests: tree 0 -> {1, 2}, 1 -> {3}, 3 -> {4}; and 0 -> {1, 2}, 2 -> {3, 4}.
SELECTED = [[0, 1, 2, 6], [0, 1, 4, 5]]
PARENT_LIST = [[-1, 0, 1, 2, 3], [-1, 0, 1, 2, 3]]
SEQ_LENS = [7, 3]


@pytest.mark.parametrize("mode", [spec.FULL_MASK, spec.QLEN_ONLY, spec.QLEN_ONLY_BITPACKING])
def test_build_tree(mode: int) -> None:
    bs = len(SEQ_LENS)
    if mode == spec.FULL_MASK:
        mask = torch.ones(sum(s * N + N * N for s in SEQ_LENS), dtype=torch.bool)
    elif mode == spec.QLEN_ONLY:
        mask = torch.ones(bs * N * N, dtype=torch.bool)
    else:
        mask = torch.zeros(bs * N, dtype=torch.uint8)
    positions = torch.zeros(bs * N, dtype=torch.int64)
    r_index = torch.zeros(bs, N, dtype=torch.int64)
    r_next = torch.full((bs, N), -1, dtype=torch.int64)
    r_sibling = torch.full((bs, N), -1, dtype=torch.int64)

    spec.build_tree_kernel_efficient_cpu(
        torch.tensor(PARENT_LIST), torch.tensor(SELECTED), torch.tensor(SEQ_LENS),
        mask, positions, r_index, r_next, r_sibling, TOPK, DEPTH, N, mode,
    )  # fmt: skip

    offset = 0
    for b, (selected, parent_list, seq_len) in enumerate(
        zip(SELECTED, PARENT_LIST, SEQ_LENS, strict=True)
    ):
        parents = _tree(selected, parent_list)
        children = [[c for c in range(1, N) if parents[c] == p] for p in range(N)]
        assert r_index[b].tolist() == [b * N + i for i in range(N)]
        for p in range(N):
            assert r_next[b, p] == (children[p][0] if children[p] else -1)
            for first, second in zip(children[p], [*children[p][1:], -1], strict=False):
                assert r_sibling[b, first] == second
        for node in range(N):
            assert positions[b * N + node] == seq_len + _depth(parents, node)
            visible = [c in _ancestors(parents, node) for c in range(N)]
            if mode == spec.FULL_MASK:
                row = offset + node * (seq_len + N)
                assert mask[row : row + seq_len].all()  # the prefix, as the caller set it
                assert mask[row + seq_len : row + seq_len + N].tolist() == visible
            elif mode == spec.QLEN_ONLY:
                row = (b * N + node) * N
                assert mask[row : row + N].tolist() == visible
            else:
                bits = int(mask[b * N + node])
                assert [bool(bits >> c & 1) for c in range(N)] == visible
        offset += seq_len * N + N * N


def test_verify_tree_greedy() -> None:
    bs, num_spec = len(SEQ_LENS), 4
    parents = [_tree(s, p) for s, p in zip(SELECTED, PARENT_LIST, strict=True)]
    r_index = torch.tensor([[b * N + i for i in range(N)] for b in range(bs)])
    r_next = torch.full((bs, N), -1, dtype=torch.int64)
    r_sibling = torch.full((bs, N), -1, dtype=torch.int64)
    for b in range(bs):
        for p in range(N):
            kids = [c for c in range(1, N) if parents[b][c] == p]
            if kids:
                r_next[b, p] = kids[0]
            for first, second in itertools.pairwise(kids):
                r_sibling[b, first] = second
    # Request 0 accepts 0 -> 1 -> 3 and stops at 4; request 1 accepts 0 -> 2 -> 4.
    candidates = torch.tensor([[50, 11, 12, 13, 14], [60, 21, 22, 23, 24]])
    target = torch.tensor([[11, 13, 0, 99, 0], [22, 0, 24, 0, 77]])
    predicts = torch.full((bs * N,), -1, dtype=torch.int32)
    accept_index = torch.full((bs, num_spec), -1, dtype=torch.int32)
    accept_num = torch.zeros(bs, dtype=torch.int32)

    spec.verify_tree_greedy_cpu(
        predicts=predicts, accept_index=accept_index, accept_token_num=accept_num,
        candidates=candidates, retrive_index=r_index, retrive_next_token=r_next,
        retrive_next_sibling=r_sibling, target_predict=target,
    )  # fmt: skip

    assert accept_num.tolist() == [2, 2]
    assert accept_index.tolist() == [[0, 1, 3, -1], [5, 7, 9, -1]]
    expected = [-1] * (bs * N)
    for flat in (0, 1, 3):  # accepted nodes of request 0, then its bonus token at node 3
        expected[flat] = int(target.view(-1)[flat])
    for flat in (5, 7, 9):
        expected[flat] = int(target.view(-1)[flat])
    assert predicts.tolist() == expected


def test_assign_draft_cache_locs_contiguous() -> None:
    req_to_token = torch.arange(4 * 40, dtype=torch.int32).view(4, 40)
    out = torch.zeros(2 * 6, dtype=torch.int64)
    spec.assign_draft_cache_locs_contiguous_cpu(
        torch.tensor([3, 1]), req_to_token, torch.tensor([10, 0]), out, 40, 2, 3
    )
    assert torch.equal(out[:6], req_to_token[3, 10:16].long())
    assert torch.equal(out[6:], req_to_token[1, 0:6].long())


def test_assign_extend_cache_locs() -> None:
    req_to_token = torch.arange(3 * 20, dtype=torch.int64).view(3, 20)
    out = torch.full((7,), -1, dtype=torch.int64)
    spec.assign_extend_cache_locs_cpu(
        torch.tensor([2, 0, 1]), req_to_token, torch.tensor([4, 1, 5]),
        torch.tensor([8, 4, 5]), out, 20,
    )  # fmt: skip
    assert out.tolist() == [*range(44, 48), *range(1, 4)]


def test_fill_bonus_tokens() -> None:
    accept_tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    bonus = torch.zeros(3, dtype=torch.int64)
    spec.fill_bonus_tokens_cpu(accept_tokens, torch.tensor([2, 4, 1]), bonus, 4)
    assert bonus.tolist() == [2, 8, 9]


def test_fill_accept_out_cache_loc() -> None:
    accept_index = torch.tensor([0, -1, 3, 4, -1, 7], dtype=torch.int32)
    out_cache_loc = torch.arange(100, 108, dtype=torch.int64)
    packed = torch.full((6,), -5, dtype=torch.int64)
    spec.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, packed)
    assert packed.tolist() == [100, 103, 104, 107, -5, -5]


@pytest.mark.parametrize("with_select", [False, True])
def test_rotate_input_ids(with_select: bool) -> None:
    ids = torch.arange(10, 20, dtype=torch.int64)
    starts, lens = torch.tensor([0, 4, 9]), torch.tensor([4, 5, 1])
    new = torch.tensor([100, 200, 300])
    select = torch.tensor([2, 6, 9]) if with_select else None
    spec.rotate_input_ids_cpu(ids, starts, lens, new, select)
    expected = [11, 12, 13, 100, 15, 16, 17, 18, 200, 300]
    if with_select:
        expected = [11, 12, 100, 13, 15, 16, 200, 18, 18, 300]
    assert ids.tolist() == expected
