"""The Redis L3 backend as ``--enable-cacheflow`` runs it.

:class:`CacheFlowRedisStorage` is :class:`~sglang_cacheflow.sglang.storage.RedisHiCacheStorage`
with two additions:

- ``"link"`` in the extra config (e.g. ``"1gbps+0.5ms"``) makes the tier behave like that
  link (:class:`~sglang_cacheflow.tiers.shaping.ShapedTier`), for benchmarks;
- every page read is timed and reported to the process's restore controller, which
  calibrates the L3 bandwidth and latency of its cost model from them.

A failed or corrupted page read comes back as a miss (the tier checks each record's checksum);
SGLang then prefetches only the pages before it and the request recomputes the rest.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig, HiCacheStorageExtraInfo

from sglang_cacheflow.sglang.storage import RedisHiCacheStorage
from sglang_cacheflow.tiers.names import L3_TIER
from sglang_cacheflow.tiers.redis import RedisTier
from sglang_cacheflow.tiers.shaping import LinkShape, ShapedTier

__all__ = ["CacheFlowRedisStorage"]


class CacheFlowRedisStorage(RedisHiCacheStorage):
    def __init__(
        self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None
    ) -> None:
        super().__init__(storage_config, kwargs)
        extra = storage_config.extra_config or {}
        self.redis_tier: RedisTier = self.tier
        self.link: LinkShape | None = None
        if extra.get("link"):
            self.link = LinkShape.parse(str(extra["link"]))
            self.tier = ShapedTier(self.redis_tier, self.link)  # type: ignore[assignment]

    def batch_get_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        start = time.perf_counter()
        ok = super().batch_get_v1(keys, host_indices, extra_info)
        self._report(sum(ok), time.perf_counter() - start)
        return ok

    def read_pages(
        self, keys: list[str], pages: torch.Tensor, layers: tuple[int, int] | None = None
    ) -> list[bool]:
        """Read ``keys`` into ``pages`` (pages, layers, 2, tokens, heads, dim), e.g. a split
        restore's staging memory, through the link the tier is seen through; only the layer
        range ``layers`` (default: all) is read. One bool per page (a missing or corrupted
        page is False). Timed for calibration like prefetches."""
        ns = self.ns
        if ns is None:
            raise RuntimeError("register_mem_pool_host() must be called before any I/O")
        start = time.perf_counter()
        ok = self.tier.batch_get_into(ns, keys, list(pages), layers)
        l0, l1 = ns.layout.check_layers(layers)
        self._report(sum(ok) * (l1 - l0) / ns.layout.num_layers, time.perf_counter() - start)
        return ok

    def _report(self, pages: float, seconds: float) -> None:
        from sglang_cacheflow.sglang.controller import current_controller

        ctl = current_controller()
        if ctl is not None and self.ns is not None:
            ctl.observe_transfer(L3_TIER, pages * self.ns.layout.page_bytes, seconds)

    def clear(self) -> bool:
        if self.ns is not None:
            self.redis_tier.clear(self.ns)
        return True

    def close(self) -> None:
        self.redis_tier.close()
