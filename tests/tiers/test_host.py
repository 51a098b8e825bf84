"""Host tier: bounded LRU pool with ranged reads."""

from __future__ import annotations

import threading

import pytest
import torch

from sglang_cacheflow.tiers import HostTier, Namespace, PageLayout
from tests.tiers.helpers import page_hashes, random_pages, unique_ns


def test_round_trip_and_layer_ranges(small_layout: PageLayout) -> None:
    tier = HostTier(capacity_bytes=1 << 20)
    ns = unique_ns(small_layout)
    pages = random_pages(small_layout, 3)
    hashes = page_hashes(3)
    assert tier.batch_put(ns, hashes, pages) == [True] * 3
    pages[0].zero_()  # the tier holds its own copy
    for got, want in zip(tier.batch_get(ns, hashes[1:]), pages[1:], strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(tier.get(ns, hashes[0]), pages[0])
    for l0, l1 in [(0, 1), (2, 5), (6, 7), (0, 7)]:
        assert torch.equal(tier.get(ns, hashes[2], layers=(l0, l1)), pages[2][l0:l1])
    assert tier.get(ns, "missing") is None
    s = tier.stats.snapshot()
    assert s["hits"] == 7 and s["misses"] == 1 and s["puts"] == 3


def test_lru_eviction_by_bytes(small_layout: PageLayout) -> None:
    tier = HostTier(capacity_bytes=3 * small_layout.page_bytes)
    ns = unique_ns(small_layout)
    pages = random_pages(small_layout, 5)
    h = page_hashes(5)
    tier.batch_put(ns, h[:3], pages[:3])
    assert tier.get(ns, h[0]) is not None  # touch 0: now 1 is least recent
    tier.put(ns, h[3], pages[3])
    assert tier.batch_exists(ns, h[:4]) == [True, False, True, True]
    assert tier.used_bytes == 3 * small_layout.page_bytes
    assert tier.stats.evictions == 1
    assert tier.delete(ns, [h[0], h[4]]) == 1
    assert tier.used_bytes == 2 * small_layout.page_bytes


def test_oversized_page_is_refused() -> None:
    lay = PageLayout(2, 4, 1, 4, torch.float32)
    tier = HostTier(capacity_bytes=lay.page_bytes - 1)
    assert tier.put(unique_ns(lay), "aa", random_pages(lay, 1)[0]) is False
    assert tier.stats.put_failures == 1


def test_namespaces_are_isolated(small_layout: PageLayout) -> None:
    tier = HostTier(capacity_bytes=1 << 20)
    a = Namespace("m", small_layout, tp_rank=0, tp_size=2)
    b = Namespace("m", small_layout, tp_rank=1, tp_size=2)
    tier.put(a, "p1", random_pages(small_layout, 1)[0])
    assert tier.exists(a, "p1") and not tier.exists(b, "p1")
    assert tier.get(b, "p1") is None


def test_bad_arguments_are_rejected(small_layout: PageLayout) -> None:
    tier = HostTier(capacity_bytes=1 << 20)
    ns = unique_ns(small_layout)
    with pytest.raises(ValueError, match="layout wants"):
        tier.put(ns, "p", torch.zeros(3, 3))
    with pytest.raises(ValueError, match="brace"):
        tier.put(ns, "{p}", random_pages(small_layout, 1)[0])
    with pytest.raises(ValueError, match="2 page hashes but 1"):
        tier.batch_put(ns, ["a", "b"], random_pages(small_layout, 1))
    with pytest.raises(ValueError, match="capacity_bytes"):
        HostTier(0)


def test_concurrent_use_keeps_accounting(small_layout: PageLayout) -> None:
    tier = HostTier(capacity_bytes=8 * small_layout.page_bytes)
    ns = unique_ns(small_layout)
    pages = random_pages(small_layout, 4)

    def work(t: int) -> None:
        for i in range(50):
            h = f"t{t}p{i % 12}"
            tier.put(ns, h, pages[i % 4])
            got = tier.get(ns, h)
            assert got is None or torch.equal(got, pages[i % 4])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tier.used_bytes == len(tier) * small_layout.page_bytes <= tier.capacity_bytes


def test_views_are_the_stored_pages_without_a_copy(small_layout: PageLayout) -> None:
    tier = HostTier(capacity_bytes=2 * small_layout.page_bytes)
    ns = unique_ns(small_layout)
    pages = random_pages(small_layout, 3)
    h = page_hashes(3)
    tier.batch_put(ns, h[:2], pages[:2])
    views = tier.batch_views(ns, [h[1], "missing", h[0]], layers=(2, 5))
    assert views[1] is None
    assert torch.equal(views[0], pages[1][2:5]) and torch.equal(views[2], pages[0][2:5])
    again = tier.batch_views(ns, [h[1]], layers=(2, 5))[0]
    assert again.data_ptr() == views[0].data_ptr()  # the tier's memory, not a copy
    # h[1] was read last, so h[0] is evicted; the view held by the caller stays intact.
    tier.put(ns, h[2], pages[2])
    assert tier.batch_exists(ns, h) == [False, True, True]
    assert torch.equal(views[2], pages[0][2:5])
    s = tier.stats.snapshot()
    assert (s["hits"], s["misses"]) == (3, 1)
    assert s["get_bytes"] == 3 * 3 * small_layout.layer_bytes  # 3 hits of 3 layers


def test_pinned_pages_need_a_gpu(small_layout: PageLayout) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            HostTier(capacity_bytes=1 << 20, pin=True)
        return
    tier = HostTier(capacity_bytes=1 << 20, pin=True)
    ns = unique_ns(small_layout)
    tier.put(ns, "p", random_pages(small_layout, 1)[0])
    assert tier.batch_views(ns, ["p"])[0].is_pinned()
