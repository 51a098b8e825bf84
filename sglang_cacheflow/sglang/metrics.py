"""Prometheus metrics of restores, exported on SGLang's ``/metrics`` (``--enable-metrics``).

The scheduler process creates them; SGLang's launcher sets ``PROMETHEUS_MULTIPROC_DIR`` before
it starts the scheduler, so prometheus-client writes them where the HTTP server's multiprocess
collector reads them. Only TP rank 0 records (the decisions are identical on every rank).

- ``sglang:cacheflow_restored_tokens_total{action, tier}``: evicted tokens restored, by
  ``action`` (``load`` or ``recompute``) and the ``tier`` that held them (``host``, ``redis``);
- ``sglang:cacheflow_fallbacks_total{reason}``: restores that got less than planned from a
  tier (down, corrupted page, evicted meanwhile) and recomputed the rest;
- ``sglang:cacheflow_fallback_tokens_total{tier}``: tokens recomputed because of them;
- ``sglang:cacheflow_restore_seconds{kind}``: restore time (plan to end of the request's first
  forward), ``kind="predicted"`` and ``kind="measured"``;
- ``sglang:cacheflow_restore_error_ratio``: measured / predicted restore time;
- ``sglang:cacheflow_planned_requests_total{policy, shape}``: restores by the shape they
  were given (``load all``, ``recompute all``, ``load front``, ``token split``), counted once
  per request when its decision is executed (a waiting request is re-planned each round
  until it is admitted; only the decision it is admitted with counts);
- ``sglang:cacheflow_held_prefetches_total{event}``: planned L3 loads whose host pages were
  held until their request was admitted (``held``), and let go (``released``: admitted, or
  gone); equal once no restore waits.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RestoreMetrics"]

_TIME_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# 0.9-1.1 and 0.75-1.25: a prediction within 10% or 25% of the measured time
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.75, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)


class RestoreMetrics:
    """The metric objects, or no-ops when metrics are off."""

    def __init__(self, enabled: bool, labels: dict[str, str] | None = None) -> None:
        self.enabled = enabled
        self.labels = dict(labels or {})
        if not enabled:
            return
        from prometheus_client import Counter, Histogram

        names = list(self.labels)
        self._restored = Counter(
            "sglang:cacheflow_restored_tokens_total",
            "Evicted tokens restored, by action (load/recompute) and the tier that held them.",
            [*names, "action", "tier"],
        )
        self._fallbacks = Counter(
            "sglang:cacheflow_fallbacks_total",
            "Restores that got less than planned from a tier and recomputed the rest.",
            [*names, "reason"],
        )
        self._fallback_tokens = Counter(
            "sglang:cacheflow_fallback_tokens_total",
            "Tokens recomputed because a tier returned less than planned.",
            [*names, "tier"],
        )
        self._seconds = Histogram(
            "sglang:cacheflow_restore_seconds",
            "Restore time from the plan to the end of the request's first forward.",
            [*names, "kind"],
            buckets=_TIME_BUCKETS,
        )
        self._ratio = Histogram(
            "sglang:cacheflow_restore_error_ratio",
            "Measured over predicted restore time.",
            names,
            buckets=RATIO_BUCKETS,
        )
        self._held = Counter(
            "sglang:cacheflow_held_prefetches_total",
            "Planned L3 loads whose host pages were held until admitted, and released.",
            [*names, "event"],
        )
        self._planned = Counter(
            "sglang:cacheflow_planned_requests_total",
            "Restores, by policy and the shape each was given (once per request).",
            [*names, "policy", "shape"],
        )
        self._blend = {
            what: (Counter(f"sglang:cacheflow_blend_{what}_total", doc, [*names, label]), label)
            for what, label, doc in (
                ("requests", "outcome", "Requests with chunks: blended, plain or fallback."),
                ("tokens", "kind", "Chunk tokens of blends: loaded, recomputed or exact."),
                ("chunks", "result", "Chunks looked up (hit, miss) and stored."),
                ("fallbacks", "reason", "Blends recomputed plainly, by reason."),
            )
        }

    def _l(self, **extra: str) -> dict[str, Any]:
        return {**self.labels, **extra}

    def restored(self, action: str, tier: str, tokens: int) -> None:
        if self.enabled and tokens > 0:
            self._restored.labels(**self._l(action=action, tier=tier)).inc(tokens)

    def fallback(self, reason: str, tier: str, tokens: int) -> None:
        if self.enabled:
            self._fallbacks.labels(**self._l(reason=reason)).inc()
            if tokens > 0:
                self._fallback_tokens.labels(**self._l(tier=tier)).inc(tokens)

    def prefetch_hold(self, event: str) -> None:
        """A planned prefetch's host pages ``held`` or ``released``."""
        if self.enabled:
            self._held.labels(**self._l(event=event)).inc()

    def blend(self, what: str, value: str, n: int = 1) -> None:
        """Chunk reuse: ``what`` is ``requests``, ``tokens``, ``chunks`` or ``fallbacks``,
        ``value`` its label (an outcome, a kind, a result, a reason)."""
        if self.enabled and n > 0:
            counter, label = self._blend[what]
            counter.labels(**self._l(**{label: value})).inc(n)

    def planned(self, policy: str, shape: str) -> None:
        if self.enabled:
            kind = shape.split(" ")[0] + " " + shape.split(" ")[1] if " " in shape else shape
            self._planned.labels(**self._l(policy=policy, shape=kind)).inc()

    def restore_time(self, predicted_s: float, measured_s: float) -> None:
        if not self.enabled:
            return
        self._seconds.labels(**self._l(kind="predicted")).observe(predicted_s)
        self._seconds.labels(**self._l(kind="measured")).observe(measured_s)
        if predicted_s > 0:
            ratio = self._ratio.labels(**self.labels) if self.labels else self._ratio
            ratio.observe(measured_s / predicted_s)
