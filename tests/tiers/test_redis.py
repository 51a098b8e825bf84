"""Redis tier against a real redis-server (and a real 3-node Redis Cluster).

Data tests run twice: on the direct path (the tier's own RESP reader, values received
straight into the destination tensors; the default) and on redis-py pipelines (the
fallback), see the ``direct_io`` fixture."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis
import torch

from sglang_cacheflow.testing.redis import RedisCluster, RedisServer
from sglang_cacheflow.tiers import Namespace, PageLayout
from sglang_cacheflow.tiers.redis import RedisTier, RedisTierConfig, RedisTierError, redact_url
from tests.tiers.helpers import page_hashes, random_pages, unique_ns

pytestmark = pytest.mark.redis

LAYOUTS = [
    # Llama-like (Llama-3.1-8B, TP 4: 2 KV heads per rank), 16-token pages.
    PageLayout(32, 16, 2, 128, torch.bfloat16),
    PageLayout(32, 16, 2, 128, torch.float16),
    PageLayout(32, 16, 2, 128, torch.float32),
    # Odd shapes: prime layer count, 1 token, odd head dims, MLA-like single component.
    PageLayout(7, 1, 3, 5, torch.bfloat16),
    PageLayout(13, 33, 1, 7, torch.float32),
    PageLayout(5, 8, 1, 72, torch.float16, components=1),
]


@pytest.fixture(params=[True, False], ids=["direct", "pipelines"])
def direct_io(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture
def tier(redis_server: RedisServer, direct_io: bool):
    with RedisTier(redis_server.url, block_bytes=64 << 10, direct_io=direct_io) as t:
        assert t.direct_io is direct_io
        yield t


def assert_same(a: torch.Tensor | None, b: torch.Tensor) -> None:
    assert a is not None
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.tag)
def test_round_trip(tier: RedisTier, layout: PageLayout) -> None:
    ns = unique_ns(layout)
    pages = random_pages(layout, 5, seed=layout.num_layers)
    hashes = page_hashes(5)
    assert tier.batch_put(ns, hashes, pages) == [True] * 5
    assert tier.batch_exists(ns, [*hashes, "absent"]) == [True] * 5 + [False]
    for got, want in zip(tier.batch_get(ns, hashes), pages, strict=True):
        assert_same(got, want)
    assert tier.get(ns, "absent") is None
    s = tier.stats.snapshot()
    assert s["hits"] == 5 and s["misses"] == 1 and s["corrupt"] == 0


@pytest.mark.parametrize("layers_per_block", [1, 3, 7])
def test_every_layer_range_equals_slice_of_full_read(
    redis_server: RedisServer, layers_per_block: int, direct_io: bool
) -> None:
    """Whole blocks (GET), parts of blocks (GETRANGE) and block-spanning ranges."""
    layout = PageLayout(7, 4, 2, 8, torch.bfloat16)
    ns = unique_ns(layout)
    pages = random_pages(layout, 2)
    hashes = page_hashes(2)
    with RedisTier(redis_server.url, layers_per_block=layers_per_block, direct_io=direct_io) as t:
        t.batch_put(ns, hashes, pages)
        full = t.batch_get(ns, hashes)
        for l0 in range(7):
            for l1 in range(l0 + 1, 8):
                for got, whole in zip(t.batch_get(ns, hashes, (l0, l1)), full, strict=True):
                    assert_same(got, whole[l0:l1])  # type: ignore[index]
        # Into a strided destination (a permuted view, as SGLang host pools give).
        dst = torch.zeros(2, 3, 4, 2, 8, dtype=torch.bfloat16)  # (C, L, T, H, D)
        assert t.get_into(ns, hashes[1], dst.permute(1, 0, 2, 3, 4), layers=(2, 5))
        assert_same(dst.permute(1, 0, 2, 3, 4), pages[1][2:5])


def test_ranged_read_fetches_only_its_blocks(redis_server: RedisServer, direct_io: bool) -> None:
    layout = PageLayout(8, 16, 2, 16, torch.bfloat16)  # 2 KiB per layer
    ns = unique_ns(layout)
    with RedisTier(redis_server.url, layers_per_block=2, direct_io=direct_io) as t:
        h = page_hashes(1)[0]
        t.put(ns, h, random_pages(layout, 1)[0])
        keys = t.block_keys(ns, h)
        assert len(keys) == 4
        t.client.delete(keys[0], keys[3])  # layers 0-1 and 6-7 gone
        assert t.get(ns, h) is None
        assert t.get(ns, h, layers=(2, 6)) is not None
        assert t.get(ns, h, layers=(1, 3)) is None
        assert t.exists(ns, h) is False


def test_namespace_isolation(tier: RedisTier) -> None:
    lay = PageLayout(4, 8, 2, 8, torch.bfloat16)
    base = Namespace("model-a", lay, tp_rank=0, tp_size=2)
    others = [
        Namespace("model-b", lay, tp_rank=0, tp_size=2),
        Namespace("model-a", lay, tp_rank=1, tp_size=2),
        Namespace("model-a", lay, tp_rank=0, tp_size=4),
        Namespace("model-a", PageLayout(4, 8, 2, 8, torch.float16), tp_rank=0, tp_size=2),
        Namespace("model-a", PageLayout(4, 16, 2, 8, torch.bfloat16), tp_rank=0, tp_size=2),
    ]
    h = page_hashes(1)[0]
    page = random_pages(lay, 1)[0]
    assert tier.put(base, h, page)
    for ns in others:
        assert not tier.exists(ns, h), ns.prefix
        assert tier.get(ns, h) is None, ns.prefix
    assert tier.stats.corrupt == 0  # different keys, not foreign records
    assert_same(tier.get(base, h), page)
    assert len({ns.prefix for ns in [base, *others]}) == 6


def test_concurrent_writers_and_readers(redis_server: RedisServer) -> None:
    layout = PageLayout(6, 16, 2, 32, torch.bfloat16)  # 4 KiB per layer
    ns = unique_ns(layout)
    pages = random_pages(layout, 8)
    hashes = page_hashes(8)
    errors: list[BaseException] = []
    with RedisTier(redis_server.url, streams=3, layers_per_block=2, pipeline_bytes=8 << 10) as t:

        def writer(k: int) -> None:
            try:
                for _ in range(10):
                    assert all(t.batch_put(ns, hashes[k::2], pages[k::2]))
            except BaseException as e:
                errors.append(e)

        def reader() -> None:
            try:
                for _ in range(20):
                    for h, got in zip(hashes, t.batch_get(ns, hashes, (1, 5)), strict=True):
                        if got is not None:  # a page not written yet is a miss, never junk
                            assert_same(got, pages[hashes.index(h)][1:5])
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
        threads += [threading.Thread(target=reader) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        assert t.stats.corrupt == 0
        for got, want in zip(t.batch_get(ns, hashes), pages, strict=True):
            assert_same(got, want)


def test_corrupted_and_truncated_values_are_counted_misses(tier: RedisTier) -> None:
    layout = PageLayout(4, 16, 2, 16, torch.float16)
    ns = unique_ns(layout)
    pages = random_pages(layout, 4)
    h = page_hashes(4)
    tier.batch_put(ns, h, pages)
    r = tier.client
    k_flip = tier.block_keys(ns, h[0])[0]
    value = bytearray(r.get(k_flip))
    value[len(value) // 2] ^= 0xFF
    r.set(k_flip, bytes(value))  # overwritten with a damaged copy
    k_trunc = tier.block_keys(ns, h[1])[-1]
    r.set(k_trunc, r.get(k_trunc)[:-100])  # truncated
    r.set(tier.block_keys(ns, h[2])[0], b"not a record")  # foreign value
    before = tier.stats.snapshot()
    got = tier.batch_get(ns, h)
    assert [g is not None for g in got] == [False, False, False, True]
    assert_same(got[3], pages[3])
    after = tier.stats.snapshot()
    assert after["corrupt"] - before["corrupt"] == 3
    assert after["misses"] - before["misses"] == 3
    # Damaged records are removed, so the page reads as absent and gets written again.
    assert tier.batch_exists(ns, h) == [False, False, False, True]
    assert tier.batch_put(ns, h[:3], pages[:3]) == [True] * 3
    for got_page, want in zip(tier.batch_get(ns, h), pages, strict=True):
        assert_same(got_page, want)


def test_ranged_read_detects_damage_in_its_layers_only(tier: RedisTier) -> None:
    layout = PageLayout(4, 16, 2, 16, torch.bfloat16)
    ns = unique_ns(layout)
    with RedisTier(tier.config.url, layers_per_block=4, direct_io=tier.direct_io) as t:
        h = page_hashes(1)[0]
        page = random_pages(layout, 1)[0]
        t.put(ns, h, page)
        key = t.block_keys(ns, h)[0]
        value = bytearray(t.client.get(key))
        value[-5] ^= 0x10  # inside layer 3
        t.client.set(key, bytes(value))
        assert_same(t.get(ns, h, layers=(0, 3)), page[0:3])
        assert t.get(ns, h, layers=(2, 4)) is None
        assert t.stats.corrupt == 1


def test_server_killed_mid_batch_then_recovers(
    fresh_redis: RedisServer, caplog: pytest.LogCaptureFixture, direct_io: bool
) -> None:
    layout = PageLayout(8, 64, 2, 64, torch.bfloat16)  # 32 KiB per layer, 256 KiB per page
    ns = unique_ns(layout)
    n = 96
    pages = random_pages(layout, 4)
    hashes = page_hashes(n)
    with RedisTier(
        fresh_redis.url,
        streams=2,
        layers_per_block=1,
        pipeline_bytes=32 << 10,
        pipeline_depth=2,  # direct path: two groups in flight when the server dies
        direct_io=direct_io,
    ) as t:
        assert all(t.batch_put(ns, hashes, [pages[i % 4] for i in range(n)]))
        result: list[list[torch.Tensor | None]] = []
        worker = threading.Thread(target=lambda: result.append(t.batch_get(ns, hashes)))

        def gets_served() -> int:
            info = fresh_redis.cli("info", "commandstats")
            line = next((x for x in info.splitlines() if x.startswith("cmdstat_get:")), "")
            return int(line.split("calls=")[1].split(",")[0]) if line else 0

        caplog.set_level(logging.ERROR, logger="sglang_cacheflow.tiers.redis")
        worker.start()
        deadline = time.monotonic() + 20
        while gets_served() < 40 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert worker.is_alive(), "batch finished before the kill; make it longer"
        fresh_redis.kill()
        worker.join(timeout=60)
        assert not worker.is_alive()
        got = result[0]
        hits = [g is not None for g in got]
        assert 0 < sum(hits) < n  # some pages came, the rest are misses
        for i, g in enumerate(got):
            if g is not None:  # never a partial page
                assert_same(g, pages[i % 4])
        assert t.stats.errors >= 1
        assert any("Redis tier" in r.getMessage() for r in caplog.records)
        # No connection that saw the failure is kept open for reuse.
        pool = t.client.connection_pool
        assert all(c._sock is None for c in pool._connections)
        # Every call while the server is down is a miss, not an exception.
        assert t.batch_put(ns, hashes[:2], pages[:2]) == [False, False]
        assert t.batch_exists(ns, hashes[:2]) == [False, False]
        assert t.delete(ns, hashes[:1]) == 0
        fresh_redis.start()  # same port, empty (no persistence)
        assert t.get(ns, hashes[0]) is None
        assert t.put(ns, hashes[0], pages[0])
        assert_same(t.get(ns, hashes[0]), pages[0])


def test_unreachable_server_and_bad_urls_name_the_url() -> None:
    with RedisServer() as s:
        port = s.port
    url = f"redis://user:secret@127.0.0.1:{port}/0"
    with pytest.raises(
        RedisTierError, match=rf"cannot reach Redis at redis://user:\*\*\*@127\.0\.0\.1:{port}/0"
    ) as e:
        RedisTier(url, connect_timeout_s=0.5)
    assert "secret" not in str(e.value)
    with pytest.raises(RedisTierError, match=r"memcached://h:1.*use one of redis://"):
        RedisTier("memcached://h:1")
    with pytest.raises(RedisTierError, match="bad host:port"):
        RedisTier("redis+cluster://127.0.0.1:notaport")
    with pytest.raises(RedisTierError, match="only database 0"):
        RedisTier("redis+cluster://127.0.0.1:7000/3")
    with pytest.raises(ValueError, match="streams"):
        RedisTierConfig(url="redis://x", streams=0)
    with pytest.raises(ValueError, match='need "url"'):
        RedisTierConfig.from_dict({"backend_name": "redis"})


def test_acl_user_its_key_pattern_and_no_password_in_logs(
    fresh_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user (the form a shared Redis gives each tenant): it works within its key
    pattern, a wrong password is a clear error, and the password never shows in logs."""
    admin = redis.Redis(host="127.0.0.1", port=fresh_redis.port)
    admin.acl_setuser("kv", enabled=True, passwords=["+s3cr3t"], keys=["cf1:*"],
                      commands=["+@all"])  # fmt: skip
    admin.acl_setuser("other", enabled=True, passwords=["+s3cr3t"], keys=["elsewhere:*"],
                      commands=["+@all"])  # fmt: skip
    layout = PageLayout(2, 4, 1, 8, torch.bfloat16)
    page = random_pages(layout, 1)[0]
    ns = unique_ns(layout)
    port = fresh_redis.port
    caplog.set_level(logging.DEBUG)
    with RedisTier(f"redis://kv:s3cr3t@127.0.0.1:{port}/0") as tier:
        assert tier.put(ns, "aa", page)
        assert_same(tier.get(ns, "aa"), page)
    with pytest.raises(RedisTierError, match=r"redis://kv:\*\*\*@") as e:
        RedisTier(f"redis://kv:wrong@127.0.0.1:{port}/0")
    assert "wrong" not in str(e.value)
    # a user whose key pattern excludes the tier's keys: refused writes and reads are
    # counted failures and misses, not exceptions
    with RedisTier(f"redis://other:s3cr3t@127.0.0.1:{port}/0") as tier:
        assert tier.put(ns, "bb", page) is False
        assert tier.get(ns, "aa") is None
        stats = tier.stats.snapshot()
        assert stats["put_failures"] == 1 and stats["misses"] == 1
    assert "s3cr3t" not in caplog.text


