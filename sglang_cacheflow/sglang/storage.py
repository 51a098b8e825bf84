"""Redis as an SGLang 0.5.23 HiCache L3 backend (``RedisHiCacheStorage``), no patch needed,
and the variant ``--enable-cacheflow`` runs (``CacheFlowRedisStorage``).

Select it with SGLang's ``dynamic`` backend::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
      '{"backend_name":"redis","module_path":"sglang_cacheflow.sglang.storage",
        "class_name":"RedisHiCacheStorage","url":"redis://127.0.0.1:6379/0"}'

Every other key of that JSON that :class:`~sglang_cacheflow.tiers.redis.RedisTierConfig`
knows (``streams``, ``ttl_s``, ``block_bytes``, ``layers_per_block``, ``pipeline_bytes``,
``cluster``...) is passed to the Redis tier; ``model`` overrides the model name in keys.

Pages are stored in the tier's layer-major record format whatever the host pool's layout
(``layer_first``, ``page_first``, ``page_first_direct``, ``page_head``), so servers with
different host layouts share pages, and the runtime can read them by layer range. Keys carry
the model, page shape, dtype, TP rank and size (and PP stage). The zero-copy ``batch_get_v1``
/ ``batch_set_v1`` methods read and write the host pool's memory directly (one copy between
the Redis reply and the pool); the backend turns them on by setting ``interface_v1`` in the
extra config unless the user set it. MHA host pools only (MLA pools are refused with an
error at registration).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from sglang_cacheflow.tiers.base import Namespace
from sglang_cacheflow.tiers.names import L3_TIER
from sglang_cacheflow.tiers.page import PageLayout
from sglang_cacheflow.tiers.probe import ClientCpu, probe_read_cpu
from sglang_cacheflow.tiers.redis import RedisTier, RedisTierConfig
from sglang_cacheflow.tiers.shaping import LinkShape, ShapedTier

__all__ = ["CacheFlowRedisStorage", "RedisHiCacheStorage", "canonical_page_view"]

logger = logging.getLogger(__name__)

# Host pool layouts -> (shape of one pool page as get_data_page(flat=False) gives it,
# permutation of that shape to the tier's (layers, K/V, tokens, heads, dim)).
_SUPPORTED_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")


def _pool_page_shape(layout: str, lay: PageLayout) -> tuple[int, ...]:
    L, T, H, D = lay.num_layers, lay.page_tokens, lay.kv_heads, lay.head_dim
    return {
        "layer_first": (2, L, T, H, D),
        "page_first": (2, T, L, H, D),
        "page_first_direct": (2, 1, L, T, H, D),
        "page_head": (2, 1, H, T, L, D),
    }[layout]


def _to_canonical(layout: str, page: torch.Tensor) -> torch.Tensor:
    """View of a pool-shaped page as (layers, 2, tokens, heads, dim); no copy."""
    if layout == "layer_first":
        return page.permute(1, 0, 2, 3, 4)
    if layout == "page_first":
        return page.permute(2, 0, 1, 3, 4)
    if layout == "page_first_direct":
        return page[:, 0].permute(1, 0, 2, 3, 4)
    if layout == "page_head":
        return page[:, 0].permute(3, 0, 2, 1, 4)
    raise ValueError(f"unsupported host pool layout {layout!r}")


def canonical_page_view(pool: Any, index: int) -> torch.Tensor:
    """The page of ``pool`` (an SGLang MHA host pool) that starts at token ``index``, as a
    (layers, 2, tokens, heads, dim) view of the pool's own memory."""
    return _to_canonical(pool.layout, pool.get_data_page(index, flat=False))


