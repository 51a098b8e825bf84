"""KV tiers the runtime and planner restore from: host memory, Redis (single node and
Cluster), the page record format, and link emulation for benchmarks.

``RedisTier`` needs the ``tiers`` extra (redis-py with hiredis, xxhash); it is imported
lazily so the host tier works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sglang_cacheflow.tiers.base import KVTier, LayerRange, Namespace, TierStats
from sglang_cacheflow.tiers.host import HostTier
from sglang_cacheflow.tiers.page import SHAPES, CorruptRecordError, PageLayout
from sglang_cacheflow.tiers.shaping import LinkShape, ShapedTier

if TYPE_CHECKING:
    from sglang_cacheflow.tiers.redis import RedisTier, RedisTierConfig, RedisTierError

__all__ = [
    "SHAPES",
    "CorruptRecordError",
    "HostTier",
    "KVTier",
    "LayerRange",
    "LinkShape",
    "Namespace",
    "PageLayout",
    "RedisTier",
    "RedisTierConfig",
    "RedisTierError",
    "ShapedTier",
    "TierStats",
]


def __getattr__(name: str) -> Any:
    if name in ("RedisTier", "RedisTierConfig", "RedisTierError"):
        from sglang_cacheflow.tiers import redis as _redis

        return getattr(_redis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
