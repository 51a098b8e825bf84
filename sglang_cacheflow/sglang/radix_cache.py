"""``CacheFlowRadixCache``: SGLang's ``UnifiedRadixCache`` with planner-driven restores.

Registered as ``--radix-cache-backend cacheflow`` (``--enable-cacheflow`` selects it). It
changes two things, and only while the restore controller asks for them:

- :meth:`match_prefix` caps a request's host hit at the front the plan loads: it matches
  again with the key limited to ``device prefix + cap`` tokens, so the tree splits the host
  node there; SGLang's ``load_back`` then loads only that front (layer by layer, overlapped
  with the extend through ``LayerDoneCounter``) and the extend recomputes the rest;
- :meth:`prefetch_from_storage` hands L3 prefetches to the controller, which plans the
  requests that arrived together and issues each prefetch capped at the front it loads;
- :meth:`_handle_prefetch_result` holds the host pages of a prefetch the controller
  planned until its request is admitted: while the request waited for device room, host
  eviction took them (write-through backups of the running requests need host room) and the
  span was recomputed after the wait;
- :meth:`check_hicache_events` (once per scheduler step, before the next batch is chosen)
  first waits, a few milliseconds at most, for SGLang's prefetch thread to answer the hit
  queries of the prefetches just issued. SGLang starts a transfer only when this step drains
  its hit; drained a step late, it would wait for the whole next forward (the requests that
  recompute) while the link idles, which is exactly the overlap the plan counts on.

Everything else (eviction, write-through, backup to L3, load-back, prefetch threads) is
SGLang's own code, so the policies ``load`` and ``recompute`` run exactly HiCache's paths
with no cap and with every evicted span recomputed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from array import array
from typing import Any

import torch
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from sglang_cacheflow.sglang.controller import CacheFlowController

__all__ = ["CacheFlowRadixCache"]

logger = logging.getLogger("sglang_cacheflow.sglang")


class CacheFlowRadixCache(UnifiedRadixCache):
    """See the module doc; :attr:`cacheflow` is set by the backend factory."""

    cacheflow: CacheFlowController | None = None
    hit_query_wait_s = 0.02  # longest wait for the prefetch thread's hit queries
    _issued_hits = 0  # prefetches issued since the last drain
    _held: dict[str, tuple[Any, Any]] | None = None  # rid -> (host node, its lock's release)

    def check_hicache_events(self) -> None:
        cc = self.cache_controller
        queue = getattr(cc, "prefetch_hit_queue", None)
        if self._issued_hits and queue is not None:
            deadline = time.perf_counter() + self.hit_query_wait_s
            while queue.qsize() < self._issued_hits and time.perf_counter() < deadline:
                time.sleep(0.0002)
        self._issued_hits = 0
        super().check_hicache_events()

    # -- host hits -----------------------------------------------------------------------

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        ctl = self.cacheflow
        req = params.req
        if ctl is None or req is None or not ctl.host_caps:
            return result
        limit = ctl.host_limit(req.rid, result.device_prefix_len)
        hit_end = result.device_prefix_len + result.host_hit_length
        if limit is None or hit_end <= limit or params.key.is_bigram:
            return result
        key = params.key
        if key.limit is not None:
            limit = min(limit, key.limit)
        capped = RadixKey(key.token_ids, key.extra_key, limit=limit, cache_salt=key.cache_salt)
        return super().match_prefix(dataclasses.replace(params, key=capped))

    def prefix_device_indices(self, req: Any) -> Any:
        """The KV slots of ``req``'s prefix: its tree match, then the slots of a front load
        being admitted (the controller's, streamed into its extend; SGLang appends an external
        linker's private slots the same way)."""
        ctl = self.cacheflow
        tail = ctl.front_slots.get(req.rid) if ctl is not None else None
        if tail is None:
            return super().prefix_device_indices(req)
        root = self.root_node_handle(req.extra_key)
        path = self.tree_core.collect_full_device_indices(req.last_node, root)
        return torch.cat([path, tail.to(path.dtype)])[: req.prefix_len]

    # -- L3 hits -------------------------------------------------------------------------

    def prefetch_from_storage(  # type: ignore[override]
        self,
        request: Any,
        last_host_node_id: Any,
        new_input_tokens: Any,
        last_hash: str | None = None,
        prefix_keys: list[str] | None = None,
        matched_prefix_tokens: Any = None,
        extra_key: str | None = None,
        cache_salt: str | None = None,
        storage_hit_end: int | None = None,
    ) -> bool | None:
        call = {
            "request": request,
            "last_host_node_id": last_host_node_id,
            "new_input_tokens": new_input_tokens,
            "last_hash": last_hash,
            "prefix_keys": prefix_keys,
            "matched_prefix_tokens": matched_prefix_tokens,
            "extra_key": extra_key,
            "cache_salt": cache_salt,
            "storage_hit_end": storage_hit_end,
        }
        ctl = self.cacheflow
        if ctl is None or not self.enable_storage or self.cache_controller is None:
            return self.cacheflow_issue_prefetch(call)
        ctl.on_prefetch(call)
        return None

    def _handle_prefetch_result(self, operation: Any) -> None:
        ctl = self.cacheflow
        rid = operation.handle.rid
        if ctl is None or not ctl.holds_prefetch(rid):
            return super()._handle_prefetch_result(operation)
        # the host node the prefetch inserts: SGLang's insert result names it, and this
        # method has no other way to it than the tree core's call
        core, inserted = self.tree_core, []
        insert_host = core.insert_host

        def recorded(*args: Any, **kwargs: Any) -> Any:
            result = insert_host(*args, **kwargs)
            inserted.append(result)
            return result

        core.insert_host = recorded
        try:
            super()._handle_prefetch_result(operation)
        finally:
            del core.insert_host
        node = next((r.inserted_host_node for r in inserted if not r.host_insert_dropped), None)
        if node is not None:
            if self._held is None:
                self._held = {}
            self.cacheflow_release_prefetch(rid)
            self._held[rid] = (node, self.inc_host_lock_ref(node).to_dec_params())
            ctl.metrics.prefetch_hold("held")

    def cacheflow_release_prefetch(self, rid: str) -> None:
        """Let host eviction have ``rid``'s prefetched pages again (admitted, or gone)."""
        held = self._held.pop(rid, None) if self._held else None
        if held is not None:
            self.dec_host_lock_ref(*held)
            if self.cacheflow is not None:
                self.cacheflow.metrics.prefetch_hold("released")

    def cacheflow_issue_prefetch(self, call: dict[str, Any]) -> bool | None:
        """SGLang's own prefetch of ``call`` (possibly capped by the controller)."""
        known = call["request"] in self.ongoing_prefetch
        out = UnifiedRadixCache.prefetch_from_storage(self, **call)
        if not known and call["request"] in self.ongoing_prefetch:  # a hit query is under way
            self._issued_hits += 1
        return out

    def cacheflow_storage_hit(self, call: dict[str, Any]) -> tuple[int, list[str]] | None:
        """Tokens of ``call``'s span this rank's L3 holds (a prefix of whole pages) and the
        storage keys of those pages, or None when SGLang would not look it up (too short,
        rate limited, already in flight)."""
        request = call["request"]
        controller = self.cache_controller
        if (
            controller is None
            or request in self.ongoing_prefetch
            or controller.get_prefetch_submission(request.rid) is not None
            or controller.prefetch_rate_limited()
            or self.host_memory_mode == "buffer_only"
        ):
            return None
        key = RadixKey(
            array("q", call["new_input_tokens"]),
            extra_key=call["extra_key"],
            is_bigram=self.tree_core.is_eagle,
            cache_salt=call["cache_salt"],
        ).page_aligned(self.page_size)
        if len(key) < self.prefetch_threshold:
            return None
        from sglang.srt.mem_cache.unified_radix_cache import (
            CacheRequestHandle,
            PrefetchOperation,
        )

        handle = CacheRequestHandle("__cacheflow_query__", 0)
        op = PrefetchOperation(handle, key, call["last_hash"], call["prefix_keys"])
        # The Redis tier answers "not there" when it cannot be reached and counts an error:
        # that is a fallback to recompute, not a plain miss.
        tier = getattr(getattr(controller, "storage_backend", None), "redis_tier", None)
        errors = tier.stats.errors if tier is not None else 0
        try:
            keys, hit = controller._storage_hit_query(op)
            failed = tier is not None and tier.stats.errors > errors
        except Exception:
            logger.exception("cacheflow: L3 lookup failed for rid=%s", request.rid)
            keys, hit, failed = [], 0, True
        hit = int(hit) - int(hit) % self.page_size
        if failed and self.cacheflow is not None:
            self.cacheflow.lookup_failed(request.rid, len(key) - hit)
        return hit, list(keys[: hit // self.page_size])

    def cacheflow_staged_load(self) -> tuple[int, int] | None:
        """``(smallest, largest)`` L3 load SGLang's prefetch stages now: it prefetches no
        fewer than ``prefetch_threshold`` tokens, into host memory. The largest is the host
        pool's free slots: what host eviction could free besides, SGLang's tree core does not
        tell, so a load it could have staged by evicting is split or recomputed instead. None
        without a host pool."""
        pool = getattr(self.cache_controller, "mem_pool_host", None)
        if pool is None:
            return None
        room = int(pool.available_size())
        return int(self.prefetch_threshold), room - room % self.page_size

    # -- split restores ------------------------------------------------------------------

    def cacheflow_storage(self) -> Any:
        """The project's L3 backend of this process
        (:class:`~sglang_cacheflow.sglang.storage.CacheFlowRedisStorage`), or None."""
        backend = getattr(self.cache_controller, "storage_backend", None)
        if backend is None or getattr(backend, "ns", None) is None:
            return None
        return backend if hasattr(backend, "read_pages") else None

    def cacheflow_host_pages(self, node: Any) -> tuple[Any, Any] | None:
        """(host KV pool, host token indices) of the evicted path that ends at ``node``, from
        its device ancestor on: where a host hit's KV is."""
        pool = getattr(self.cache_controller, "mem_pool_host", None)
        # a group of host pools (KV and auxiliary state): the KV pool is its anchor
        pool = getattr(getattr(pool, "anchor_entry", None), "host_pool", pool)
        if pool is None or not hasattr(pool, "get_data_page"):
            return None
        try:
            transfer = self.tree_core.build_load_back_spec(node)[0]
        except Exception:
            logger.exception("cacheflow: no host pages for a split restore")
            return None
        if transfer is None or transfer.host_indices is None:
            return None
        return pool, transfer.host_indices