class RedisHiCacheStorage(HiCacheStorage):
    """HiCache L3 storage on the Redis tier (single server or Redis Cluster). Thread-safe:
    SGLang's prefetch and backup threads call it concurrently."""

    def __init__(
        self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None
    ) -> None:
        extra = storage_config.extra_config
        if extra is None or "url" not in extra:
            raise ValueError(
                'RedisHiCacheStorage needs "url" in --hicache-storage-backend-extra-config, '
                'e.g. {"backend_name":"redis","module_path":"sglang_cacheflow.sglang.storage",'
                '"class_name":"RedisHiCacheStorage","url":"redis://127.0.0.1:6379/0"}'
            )
        self.storage_config = storage_config
        # one name per rank: `CLIENT LIST` tells which rank a connection serves
        rank = f"tp{storage_config.tp_rank}of{storage_config.tp_size}"
        options = {"client_name": f"sglang-cacheflow-{rank}", **extra}
        self.tier = RedisTier(RedisTierConfig.from_dict(options))
        # The cache controller picks the zero-copy v1 path from this key after construction.
        extra.setdefault("interface_v1", 1)
        self.model = str(extra.get("model") or storage_config.model_name or "model")
        self.is_mla = storage_config.is_mla_model
        self.ns: Namespace | None = None
        self.pool_layout: str | None = None
        self._metrics_lock = threading.Lock()
        self._prefetch_pgs: list[int] = []
        self._backup_pgs: list[int] = []
        self._prefetch_bw: list[float] = []
        self._backup_bw: list[float] = []
        logger.info("Redis HiCache storage at %s (cluster=%s)", self.tier.url, self.tier.is_cluster)

    # -- registration --------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        layout = getattr(mem_pool_host, "layout", None)
        if self.is_mla or not hasattr(mem_pool_host, "head_num"):
            raise ValueError(
                f"RedisHiCacheStorage supports MHA/GQA host pools; got "
                f"{type(mem_pool_host).__name__} (MLA pools are not supported yet)"
            )
        if layout not in _SUPPORTED_LAYOUTS:
            raise ValueError(
                f"RedisHiCacheStorage does not support host layout {layout!r}; use "
                f"--hicache-mem-layout with one of {', '.join(_SUPPORTED_LAYOUTS)}"
            )
        if mem_pool_host.v_head_dim != mem_pool_host.head_dim:
            raise ValueError(
                f"K and V head dims differ ({mem_pool_host.head_dim} vs "
                f"{mem_pool_host.v_head_dim}); the Redis page format needs them equal"
            )
        cfg = self.storage_config
        page_layout = PageLayout(
            num_layers=mem_pool_host.layer_num,
            page_tokens=mem_pool_host.page_size,
            kv_heads=mem_pool_host.head_num,
            head_dim=mem_pool_host.head_dim,
            dtype=mem_pool_host.dtype,
        )
        self.ns = Namespace(
            self.model, page_layout, cfg.tp_rank, cfg.tp_size, cfg.pp_rank, cfg.pp_size
        )
        self.pool_layout = layout
        logger.info("Redis HiCache storage keys: %s:{page hash}:<block>", self.ns.prefix)

    def _require_ns(self) -> Namespace:
        if self.ns is None:
            raise RuntimeError("register_mem_pool_host() must be called before any I/O")
        return self.ns

    def _flat_to_canonical(self, flat: torch.Tensor) -> torch.Tensor:
        ns = self._require_ns()
        assert self.pool_layout is not None
        shape = _pool_page_shape(self.pool_layout, ns.layout)
        return _to_canonical(self.pool_layout, flat.reshape(shape))

    def _pool_pages(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[torch.Tensor]:
        page = self.mem_pool_host.page_size
        if host_indices.numel() != len(keys) * page:
            raise ValueError(
                f"{len(keys)} keys need {len(keys) * page} host indices, got {host_indices.numel()}"
            )
        starts = host_indices[::page].tolist()
        return [canonical_page_view(self.mem_pool_host, int(i)) for i in starts]

    def _timed(
        self, pages: list[int], bws: list[float], n: int, fn: Callable[[], list[bool]]
    ) -> list[bool]:
        start = time.perf_counter()
        ok = fn()
        elapsed = max(time.perf_counter() - start, 1e-9)
        if self.storage_config.enable_storage_metrics:
            done = sum(ok)
            gb = done * self._require_ns().layout.page_bytes / 1e9
            with self._metrics_lock:
                pages.append(n)
                bws.append(gb / elapsed)
        return ok

    # -- zero-copy interface -------------------------------------------------------------
    def batch_get_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        ns = self._require_ns()
        try:
            outs = self._pool_pages(keys, host_indices)
        except ValueError as e:
            logger.error("Redis HiCache batch_get_v1: %s", e)
            return [False] * len(keys)
        return self._timed(
            self._prefetch_pgs, self._prefetch_bw, len(keys),
            lambda: self.tier.batch_get_into(ns, keys, outs),
        )  # fmt: skip

    def batch_set_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        ns = self._require_ns()
        try:
            pages = self._pool_pages(keys, host_indices)
        except ValueError as e:
            logger.error("Redis HiCache batch_set_v1: %s", e)
            return [False] * len(keys)
        return self._put_unstored(ns, keys, pages)

    def _put_unstored(
        self, ns: Namespace, keys: list[str], pages: list[torch.Tensor]
    ) -> list[bool]:
        """Write the pages of ``keys`` the tier does not hold yet; one bool per key. A key
        names its page's content (SGLang hashes the token prefix), so a stored page is not
        written again: HiCache backs up every node its write-through creates, and a restored
        prefix is such a node, so each restore wrote its whole prefix again. A page that
        failed its checksum was deleted when it was read, and is written again."""
        ok = [bool(x) for x in self.tier.batch_exists(ns, keys)]  # False where unknown
        todo = [i for i, stored in enumerate(ok) if not stored]
        if not todo:
            return ok
        put = self._timed(
            self._backup_pgs, self._backup_bw, len(todo),
            lambda: self.tier.batch_put(ns, [keys[i] for i in todo], [pages[i] for i in todo]),
        )  # fmt: skip
        for i, done in zip(todo, put, strict=True):
            ok[i] = done
        return ok

    # -- generic interface (flat pages in the host pool's layout) ------------------------
    def get(
        self,
        key: str,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> torch.Tensor | None:
        return self.batch_get([key], [target_location])[0]

    def batch_get(
        self,
        keys: list[str],
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> list[torch.Tensor | None]:
        ns = self._require_ns()
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        targets = [
            t if t is not None else self.mem_pool_host.get_dummy_flat_data_page() for t in targets
        ]
        outs = [self._flat_to_canonical(t) for t in targets]
        ok = self._timed(
            self._prefetch_pgs, self._prefetch_bw, len(keys),
            lambda: self.tier.batch_get_into(ns, keys, outs),
        )  # fmt: skip
        return [t if hit else None for t, hit in zip(targets, ok, strict=True)]

    def set(
        self,
        key: str,
        value: Any | None = None,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        page = value if value is not None else target_location
        if page is None:
            raise ValueError("RedisHiCacheStorage.set needs a value (a flat host page)")
        return self.batch_set([key], [page])

    def batch_set(
        self,
        keys: list[str],
        values: Any | None = None,
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        ns = self._require_ns()
        flat = values if values is not None else target_locations
        if flat is None or len(flat) != len(keys):
            raise ValueError(f"batch_set needs one flat page per key ({len(keys)} keys)")
        return all(self._put_unstored(ns, keys, [self._flat_to_canonical(v) for v in flat]))

    def exists(self, key: str) -> bool:
        return self.tier.exists(self._require_ns(), key)

    def batch_exists(
        self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        found = self.tier.batch_exists(self._require_ns(), keys)
        return found.index(False) if False in found else len(found)

    # -- housekeeping --------------------------------------------------------------------
    def clear(self) -> bool:
        """Delete this rank's pages of this model (other models and ranks are untouched)."""
        if self.ns is not None:
            self.tier.clear(self.ns)
        return True

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` (pages and GB/s per batch since the last call), with
        the tier's counters (hits, misses, corrupt, errors...) as ``tier``."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        with self._metrics_lock:
            metrics = StorageMetrics(
                prefetch_pgs=self._prefetch_pgs,
                backup_pgs=self._backup_pgs,
                prefetch_bandwidth=self._prefetch_bw,
                backup_bandwidth=self._backup_bw,
            )
            self._prefetch_pgs, self._backup_pgs = [], []
            self._prefetch_bw, self._backup_bw = [], []
        metrics.tier = self.tier.stats.snapshot()  # type: ignore[attr-defined]
        return metrics

    def close(self) -> None:
        self.tier.close()


class CacheFlowRedisStorage(RedisHiCacheStorage):
    """The backend as ``--enable-cacheflow`` runs it: :class:`RedisHiCacheStorage` with

    - ``"link"`` in the extra config (e.g. ``"1gbps+0.5ms"``): the tier behaves like that
      link (:class:`~sglang_cacheflow.tiers.shaping.ShapedTier`), for benchmarks;
    - every prefetch timed and reported to the process's restore controller, which
      calibrates the L3 bandwidth and latency of its cost model from them;
    - :meth:`read_pages`: ranged reads into a split restore's staging memory;
    - ``read_cpu``: what a read costs this process's CPU, per call and per page, measured by
      a probe read at registration (:mod:`~sglang_cacheflow.tiers.probe`).

    A failed or corrupted page read comes back as a miss (the tier checks each record's
    checksum); SGLang then prefetches only the pages before it and the request recomputes
    the rest.
    """

    def __init__(
        self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None
    ) -> None:
        super().__init__(storage_config, kwargs)
        extra = storage_config.extra_config or {}
        self.redis_tier: RedisTier = self.tier
        self.read_cpu: ClientCpu | None = None  # measured at registration
        self.link: LinkShape | None = None
        if extra.get("link"):
            self.link = LinkShape.parse(str(extra["link"]))
            self.tier = ShapedTier(self.redis_tier, self.link)  # type: ignore[assignment]

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        # the process is idle while SGLang builds its caches: what a read costs its CPU
        self.read_cpu = probe_read_cpu(self.redis_tier, self._require_ns())

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
        page is False). Not timed here: a split restore reads its pages in several calls
        and reports the whole read as one transfer, the unit the planner prices."""
        ns = self.ns
        if ns is None:
            raise RuntimeError("register_mem_pool_host() must be called before any I/O")
        return self.tier.batch_get_into(ns, keys, list(pages), layers)

    def _report(self, pages: float, seconds: float) -> None:
        from sglang_cacheflow.sglang.controller import current_controller

        ctl = current_controller()
        if ctl is not None and self.ns is not None:
            ctl.costs.observe_transfer(L3_TIER, pages * self.ns.layout.page_bytes, seconds)

    def clear(self) -> bool:
        if self.ns is not None:
            self.redis_tier.clear(self.ns)
        return True

    def close(self) -> None:
        self.redis_tier.close()
