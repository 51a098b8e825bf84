"""RedisHiCacheStorage against SGLang 0.5.23's real backend factory, storage config and
MHA host pool (constructed on CPU with the CPU host allocator from
``sglang_cacheflow.sglang.cpu.allocator``), and a real redis-server."""

from __future__ import annotations

import threading

import pytest
import torch
from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.pool_host import common as pool_common
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.storage import StorageBackendFactory

from sglang_cacheflow.sglang.cpu.allocator import alloc_host_buffer
from sglang_cacheflow.sglang.storage import RedisHiCacheStorage, canonical_page_view
from sglang_cacheflow.testing.redis import RedisServer
from sglang_cacheflow.tiers.redis import RedisTier, RedisTierError
from tests.tiers.helpers import page_hashes

pytestmark = pytest.mark.redis

LAYERS, HEADS, DIM, PAGE = 3, 2, 8, 4
LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head"]


@pytest.fixture
def make_pool(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(pool_common.ALLOC_MEMORY_FUNCS, "cpu", alloc_host_buffer)

    def make(layout: str, dtype: torch.dtype = torch.bfloat16) -> MHATokenToKVPoolHost:
        k = tuple(torch.zeros(64, HEADS, DIM, dtype=dtype) for _ in range(LAYERS))
        v = tuple(torch.zeros(64, HEADS, DIM, dtype=dtype) for _ in range(LAYERS))

        def ptrs(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64)

        info = MHABufferInfo(
            buffers=KVBuffers(
                k=k, v=v, k_data_ptrs=ptrs(k), v_data_ptrs=ptrs(v), layout=KVBufferLayout.NHD
            ),
            page_size=PAGE, head_num=HEADS, head_dim=DIM, v_head_dim=DIM, dtype=dtype,
            device=torch.device("cpu"),
        )  # fmt: skip
        pool = MHATokenToKVPoolHost(
            info, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu",
            device_capacity_tokens=64, start_layer=0, end_layer=LAYERS,
        )  # fmt: skip
        pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape).to(dtype))
        return pool

    return make


def storage_config(url: str, tp_rank: int = 0, tp_size: int = 1, **extra) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
        attn_cp_size=1, is_mla_model=False, enable_storage_metrics=True,
        is_page_first_layout=False, model_name="org/test-model",
        extra_config={
            "backend_name": "redis", "module_path": "sglang_cacheflow.sglang.storage",
            "class_name": "RedisHiCacheStorage", "url": url, **extra,
        },
    )  # fmt: skip


def backend(url: str, pool: MHATokenToKVPoolHost, **kw) -> RedisHiCacheStorage:
    """Built the way SGLang's cache controller builds a dynamic backend."""
    cfg = storage_config(url, **kw)
    b = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    b.register_mem_pool_host(pool)
    assert isinstance(b, RedisHiCacheStorage)
    return b


def idx(*pages: int) -> torch.Tensor:
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_copy_round_trip_every_host_layout(redis_server: RedisServer, make_pool, layout: str):
    pool = make_pool(layout)
    b = backend(redis_server.url, pool, model=f"m-{layout}")
    assert b.storage_config.extra_config["interface_v1"] == 1  # controller takes the v1 path
    keys = page_hashes(3)
    want = [canonical_page_view(pool, i).clone() for i in (4, 12, 20)]
    assert b.batch_set_v1(keys, idx(1, 3, 5)) == [True] * 3
    assert b.batch_exists([*keys, "absent"]) == 3
    assert b.batch_exists(["absent", *keys]) == 0
    pool.kv_buffer.zero_()
    assert b.batch_get_v1(keys, idx(7, 2, 9)) == [True] * 3
    for page_idx, w in zip((7, 2, 9), want, strict=True):
        assert torch.equal(canonical_page_view(pool, page_idx * PAGE), w)
    assert b.batch_get_v1(["absent", keys[0]], idx(1, 3)) == [False, True]
    b.close()


def test_pages_are_layout_independent_and_readable_by_layer_range(
    redis_server: RedisServer, make_pool
) -> None:
    """Written from a layer_first pool, read into a page_head pool and by the runtime's
    tier API layer by layer."""
    src, dst = make_pool("layer_first"), make_pool("page_head")
    writer, reader = backend(redis_server.url, src), backend(redis_server.url, dst)
    keys = page_hashes(2)
    assert all(writer.batch_set_v1(keys, idx(2, 6)))
    assert all(reader.batch_get_v1(keys, idx(0, 1)))
    assert torch.equal(canonical_page_view(dst, 0), canonical_page_view(src, 8))
    assert torch.equal(canonical_page_view(dst, 4), canonical_page_view(src, 24))
    with RedisTier(redis_server.url) as tier:
        assert writer.ns is not None
        top = tier.get(writer.ns, keys[1], layers=(1, 3))
        assert top is not None and torch.equal(top, canonical_page_view(src, 24)[1:3])


def test_generic_interface_flat_pages(redis_server: RedisServer, make_pool) -> None:
    pool = make_pool("page_first")
    b = backend(redis_server.url, pool)
    keys = page_hashes(2)
    assert b.batch_set(keys, [pool.get_data_page(i * PAGE) for i in (3, 5)])
    assert b.exists(keys[0]) and not b.exists("nope")
    targets = [pool.get_dummy_flat_data_page() for _ in keys]
    got = b.batch_get(keys, targets)
    assert got[0] is targets[0] and got[1] is targets[1]
    for flat, i in zip(got, (3, 5), strict=True):
        assert flat is not None
        assert torch.equal(flat, pool.get_data_page(i * PAGE))
    assert b.get("nope", pool.get_dummy_flat_data_page()) is None
    new = page_hashes(1)[0]
    assert b.set(new, pool.get_data_page(8))
    out = b.get(new, pool.get_dummy_flat_data_page())
    assert out is not None and torch.equal(out, pool.get_data_page(8))


