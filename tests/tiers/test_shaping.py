"""Link emulation: calls take at least latency + bytes / bandwidth on a shared, full-duplex
link."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from sglang_cacheflow.tiers import HostTier, LinkShape, PageLayout, ShapedTier
from tests.tiers.helpers import page_hashes, random_pages, unique_ns

LAYOUT = PageLayout(4, 64, 2, 64, torch.bfloat16)  # 32 KiB per layer, 128 KiB per page


def test_parse_and_describe() -> None:
    assert LinkShape.parse("10gbps").bandwidth_bytes_per_s == pytest.approx(1.25e9)
    ssd = LinkShape.parse("3GB/s+0.08ms")
    assert ssd.bandwidth_bytes_per_s == 3e9 and ssd.latency_s == pytest.approx(8e-5)
    assert LinkShape.gbps(25, 0.2).describe() == "25 Gbps + 0.2 ms"
    with pytest.raises(ValueError, match="10gbps"):
        LinkShape.parse("fast")
    with pytest.raises(ValueError, match="in ms"):
        LinkShape.parse("10gbps+3us")


def test_calls_take_the_emulated_time_and_results_pass_through() -> None:
    link = LinkShape(bandwidth_bytes_per_s=10e6, latency_s=0.02)  # 10 MB/s
    tier = ShapedTier(HostTier(1 << 24), link)
    assert tier.name.startswith("emulated[")
    ns = unique_ns(LAYOUT)
    pages = random_pages(LAYOUT, 4)
    h = page_hashes(4)
    t = time.perf_counter()
    assert tier.batch_put(ns, h, pages) == [True] * 4
    put_s = time.perf_counter() - t
    expected = 0.02 + 4 * LAYOUT.page_bytes / 10e6  # 20 ms + 52 ms
    assert expected <= put_s < expected + 0.5
    t = time.perf_counter()
    got = tier.batch_get(ns, h, layers=(3, 4))  # a quarter of the bytes
    get_s = time.perf_counter() - t
    assert 0.02 + 4 * LAYOUT.layer_bytes / 10e6 <= get_s < put_s
    assert all(torch.equal(g, p[3:4]) for g, p in zip(got, pages, strict=True))  # type: ignore[index]
    t = time.perf_counter()
    assert tier.get(ns, "absent") is None  # a miss moves no bytes: latency only
    assert 0.02 <= time.perf_counter() - t < 0.02 + LAYOUT.page_bytes / 10e6
    t = time.perf_counter()
    views = tier.batch_views(ns, [h[0], "absent", h[1]], layers=(3, 4))  # the inner tier's
    assert views is not None and views[1] is None
    assert torch.equal(views[0], pages[0][3:4]) and torch.equal(views[2], pages[1][3:4])
    assert 0.02 + 2 * LAYOUT.layer_bytes / 10e6 <= time.perf_counter() - t < put_s


def test_concurrent_calls_share_the_bandwidth() -> None:
    link = LinkShape(bandwidth_bytes_per_s=20e6, latency_s=0.0)
    tier = ShapedTier(HostTier(1 << 24), link)
    ns = unique_ns(LAYOUT)
    pages = random_pages(LAYOUT, 8)
    h = page_hashes(8)
    threads = [
        threading.Thread(target=tier.batch_put, args=(ns, h[i::2], pages[i::2])) for i in range(2)
    ]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert time.perf_counter() - t >= 8 * LAYOUT.page_bytes / 20e6  # not 4 pages' time


def test_reads_and_lookups_do_not_queue_behind_writes() -> None:
    link = LinkShape(bandwidth_bytes_per_s=10e6, latency_s=0.005)
    tier = ShapedTier(HostTier(1 << 24), link)
    ns = unique_ns(LAYOUT)
    pages = random_pages(LAYOUT, 8)
    h = page_hashes(8)
    tier.batch_put(ns, h[:1], pages[:1])
    write = threading.Thread(target=tier.batch_put, args=(ns, h[1:], pages[1:]))  # ~92 ms
    write.start()
    time.sleep(0.01)
    t = time.perf_counter()
    assert tier.batch_exists(ns, h[:1]) == [True]
    lookup_s = time.perf_counter() - t
    t = time.perf_counter()
    assert tier.batch_get(ns, h[:1])[0] is not None
    read_s = time.perf_counter() - t
    write.join()
    assert lookup_s < 0.04  # latency, not the write's 92 ms
    assert 0.005 + LAYOUT.page_bytes / 10e6 <= read_s < 0.06
