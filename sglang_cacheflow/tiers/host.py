"""Host-memory tier: a bounded pool of pages in process memory, least recently used out.

Pages are kept as contiguous layer-major tensors (copied in on put), so a layer-range
read is a slice copy with no decoding. Capacity is in bytes; a page larger than the
whole capacity is refused. This is the L2 the reference runtime restores from, and the
reference tier for tests of the Redis tier.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from sglang_cacheflow.tiers.base import KVTier, LayerRange, Namespace, TierStats, check_batch
from sglang_cacheflow.tiers.names import HOST_TIER

__all__ = ["HostTier"]


class HostTier(KVTier):
    """LRU pool of at most ``capacity_bytes`` of page data."""

    name = HOST_TIER

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self._pages: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._stats = TierStats()

    @property
    def stats(self) -> TierStats:
        return self._stats

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def __len__(self) -> int:
        with self._lock:
            return len(self._pages)

    def batch_put(
        self, ns: Namespace, page_hashes: Sequence[str], pages: Sequence[torch.Tensor]
    ) -> list[bool]:
        check_batch(ns, page_hashes, pages, None)
        size = ns.layout.page_bytes
        results = []
        for h, page in zip(page_hashes, pages, strict=True):
            if size > self.capacity_bytes:
                self._stats.add(put_failures=1)
                results.append(False)
                continue
            copy = torch.empty(page.shape, dtype=page.dtype)  # contiguous, owned by the tier
            copy.copy_(page)
            key = (ns.prefix, h)
            evicted = 0
            with self._lock:
                old = self._pages.pop(key, None)
                if old is not None:
                    self._used -= _nbytes(old)
                while self._used + size > self.capacity_bytes:
                    _, victim = self._pages.popitem(last=False)
                    self._used -= _nbytes(victim)
                    evicted += 1
                self._pages[key] = copy
                self._used += size
            self._stats.add(puts=1, put_bytes=size, evictions=evicted)
            results.append(True)
        return results

    def batch_get_into(
        self,
        ns: Namespace,
        page_hashes: Sequence[str],
        outs: Sequence[torch.Tensor],
        layers: LayerRange | None = None,
    ) -> list[bool]:
        l0, l1 = check_batch(ns, page_hashes, outs, layers)
        results = []
        for h, out in zip(page_hashes, outs, strict=True):
            with self._lock:
                page = self._pages.get((ns.prefix, h))
                if page is not None:
                    self._pages.move_to_end((ns.prefix, h))
            if page is None:
                self._stats.add(gets=1, misses=1)
                results.append(False)
                continue
            out.copy_(page[l0:l1])
            self._stats.add(gets=1, hits=1, get_bytes=(l1 - l0) * ns.layout.layer_bytes)
            results.append(True)
        return results

    def batch_exists(self, ns: Namespace, page_hashes: Sequence[str]) -> list[bool]:
        with self._lock:
            return [(ns.prefix, h) in self._pages for h in page_hashes]

    def delete(self, ns: Namespace, page_hashes: Sequence[str]) -> int:
        removed = 0
        with self._lock:
            for h in page_hashes:
                page = self._pages.pop((ns.prefix, h), None)
                if page is not None:
                    self._used -= _nbytes(page)
                    removed += 1
        return removed

    def clear(self) -> None:
        with self._lock:
            self._pages.clear()
            self._used = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