def test_url_forms_password_db_unix_and_ttl() -> None:
    layout = PageLayout(2, 4, 1, 8, torch.bfloat16)
    page = random_pages(layout, 1)[0]
    with RedisServer(unix_socket=True, password="p@ss word") as s:
        quoted = "p%40ss%20word"
        ns = unique_ns(layout)
        with RedisTier(f"redis://:{quoted}@127.0.0.1:{s.port}/3", ttl_s=30) as tcp:
            assert tcp.put(ns, "aa", page)
            key = tcp.block_keys(ns, "aa")[0]
            assert 25_000 < tcp.client.pttl(key) <= 30_000
            assert tcp.client.connection_pool.connection_kwargs["db"] == 3
        with RedisTier(f"unix://:{quoted}@{s.socket_path}?db=3") as unix:
            assert_same(unix.get(ns, "aa"), page)
        with RedisTier(f"redis://:{quoted}@127.0.0.1:{s.port}/0") as db0:
            assert db0.get(ns, "aa") is None  # another database
        with pytest.raises(RedisTierError, match=r"redis://:\*\*\*@"):
            RedisTier(f"redis://:wrong@127.0.0.1:{s.port}/0")
    assert redact_url("rediss://u:pw@h:1/0") == "rediss://u:***@h:1/0"


