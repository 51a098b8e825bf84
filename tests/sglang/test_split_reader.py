"""The split restore's reader and staging copy (:mod:`sglang_cacheflow.sglang.split`), on CPU.

The reader fills staging pages in order and stops at the first page that does not arrive, so
the splice takes a front of whole pages and the extend recomputes the rest; the copy puts
each staged token into its device slot, layer by layer. End to end (a real server, Redis
killed or corrupted mid-read) in ``test_split.py``.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from sglang_cacheflow.sglang.split import SplitReader, SplitRestore, new_staging, write_pages

L, P, H, D = 3, 4, 2, 8


def _restore(pages: int) -> SplitRestore:
    return SplitRestore(
        "r", "redis", 16, pages * P, P, new_staging(pages, L, P, H, D, torch.float32)
    )


def _source(pages: int) -> torch.Tensor:
    return torch.arange(pages * L * 2 * P * H * D, dtype=torch.float32).reshape(
        pages, L, 2, P, H, D
    )


def test_reader_fills_staging_in_order() -> None:
    sp, src = _restore(10), _source(10)

    def read(lo: int, hi: int, a: int, b: int) -> list[bool]:
        sp.staging[lo:hi] = src[lo:hi]
        return [True] * (hi - lo)

    reader = SplitReader(pages_per_read=3)
    reader.submit(sp, read)
    assert sp.done.wait(10)
    assert sp.landed_pages == 10 and sp.error is None
    assert torch.equal(sp.staging, src)


@pytest.mark.parametrize("fault", ["corrupt", "raise"])
def test_reader_stops_at_the_first_page_that_does_not_arrive(fault: str) -> None:
    sp, src = _restore(10), _source(10)

    def read(lo: int, hi: int, a: int, b: int) -> list[bool]:
        if fault == "raise" and lo >= 6:
            raise ConnectionError("redis went away")
        sp.staging[lo:hi] = src[lo:hi]
        return [i != 7 for i in range(lo, hi)]

    reader = SplitReader(pages_per_read=3)
    reader.submit(sp, read)
    assert sp.done.wait(10)
    assert sp.landed_pages == (7 if fault == "corrupt" else 6)
    assert sp.error and ("page 7" in sp.error or "redis went away" in sp.error)
    assert torch.equal(sp.staging[: sp.landed_pages], src[: sp.landed_pages])


def test_a_cancelled_read_stops_between_reads_and_releases_its_source() -> None:
    sp = _restore(10)
    gate, released = threading.Event(), []
    sp.release = lambda: released.append(True)

    def read(lo: int, hi: int, a: int, b: int) -> list[bool]:
        gate.wait(10)
        return [True] * (hi - lo)

    reader = SplitReader(pages_per_read=2)
    reader.submit(sp, read)
    sp.close()
    gate.set()
    assert sp.done.wait(10)
    assert sp.landed_pages <= 2 and sp.error == "cancelled"
    sp.close()
    assert released == [True]  # once


def test_write_pages_puts_each_token_in_its_slot_per_layer() -> None:
    # staging layer i goes to pool layer first_layer + i, token j of the pages to slots[j]
    pages, src = 3, _source(3)
    size = 64
    pool = SimpleNamespace(
        layer_num=L,
        k_buffer=[torch.zeros(size, H, D) for _ in range(L)],
        v_buffer=[torch.zeros(size, H, D) for _ in range(L)],
    )
    slots = torch.tensor(
        [40 + i for i in range(P)] + [8 + i for i in range(P)] + [20 + i for i in range(P)]
    )
    write_pages(pool, slots, src)
    for layer in range(L):
        k = src[:, layer, 0].reshape(pages * P, H, D)
        v = src[:, layer, 1].reshape(pages * P, H, D)
        assert torch.equal(pool.k_buffer[layer][slots], k)
        assert torch.equal(pool.v_buffer[layer][slots], v)
        untouched = torch.ones(size, dtype=torch.bool)
        untouched[slots] = False
        assert not pool.k_buffer[layer][untouched].any()
    with pytest.raises(ValueError, match="layers"):
        write_pages(pool, slots, src, first_layer=1)  # 3 staged layers from layer 1: 4 > 3
    # a layer split's top layers land on top of the bottom ones, which stay as computed
    top = _source(3)[:, 1:] + 1000.0
    write_pages(pool, slots, top, first_layer=1)
    assert torch.equal(pool.k_buffer[0][slots], src[:, 0, 0].reshape(pages * P, H, D))
    for layer in (1, 2):
        assert torch.equal(pool.k_buffer[layer][slots], top[:, layer - 1, 0].reshape(-1, H, D))
        assert torch.equal(pool.v_buffer[layer][slots], top[:, layer - 1, 1].reshape(-1, H, D))


def test_the_reader_tells_which_forwards_ran_beside_a_read() -> None:
    # calibration charges a forward that ran while a read was under way to the overlap
    # slowdown; the reader says whether one was, and reports each restore's read once
    reported: list[SplitRestore] = []
    gate = threading.Event()
    reader = SplitReader(pages_per_read=2, on_read=reported.append)
    before = time.perf_counter()
    assert not reader.busy_since(before)

    def read(lo: int, hi: int, a: int, b: int) -> list[bool]:
        gate.wait(10)
        return [True] * (hi - lo)

    sp = _restore(4)
    reader.submit(sp, read)
    assert reader.busy_since(time.perf_counter())  # under way
    gate.set()
    assert sp.done.wait(10)
    assert reported == [sp]  # one report for its two tier calls
    assert reader.busy_since(before)  # a forward begun before the read ended ran beside it
    assert not reader.busy_since(time.perf_counter())  # one begun after it did not
