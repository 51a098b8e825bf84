"""What each planned restore actually restored, against its plan: the project's metrics on
SGLang's ``/metrics`` and the log lines an operator reads.

The controller decides; this module counts the outcome. A restore is counted once, where its
result is known: at admission for a load-front restore (what SGLang's ``load_back`` or
prefetch brought in), at the splice for a split restore, and its time at its first forward.
Tokens a tier did not deliver are counted as recomputed, with the reason (a tier fault, or
SGLang fetching less than planned).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sglang_cacheflow.planner import Request
from sglang_cacheflow.sglang.decision import Decision
from sglang_cacheflow.sglang.metrics import RestoreMetrics
from sglang_cacheflow.sglang.split import SplitRestore
from sglang_cacheflow.tiers.names import HOST_TIER, L3_TIER

logger = logging.getLogger("sglang_cacheflow.sglang")


class RestoreAccounting:
    """Counts restores on ``metrics``; ``log`` is the decision log (info or debug)."""

    def __init__(self, metrics: RestoreMetrics, log: Callable[..., None]) -> None:
        self.metrics = metrics
        self._log = log

    def host_admitted(self, d: Decision, req: Any) -> None:
        """A host-hit restore admitted with its front capped: ``load_back`` loaded what
        ``req.host_loaded_length`` says, the extend recomputes the rest."""
        loaded = min(req.host_loaded_length, d.evicted)
        self.metrics.restored("load", HOST_TIER, loaded)
        self.metrics.restored("recompute", HOST_TIER, d.evicted - loaded)
        if loaded < d.planned_load:
            self.metrics.fallback("host_load_declined", HOST_TIER, d.planned_load - loaded)

    def l3_admitted(self, d: Decision, req: Any, tier_faulted: bool) -> None:
        """An L3 restore admitted after its prefetch: SGLang's ``storage_hit_length`` came
        from L3, the rest of the host pages from host memory. Only what ``load_back`` then
        loaded counts: a request that waited for room in the device pool can find its
        prefetched pages evicted from host memory and recompute them."""
        prefetched = int(getattr(req, "storage_hit_length", 0) or 0)
        from_l3 = min(prefetched, req.host_loaded_length, d.evicted)
        self.metrics.restored("load", L3_TIER, from_l3)
        self.metrics.restored("load", HOST_TIER, max(0, req.host_loaded_length - from_l3))
        self.metrics.restored("recompute", L3_TIER, d.evicted - from_l3)
        if from_l3 < d.planned_load:
            # Without a tier fault since the plan, SGLang itself fetched less (host memory for
            # prefetches ran short, or its prefetch policy stopped waiting).
            reason = "l3_short" if tier_faulted else "l3_prefetch_declined"
            self.metrics.fallback(reason, L3_TIER, d.planned_load - from_l3)
            (logger.warning if tier_faulted else logger.info)(
                "cacheflow: rid=%s got %d of the %d tokens planned from %s (%s); "
                "recomputing the rest", req.rid, from_l3, d.planned_load, L3_TIER, reason,
            )  # fmt: skip

    def spliced(
        self, d: Decision, sp: SplitRestore, got: int, waited_s: float, reason: str | None,
        streamed: bool = False,
    ) -> None:  # fmt: skip
        """A split restore's loaded part was spliced (``streamed``: streamed into the
        extend): ``got`` of its tokens landed."""
        share = sp.layer_share  # a layer split loads a share of each token
        self.metrics.restored("load", sp.tier, got * share)
        self.metrics.restored("recompute", sp.tier, d.evicted - got * share)
        l0, l1 = sp.layers
        self._log(
            "cacheflow split rid=%s: %s; loaded %s%d of the %d planned tokens from %s (read "
            "%.2f ms, waited %.2f ms %s)", d.rid, d.shape,
            f"layers [{l0}, {l1}) of " if sp.layer_split else "", got, sp.tokens, sp.tier,
            sp.read_s * 1e3, waited_s * 1e3, _where(sp, streamed),
        )  # fmt: skip
        if got < sp.tokens:
            self.metrics.fallback(reason or "split_short", sp.tier, sp.tokens - got)
            logger.warning(
                "cacheflow: rid=%s got %d of the %d tokens planned from %s (%s: %s); "
                "recomputing the rest", d.rid, got, sp.tokens, sp.tier, reason, sp.error,
            )  # fmt: skip

    def split_unavailable(self, req: Request, why: str) -> None:
        tier = req.spans[0].tier
        self.metrics.fallback("split_unavailable", tier, req.evicted_tokens)
        logger.warning(
            "cacheflow: rid=%s: split restore from %s not possible (%s); recomputing its %d "
            "tokens", req.id, tier, why, req.evicted_tokens,
        )  # fmt: skip

    def split_dropped(self, rid: str, tier: str, tokens: int, reason: str) -> None:
        self.metrics.fallback(reason, tier, tokens)
        logger.info("cacheflow: rid=%s: split restore dropped (%s); recomputing", rid, reason)

    def lookup_failed(self, rid: str, tokens: int) -> None:
        self.metrics.fallback("l3_unavailable", L3_TIER, tokens)
        logger.warning(
            "cacheflow: rid=%s: %s lookup failed; recomputing its %d tokens", rid, L3_TIER, tokens
        )

    def restore_done(self, d: Decision, measured_s: float) -> None:
        """``d``'s first forward ended ``measured_s`` after its plan."""
        self.metrics.restore_time(d.predicted_s, measured_s)
        self._log(
            "cacheflow restore rid=%s done: measured %.2f ms, predicted %.2f ms (%s)",
            d.rid, measured_s * 1e3, d.predicted_s * 1e3, d.shape,
        )  # fmt: skip


def _where(sp: SplitRestore, streamed: bool) -> str:
    """Where a split's load went into the request's KV (the decision log's words)."""
    if sp.one_forward:
        return "in its one forward"
    return "in the extend" if streamed else "at the splice"
