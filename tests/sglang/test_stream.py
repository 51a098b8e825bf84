"""Streaming a split's load into the extend (:mod:`sglang_cacheflow.sglang.stream`), on CPU.

The reader lands the loaded layers group by group; a forward's read of layer ``i`` (the
pool's ``layer_transfer_counter.wait_until``) waits for its group and copies that layer into
the request's slots; a group that does not land leaves the stream short, which
:meth:`StreamedLayers.finish` reports so the request is cut back. End to end (a real server,
records corrupted and Redis killed under a streamed split) in ``test_split.py``.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import torch

from sglang_cacheflow.sglang.split import SplitReader, SplitRestore, new_staging
from sglang_cacheflow.sglang.stream import Stream, StreamedLayers

L, P, H, D = 6, 4, 2, 8


def _pool(size: int = 128) -> SimpleNamespace:
    pool = SimpleNamespace(
        layer_num=L,
        k_buffer=[torch.zeros(size, H, D) for _ in range(L)],
        v_buffer=[torch.zeros(size, H, D) for _ in range(L)],
        layer_transfer_counter=None,
    )
    pool.register_layer_transfer_counter = lambda c: setattr(pool, "layer_transfer_counter", c)
    return pool


def _source(pages: int, layers: int) -> torch.Tensor:
    n = pages * layers * 2 * P * H * D
    return torch.arange(n, dtype=torch.float32).reshape(pages, layers, 2, P, H, D) + 1.0


def _restore(pages: int, first: int = 0, groups: int = 3) -> SplitRestore:
    staging = new_staging(pages, L - first, P, H, D, torch.float32)
    layers = (first, L) if first else (0, 0)
    return SplitRestore("r", "redis", 16, pages * P, P, staging, layers=layers, groups=groups)


class _Gated:
    """A tier read that lands one layer group per ``step()`` (or fails at ``bad_group``)."""

    def __init__(self, sp: SplitRestore, src: torch.Tensor, bad_group: int | None = None):
        self.sp, self.src, self.bad = sp, src, bad_group
        self.calls: list[tuple[int, int, int, int]] = []
        self.gate = threading.Semaphore(0)

    def step(self) -> None:
        self.gate.release()

    def __call__(self, lo: int, hi: int, a: int, b: int) -> list[bool]:
        self.gate.acquire(timeout=10)
        self.calls.append((lo, hi, a, b))
        if self.bad is not None and self.sp.group_of(a) == self.bad:
            raise ConnectionError("redis went away")
        self.sp.staging[lo:hi, a:b] = self.src[lo:hi, a:b]
        return [True] * (hi - lo)


def test_the_reader_lands_layer_groups_in_order_one_tier_call_each() -> None:
    sp, src = _restore(5, groups=4), _source(5, L)
    read = _Gated(sp, src)
    reader = SplitReader(pages_per_read=2)  # a streamed split reads each group in one call
    reader.submit(sp, read)
    assert [sp.group_layers(g) for g in range(4)] == [(0, 1), (1, 3), (3, 4), (4, 6)]
    for g in range(4):
        assert sp.group_pages[g] == 0
        read.step()
        assert sp.wait_group(g, time.perf_counter() + 10) == 5
        assert sp.group_pages[g + 1 :] == [0] * (3 - g)  # later groups not yet read
    assert sp.done.wait(10) and sp.landed_pages == 5 and sp.error is None
    assert read.calls == [(0, 5, 0, 1), (0, 5, 1, 3), (0, 5, 3, 4), (0, 5, 4, 6)]
    assert torch.equal(sp.staging, src)


def test_a_front_loads_groups_are_small_first_and_last() -> None:
    # a front load (its span's first pages), or a token split's back read into its one
    # forward (tapered): the forward reads nothing before the first group lands and computes
    # the last after the read ends; a split's back read for its extend reads equal groups
    def groups(layers: int, k: int, start: int, tapered: bool = False) -> list[tuple[int, int]]:
        staging = new_staging(1, layers, P, H, D, torch.float32)
        sp = SplitRestore(
            "r", "redis", start, P, P, staging, groups=k, span_start=16, tapered=tapered
        )
        assert sp.loads_front == (start == 16)
        return [sp.group_layers(g) for g in range(sp.groups)]

    assert [b - a for a, b in groups(30, 6, 16)] == [2, 6, 7, 7, 6, 2]
    assert [b - a for a, b in groups(30, 6, 32)] == [5] * 6
    assert [b - a for a, b in groups(30, 6, 32, tapered=True)] == [2, 6, 7, 7, 6, 2]
    for layers in range(1, 9):
        for k in range(1, 9):
            got = groups(layers, k, 16)
            assert len(got) == min(k, layers)
            assert got[0][0] == 0 and got[-1][1] == layers
            assert all(a < b for a, b in got)  # every group holds a layer
            assert all(got[i][1] == got[i + 1][0] for i in range(len(got) - 1))


def test_a_forward_waits_for_each_layer_and_copies_it_into_the_slots() -> None:
    pool = _pool()
    hicache = SimpleNamespace(waited=[], producer_index=7)
    hicache.wait_until = hicache.waited.append
    pool.layer_transfer_counter = hicache
    layers = StreamedLayers.install(pool)
    assert pool.layer_transfer_counter is layers and StreamedLayers.install(pool) is layers
    assert layers.producer_index == 7  # what HiCache reads of its counter still reads

    first = 2  # a layer split: layers [0, 2) recomputed, [2, 6) streamed in 2 groups
    sp, src = _restore(3, first=first, groups=2), _source(3, L - first)
    slots = torch.tensor([90 + i for i in range(3 * P)])
    read = _Gated(sp, src)
    SplitReader().submit(sp, read)
    layers.add("r", Stream(sp, slots, time.perf_counter() + 10))

    layers.wait_until(0)  # a recomputed layer: no wait, nothing written
    assert hicache.waited == [0] and not pool.k_buffer[0].any()
    reached: list[int] = []

    def forward() -> None:
        for layer in range(1, L):
            layers.wait_until(layer)
            reached.append(layer)

    t = threading.Thread(target=forward)
    t.start()
    time.sleep(0.2)
    assert reached == [1]  # waits at layer 2 for the first group
    read.step()
    time.sleep(0.2)
    assert reached == [1, 2, 3]  # the first group (layers 2, 3) is in
    read.step()
    t.join(10)
    assert reached == [1, 2, 3, 4, 5]
    for k in range(L - first):
        want_k = src[:, k, 0].reshape(-1, H, D)
        assert torch.equal(pool.k_buffer[first + k][slots], want_k)
        assert torch.equal(pool.v_buffer[first + k][slots], src[:, k, 1].reshape(-1, H, D))
    st, pages = layers.finish("r", None)
    assert pages == 3 and st.waited_s > 0.1
    assert layers.finish("r", None) is None  # settled once


def test_a_group_that_does_not_land_leaves_the_stream_short() -> None:
    pool = _pool()
    layers = StreamedLayers.install(pool)
    sp, src = _restore(3, groups=3), _source(3, L)
    read = _Gated(sp, src, bad_group=1)
    SplitReader().submit(sp, read)
    slots = torch.arange(3 * P)
    layers.add("r", Stream(sp, slots, time.perf_counter() + 10))
    read.step()
    read.step()
    for layer in range(L):  # the forward goes on: its layers of groups 1, 2 stay unwritten
        layers.wait_until(layer)
    assert sp.error and "redis went away" in sp.error
    assert torch.equal(pool.k_buffer[0][slots], src[:, 0, 0].reshape(-1, H, D))
    assert not pool.k_buffer[2][slots].any() and not pool.k_buffer[5][slots].any()
    st, pages = layers.finish("r", None)
    assert pages == 0 == st.copied  # no page has every layer: the request is cut back


def test_a_stream_gives_up_at_its_deadline() -> None:
    pool = _pool()
    layers = StreamedLayers.install(pool)
    sp, src = _restore(2, groups=2), _source(2, L)
    read = _Gated(sp, src)
    SplitReader().submit(sp, read)
    layers.add("r", Stream(sp, torch.arange(2 * P), time.perf_counter() + 0.3))
    read.step()  # the first group lands, the second never does
    t0 = time.perf_counter()
    st, pages = layers.finish("r", None)
    assert pages == 0 == st.copied and st.filled == set(range(L))  # every layer settled
    assert 0.2 < time.perf_counter() - t0 < 5
    assert not sp.done.is_set()
    sp.close()
    read.step()
    assert sp.done.wait(10)


def test_a_request_aborted_before_its_extend_gets_nothing_written() -> None:
    # SGLang frees an aborted request's slots (and may hand them to another request): the
    # stream is dropped at the next layer wait, its source released, its slots untouched
    pool = _pool()
    layers = StreamedLayers.install(pool)
    sp, src = _restore(2, groups=2), _source(2, L)
    released: list[bool] = []
    sp.release = lambda: released.append(True)
    read = _Gated(sp, src)
    SplitReader().submit(sp, read)
    req = SimpleNamespace(rid="r", finished=lambda: True)
    layers.add("r", Stream(sp, torch.arange(2 * P), time.perf_counter() + 10, req))
    read.step()
    read.step()
    assert sp.done.wait(10)
    for layer in range(L):
        layers.wait_until(layer)
    assert layers.streams == {} and released == [True]
    assert not any(pool.k_buffer[layer].any() for layer in range(L))
    assert layers.finish("r", None) is None
