"""What an admitted L3 restore counts as loaded: what reached the device, not what was
prefetched."""

from __future__ import annotations

from types import SimpleNamespace

from sglang_cacheflow.sglang.accounting import RestoreAccounting
from sglang_cacheflow.sglang.decision import Decision
from sglang_cacheflow.sglang.metrics import RestoreMetrics


class _Recorded(RestoreMetrics):
    """The restore metrics, recorded in plain containers instead of Prometheus counters."""

    def __init__(self) -> None:
        super().__init__(False)
        self.tokens: dict[tuple[str, str], int] = {}
        self.fallbacks: list[tuple[str, int]] = []

    def restored(self, action: str, tier: str, tokens: int) -> None:
        self.tokens[action, tier] = self.tokens.get((action, tier), 0) + tokens

    def fallback(self, reason: str, tier: str, tokens: int) -> None:
        self.fallbacks.append((reason, tokens))


def _admitted(prefetched: int, loaded_back: int) -> _Recorded:
    metrics = _Recorded()
    d = Decision("r", "redis", 0.0, 1.0, 272, 272, "load all", {})
    req = SimpleNamespace(rid="r", storage_hit_length=prefetched, host_loaded_length=loaded_back)
    RestoreAccounting(metrics, lambda *a: None).l3_admitted(d, req, tier_faulted=False)
    return metrics


def test_a_prefetch_loaded_back_whole_counts_as_loaded() -> None:
    m = _admitted(272, 272)
    assert m.tokens == {("load", "redis"): 272, ("load", "host"): 0, ("recompute", "redis"): 0}
    assert m.fallbacks == []


def test_prefetched_pages_evicted_before_admission_count_as_recomputed() -> None:
    # the request waited for room in the device pool; its prefetched pages left host memory
    m = _admitted(272, 0)
    assert m.tokens == {("load", "redis"): 0, ("load", "host"): 0, ("recompute", "redis"): 272}
    assert m.fallbacks == [("l3_prefetch_declined", 272)]
    part = _admitted(272, 128)
    assert part.tokens[("load", "redis")] == 128 and part.tokens[("recompute", "redis")] == 144
