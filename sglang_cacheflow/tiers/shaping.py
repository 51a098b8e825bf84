"""Link emulation for benchmarks: make any tier behave like a slower link.

:class:`ShapedTier` wraps a tier and holds every call back until an *emulated* link with
the given bandwidth and per-call latency would have finished it, the way the Cake and
CacheFlow papers emulated 10-100 Gbps networks and SSDs. The link is full duplex and shared:
concurrent reads queue for the read direction's bandwidth, concurrent writes for the write
direction's, and latencies overlap. Calls that move no page bytes (lookups, deletes) pay
the latency only: a small request is not stuck behind a bulk transfer on a real network.
The wrapper can only slow a tier down; when the inner tier is slower than the emulated link,
the inner time shows.
Results measured through it are emulation results and are labelled so
(:attr:`ShapedTier.name`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglang_cacheflow.tiers.base import KVTier, LayerRange, Namespace, TierStats

__all__ = ["LinkShape", "ShapedTier"]


@dataclass(frozen=True)
class LinkShape:
    """An emulated link: ``bandwidth_bytes_per_s`` and a fixed ``latency_s`` per call."""

    bandwidth_bytes_per_s: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.bandwidth_bytes_per_s <= 0:
            raise ValueError(f"bandwidth must be positive, got {self.bandwidth_bytes_per_s}")
        if self.latency_s < 0:
            raise ValueError(f"latency must be >= 0, got {self.latency_s}")

    @classmethod
    def gbps(cls, gigabits_per_s: float, latency_ms: float = 0.0) -> LinkShape:
        """A network link in Gbit/s (10 Gbps = 1.25 GB/s), latency in ms."""
        return cls(gigabits_per_s * 1e9 / 8, latency_ms / 1e3)

    @classmethod
    def parse(cls, text: str) -> LinkShape:
        """``"10gbps"``, ``"25gbps+0.2ms"``, ``"3GB/s+0.08ms"`` (an NVMe SSD)."""
        spec = text.strip().lower().replace(" ", "")
        bw_part, _, lat_part = spec.partition("+")
        latency = 0.0
        if lat_part:
            if not lat_part.endswith("ms"):
                raise ValueError(f"latency in {text!r} must be in ms, e.g. '+0.1ms'")
            latency = float(lat_part[:-2]) / 1e3
        for suffix, scale in (("gbps", 1e9 / 8), ("mbps", 1e6 / 8), ("gb/s", 1e9), ("mb/s", 1e6)):
            if bw_part.endswith(suffix):
                return cls(float(bw_part[: -len(suffix)]) * scale, latency)
        raise ValueError(
            f"cannot read link {text!r}; write e.g. '10gbps', '25gbps+0.2ms' or '3GB/s+0.08ms'"
        )

    def describe(self) -> str:
        return f"{self.bandwidth_bytes_per_s * 8 / 1e9:g} Gbps + {self.latency_s * 1e3:g} ms"


class ShapedTier(KVTier):
    """``inner`` seen through an emulated :class:`LinkShape`."""

    def __init__(self, inner: KVTier, link: LinkShape) -> None:
        self.inner = inner
        self.link = link
        self.name = f"emulated[{link.describe()}]({inner.name})"
        self._lock = threading.Lock()
        self._free_at = {"read": 0.0, "write": 0.0}  # when each direction has carried its queue

    @property
    def stats(self) -> TierStats:
        return self.inner.stats

    def close(self) -> None:
        self.inner.close()

    def _hold(self, start: float, nbytes: int, direction: str) -> None:
        """Sleep until the emulated link has carried ``nbytes`` in ``direction`` for a call
        begun at ``start`` (after the bytes of calls queued before it)."""
        deadline = start + self.link.latency_s
        if nbytes > 0:
            with self._lock:
                begin = max(deadline, self._free_at[direction])
                deadline = begin + nbytes / self.link.bandwidth_bytes_per_s
                self._free_at[direction] = deadline
        delay = deadline - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

    def batch_put(
        self, ns: Namespace, page_hashes: Sequence[str], pages: Sequence[torch.Tensor]
    ) -> list[bool]:
        start = time.perf_counter()
        ok = self.inner.batch_put(ns, page_hashes, pages)
        self._hold(start, len(pages) * ns.layout.page_bytes, "write")
        return ok

    def batch_get_into(
        self,
        ns: Namespace,
        page_hashes: Sequence[str],
        outs: Sequence[torch.Tensor],
        layers: LayerRange | None = None,
    ) -> list[bool]:
        start = time.perf_counter()
        ok = self.inner.batch_get_into(ns, page_hashes, outs, layers)
        l0, l1 = ns.layout.check_layers(layers)
        self._hold(start, sum(ok) * (l1 - l0) * ns.layout.layer_bytes, "read")
        return ok

    def batch_views(
        self, ns: Namespace, page_hashes: Sequence[str], layers: LayerRange | None = None
    ) -> list[torch.Tensor | None] | None:
        start = time.perf_counter()
        views = self.inner.batch_views(ns, page_hashes, layers)
        if views is not None:
            hits = sum(v is not None for v in views)
            l0, l1 = ns.layout.check_layers(layers)
            self._hold(start, hits * (l1 - l0) * ns.layout.layer_bytes, "read")
        return views

    def batch_exists(self, ns: Namespace, page_hashes: Sequence[str]) -> list[bool]:
        start = time.perf_counter()
        out = self.inner.batch_exists(ns, page_hashes)
        self._hold(start, 0, "read")
        return out

    def delete(self, ns: Namespace, page_hashes: Sequence[str]) -> int:
        start = time.perf_counter()
        n = self.inner.delete(ns, page_hashes)
        self._hold(start, 0, "read")
        return n