def test_stored_pages_are_not_written_again(redis_server: RedisServer, make_pool) -> None:
    # A key names its page's content: HiCache's write-through backs up every restored
    # prefix again, and only the pages the tier lacks are sent.
    pool = make_pool("page_first")
    b = backend(redis_server.url, pool)
    keys = page_hashes(4)
    assert b.batch_set_v1(keys[:2], idx(0, 1)) == [True, True]
    b.get_stats()  # drain
    assert b.batch_set_v1(keys, idx(0, 1, 2, 3)) == [True] * 4
    assert sum(b.get_stats().backup_pgs) == 2  # the two new ones
    with RedisTier(redis_server.url) as tier:  # a page gone (evicted, or corrupt and deleted)
        assert b.ns is not None and tier.delete(b.ns, keys[:1]) == 1
    assert b.batch_set([keys[0], keys[3]], [pool.get_data_page(i * PAGE) for i in (0, 3)])
    assert sum(b.get_stats().backup_pgs) == 1
    assert b.batch_exists(keys) == 4
    pool.kv_buffer.zero_()
    assert b.batch_get_v1(keys, idx(4, 5, 6, 7)) == [True] * 4


def test_tp_ranks_and_dtypes_do_not_share_pages(redis_server: RedisServer, make_pool) -> None:
    pool = make_pool("layer_first")
    rank0 = backend(redis_server.url, pool, tp_rank=0, tp_size=2)
    rank1 = backend(redis_server.url, pool, tp_rank=1, tp_size=2)
    fp16 = backend(redis_server.url, make_pool("layer_first", torch.float16), tp_rank=0, tp_size=2)
    keys = page_hashes(1)
    assert rank0.batch_set_v1(keys, idx(1)) == [True]
    assert rank1.batch_exists(keys) == 0 and fp16.batch_exists(keys) == 0
    assert rank1.batch_get_v1(keys, idx(2)) == [False]
    assert rank0.ns is not None and "tp0of2" in rank0.ns.prefix and "bf16" in rank0.ns.prefix
    # each rank's connections carry its name, so an operator (or a test) can tell them apart
    names = {c["name"] for c in rank0.tier.client.client_list()}
    assert {"sglang-cacheflow-tp0of2", "sglang-cacheflow-tp1of2"} <= names


def test_concurrent_prefetch_and_backup_threads(redis_server: RedisServer, make_pool) -> None:
    pool = make_pool("page_first")
    b = backend(redis_server.url, pool, streams=2)
    keys = page_hashes(6)
    want = {k: canonical_page_view(pool, i * PAGE).clone() for i, k in enumerate(keys)}
    assert all(b.batch_set_v1(keys, idx(*range(6))))
    errors: list[BaseException] = []

    def backup() -> None:
        try:
            for _ in range(15):
                assert all(b.batch_set_v1(keys[:3], idx(0, 1, 2)))
        except BaseException as e:
            errors.append(e)

    def prefetch(slot: int) -> None:
        try:
            for _ in range(15):
                assert all(b.batch_get_v1(keys[3:], idx(slot, slot + 1, slot + 2)))
                for j, k in enumerate(keys[3:]):
                    assert torch.equal(canonical_page_view(pool, (slot + j) * PAGE), want[k])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=backup), threading.Thread(target=prefetch, args=(8,))]
    threads.append(threading.Thread(target=prefetch, args=(12,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stats = b.get_stats()
    assert sum(stats.prefetch_pgs) == 2 * 15 * 3 and sum(stats.backup_pgs) == 6  # stored
    assert all(bw > 0 for bw in stats.prefetch_bandwidth)
    assert stats.tier["hits"] == 2 * 15 * 3 and stats.tier["corrupt"] == 0
    assert b.get_stats().prefetch_pgs == []  # drained on read, as SGLang expects


def test_clear_removes_only_this_rank(redis_server: RedisServer, make_pool) -> None:
    pool = make_pool("layer_first")
    a = backend(redis_server.url, pool, model="clear-test", tp_rank=0, tp_size=2)
    other = backend(redis_server.url, pool, model="clear-test", tp_rank=1, tp_size=2)
    keys = page_hashes(2)
    a.batch_set_v1(keys, idx(1, 2))
    other.batch_set_v1(keys, idx(1, 2))
    assert a.clear() is True
    assert a.batch_exists(keys) == 0 and other.batch_exists(keys) == 2


def test_configuration_errors_say_what_to_change(make_pool) -> None:
    cfg = storage_config("redis://x")
    assert cfg.extra_config is not None
    del cfg.extra_config["url"]
    with pytest.raises(ValueError, match='needs "url"'):
        RedisHiCacheStorage(cfg, {})
    with RedisServer() as s:
        port = s.port
    with pytest.raises(RedisTierError, match=f"cannot reach Redis at redis://127.0.0.1:{port}/0"):
        StorageBackendFactory.create_backend(
            "dynamic", storage_config(f"redis://127.0.0.1:{port}/0", connect_timeout_s=0.5), None
        )
    with RedisServer() as s:
        b = RedisHiCacheStorage(storage_config(s.url), {})
        with pytest.raises(ValueError, match="--hicache-mem-layout"):
            b.register_mem_pool_host(_FakeLayoutPool(make_pool("layer_first")))
        b.close()


class _FakeLayoutPool:
    """A real pool reporting a layout this backend does not read (page_unified)."""

    def __init__(self, pool: MHATokenToKVPoolHost) -> None:
        self.__dict__.update(pool.__dict__)
        self.layout = "page_unified"
        self.head_num = pool.head_num