def test_cluster_round_trip_spreads_pages(redis_cluster: RedisCluster, direct_io: bool) -> None:
    layout = PageLayout(6, 16, 2, 16, torch.bfloat16)
    ns = unique_ns(layout)
    n = 24
    pages = random_pages(layout, n)
    hashes = page_hashes(n)
    with RedisTier(redis_cluster.url, layers_per_block=2, streams=3, direct_io=direct_io) as t:
        assert t.is_cluster and t.direct_io is direct_io
        assert t.batch_put(ns, hashes, pages) == [True] * n
        assert t.batch_exists(ns, hashes) == [True] * n
        for got, want in zip(t.batch_get(ns, hashes, (1, 4)), pages, strict=True):
            assert_same(got, want[1:4])
        for got, want in zip(t.batch_get(ns, hashes), pages, strict=True):
            assert_same(got, want)
        per_node = [int(s.cli("dbsize")) for s in redis_cluster.servers]
        assert sum(per_node) == n * 3 and min(per_node) > 0, per_node
        assert t.delete(ns, hashes[:4]) == 4
        assert t.clear(ns) == (n - 4) * 3
        assert t.batch_exists(ns, hashes) == [False] * n
    # The same cluster through a redis:// URL with the cluster option.
    first = redis_cluster.servers[0].port
    with RedisTier(f"redis://127.0.0.1:{first}/0?cluster=true") as t2:
        assert t2.is_cluster
