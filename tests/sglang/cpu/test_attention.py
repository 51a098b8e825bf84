"""The ``cacheflow_cpu`` attention backend against attention written out in float64.

A batch of requests with cached prefixes of several lengths (none included), KV slots
contiguous or scattered through the pool, grouped-query heads: each request's new queries
must attend exactly the keys at or before their positions, in fp32 within 1e-5 of the
float64 reference; so must the queries of an extend with a hole (a token split in one
forward: its loaded back left the forward); a decode batch's one query per request attends
all its keys.
"""

from __future__ import annotations

import math

import pytest
import torch

from sglang_cacheflow.sglang.cpu.attention import CpuAttnBackend, _kv_rows

HEADS, KV_HEADS, DIM, SLOTS = 4, 2, 8, 64


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, at: list[int] | None = None
) -> torch.Tensor:
    """Causal attention of ``q`` [new, H, D] at positions ``prefix + i`` (or ``at``) over
    ``k``, ``v`` [keys, Hkv, D], one score at a time, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    group = HEADS // KV_HEADS
    for i in range(q.shape[0]):
        visible = (prefix + i if at is None else at[i]) + 1
        for h in range(HEADS):
            scores = (k[:visible, h // group] @ q[i, h]) / math.sqrt(DIM)
            out[i, h] = torch.softmax(scores, 0) @ v[:visible, h // group]
    return out


def _backend() -> CpuAttnBackend:
    """The backend's attention methods, without the model runner its ``__init__`` reads
    (they use only the per-forward plan, cleared here as ``init_forward_metadata`` does)."""
    backend = CpuAttnBackend.__new__(CpuAttnBackend)
    backend._cached_plan = None
    backend._positions = None
    return backend


def _batch(
    lens: list[tuple[int, int]], scattered: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A KV pool and a ``req_to_token`` table for requests of (prefix, new) tokens, slots
    either one run per request or drawn at random; returns (k, v, req_to_token, rows, seq)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(SLOTS, KV_HEADS, DIM, generator=g)
    v = torch.randn(SLOTS, KV_HEADS, DIM, generator=g)
    order = torch.randperm(SLOTS, generator=g) if scattered else torch.arange(SLOTS)
    req_to_token = torch.zeros(len(lens) + 1, SLOTS, dtype=torch.int32)
    used = 0
    for r, (prefix, new) in enumerate(lens):
        req_to_token[r + 1, : prefix + new] = order[used : used + prefix + new]
        used += prefix + new
    rows = torch.arange(1, len(lens) + 1)  # row 0 unused, as SGLang keeps it
    seq = torch.tensor([p + n for p, n in lens])
    return k, v, req_to_token, rows, seq


@pytest.mark.parametrize("scattered", [False, True])
def test_extend_attends_prefix_and_new_keys_causally(scattered: bool) -> None:
    lens = [(0, 5), (7, 3), (4, 1), (9, 6)]  # no prefix; prefix; one new token; longer
    k, v, req_to_token, rows, seq = _batch(lens, scattered, seed=1)
    news = torch.tensor([n for _, n in lens])
    q = torch.randn(int(news.sum()), HEADS, DIM, generator=torch.Generator().manual_seed(2))
    out = torch.full_like(q, float("nan"))
    _backend()._run_sdpa_forward_extend(
        q, out, k, v, req_to_token, rows, seq, torch.tensor([p for p, _ in lens]), news,
        scaling=1 / math.sqrt(DIM), enable_gqa=True, causal=True,
    )  # fmt: skip
    start = 0
    for r, (prefix, new) in enumerate(lens):
        slots = req_to_token[r + 1, : prefix + new].long()
        want = _reference(q[start : start + new], k[slots], v[slots], prefix)
        torch.testing.assert_close(out[start : start + new].double(), want, rtol=0, atol=1e-5)
        start += new


@pytest.mark.parametrize("scattered", [False, True])
def test_an_extend_with_a_hole_attends_up_to_each_querys_position(scattered: bool) -> None:
    # (prefix, front, back, new): the back's rows left the forward; its keys stay in the row
    lens = [(0, 3, 4, 2), (5, 2, 6, 1), (2, 1, 1, 3)]
    k, v, req_to_token, rows, seq = _batch([(p, f + b + n) for p, f, b, n in lens], scattered, 6)
    at = [[p + i for i in range(f)] + [p + f + b + i for i in range(n)] for p, f, b, n in lens]
    news = torch.tensor([f + n for _, f, _, n in lens])
    q = torch.randn(int(news.sum()), HEADS, DIM, generator=torch.Generator().manual_seed(7))
    out = torch.full_like(q, float("nan"))
    backend = _backend()
    backend._positions = torch.tensor([x for pos in at for x in pos])
    backend._run_sdpa_forward_extend(
        q, out, k, v, req_to_token, rows, seq, torch.tensor([p for p, *_ in lens]), news,
        scaling=1 / math.sqrt(DIM), enable_gqa=True, causal=True,
    )  # fmt: skip
    start = 0
    for r, (prefix, front, back, new) in enumerate(lens):
        slots = req_to_token[r + 1, : prefix + front + back + new].long()
        n = front + new
        want = _reference(q[start : start + n], k[slots], v[slots], prefix, at[r])
        torch.testing.assert_close(out[start : start + n].double(), want, rtol=0, atol=1e-5)
        start += n


@pytest.mark.parametrize("scattered", [False, True])
def test_decode_attends_every_key_of_its_request(scattered: bool) -> None:
    lens = [(0, 1), (5, 1), (12, 1)]
    k, v, req_to_token, rows, seq = _batch(lens, scattered, seed=3)
    q = torch.randn(len(lens), HEADS, DIM, generator=torch.Generator().manual_seed(4))
    out = torch.full_like(q, float("nan"))
    _backend()._run_sdpa_forward_decode(
        q, out, k, v, req_to_token, rows, seq, scaling=1 / math.sqrt(DIM), enable_gqa=True
    )
    for r, (prefix, new) in enumerate(lens):
        slots = req_to_token[r + 1, : prefix + new].long()
        want = _reference(q[r : r + 1], k[slots], v[slots], prefix)
        torch.testing.assert_close(out[r : r + 1].double(), want, rtol=0, atol=1e-5)


def test_a_layout_that_does_not_add_up_is_refused() -> None:
    k, v, req_to_token, rows, seq = _batch([(3, 2)], False, seed=5)
    q = torch.zeros(2, HEADS, DIM)
    with pytest.raises(ValueError, match="prefix 3 \\+ new 1 != sequence length 5"):
        _backend()._run_sdpa_forward_extend(
            q, torch.empty_like(q), k, v, req_to_token, rows, seq, torch.tensor([3]),
            torch.tensor([1]), causal=True,
        )  # fmt: skip


def test_contiguous_slots_are_read_through_a_view() -> None:
    assert _kv_rows(torch.tensor([4, 5, 6], dtype=torch.int32)) == slice(4, 7)
    assert _kv_rows(torch.tensor([], dtype=torch.int32)) == slice(0, 0)
    scattered = _kv_rows(torch.tensor([4, 6, 5], dtype=torch.int32))
    assert isinstance(scattered, torch.Tensor) and scattered.tolist() == [4, 6, 5]
