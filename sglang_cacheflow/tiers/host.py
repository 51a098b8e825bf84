"""Host-memory tier: a bounded pool of pages in process memory, least recently used out.

Pages are kept as contiguous layer-major tensors (copied in on put), so a layer-range
read is a slice copy with no decoding, or no copy at all (:meth:`HostTier.batch_views`).
With ``pin=True`` the pages live in page-locked memory, so a GPU copies them straight from
the tier by DMA, beside its compute. Capacity is in bytes; a page larger than the whole
capacity is refused. This is the L2 the reference runtime restores from, and the
reference tier for tests of the Redis tier.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from sglang_cacheflow.tiers.base import (
    KVTier,
    LayerRange,
    Namespace,
    TierStats,
    check_batch,
    check_page_hash,
)
from sglang_cacheflow.tiers.names import HOST_TIER

__all__ = ["HostTier"]


class HostTier(KVTier):
    """LRU pool of at most ``capacity_bytes`` of page data."""

    name = HOST_TIER

    def __init__(self, capacity_bytes: int, *, pin: bool = False) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        if pin and not torch.cuda.is_available():
            raise ValueError(
                "HostTier(pin=True) needs a CUDA device: page-locked pages only speed up "
                "copies to a GPU; leave pin off on a CPU-only machine"
            )
        self.capacity_bytes = int(capacity_bytes)
        self.pin = pin
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
            copy = ns.layout.empty(pin=self.pin)  # contiguous, owned by the tier
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
        views = self._views(ns, page_hashes, check_batch(ns, page_hashes, outs, layers))
        for out, view in zip(outs, views, strict=True):
            if view is not None:
                out.copy_(view)
        return [v is not None for v in views]

    def batch_views(
        self, ns: Namespace, page_hashes: Sequence[str], layers: LayerRange | None = None
    ) -> list[torch.Tensor | None]:
        for h in page_hashes:
            check_page_hash(h)
        return self._views(ns, page_hashes, ns.layout.check_layers(layers))

    def _views(
        self, ns: Namespace, page_hashes: Sequence[str], layers: tuple[int, int]
    ) -> list[torch.Tensor | None]:
        """The stored pages' layers ``[l0, l1)`` (arguments already checked)."""
        l0, l1 = layers
        views: list[torch.Tensor | None] = []
        for h in page_hashes:
            with self._lock:
                page = self._pages.get((ns.prefix, h))
                if page is not None:
                    self._pages.move_to_end((ns.prefix, h))
            if page is None:
                self._stats.add(gets=1, misses=1)
                views.append(None)
                continue
            self._stats.add(gets=1, hits=1, get_bytes=(l1 - l0) * ns.layout.layer_bytes)
            views.append(page[l0:l1])
        return views

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
