"""The cost model one SGLang scheduler plans with: the configured prior, calibrated from the
forwards and transfers the server runs (thread-safe: the L3 backend and the split reader
report from their own threads). The fitting rules are the planner's
(:class:`~sglang_cacheflow.planner.Calibrator`); this module feeds them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import replace

from sglang_cacheflow.planner import Calibrator, ComputeCost, CostModel, ModelShape, TierCost
from sglang_cacheflow.sglang.config import CacheFlowConfig, tier_prior
from sglang_cacheflow.tiers.names import HOST_TIER, L3_TIER

logger = logging.getLogger("sglang_cacheflow.sglang")


def prior_cost(cfg: CacheFlowConfig, shape: ModelShape) -> CostModel:
    """The cost model of ``cfg.prior``: what is planned with before anything is measured."""
    p = cfg.prior
    return CostModel(
        shape,
        ComputeCost(p["tokens_per_s"], p["attention_s_per_token_pair"], p["step_s"]),
        {tier: TierCost.from_gbps(*tier_prior(p, tier)) for tier in (HOST_TIER, L3_TIER)},
    )


class CostTracker:
    """The prior, and with ``cfg.calibrate`` its calibration from what the server measures."""

    def __init__(self, cfg: CacheFlowConfig, shape: ModelShape) -> None:
        self.enabled = cfg.calibrate
        self.shape = shape
        self.prior = prior_cost(cfg, shape)
        self.calibrator = Calibrator(self.prior)
        self._lock = threading.Lock()

    def model(self) -> CostModel:
        if not self.enabled:
            return self.prior
        with self._lock:
            return self.calibrator.model()

    def observe_compute(
        self,
        prefix_lens: Sequence[int],
        extend_lens: Sequence[int],
        s: float,
        layers: int | None = None,
        overlapped: bool = False,
        read_cpu_s: float = 0.0,
    ) -> None:
        """An extend forward over requests with these prefix and extend lengths took ``s``,
        through its first ``layers`` layers (default all); ``overlapped`` when reads ran
        beside it (it feeds the overlap slowdown, not the compute fit), ``read_cpu_s`` of
        their client CPU spent meanwhile (charged apart, :meth:`set_read_cpu`).

        A batch enters the fit as one sample with its token count and its number of
        attended (query, key) pairs, which is what the cost model charges for.
        """
        n = float(sum(extend_lens))
        if not self.enabled or n <= 0 or s <= 0:
            return
        pairs = sum(e * p + e * (e - 1) / 2 for p, e in zip(prefix_lens, extend_lens, strict=False))
        prefix = (pairs - n * (n - 1) / 2) / n
        with self._lock:
            model = self.calibrator.model()
            predicted = model.recompute_s(prefix, n, layers)
            if overlapped:
                predicted = predicted * (1.0 + model.compute.overlap_slowdown) + read_cpu_s
            self.calibrator.add_compute(prefix, int(n), s, layers, overlapped, read_cpu_s)  # type: ignore[arg-type]
        logger.debug(
            "cacheflow calibration: forward of %d tokens after %.0f cached over %d requests%s%s "
            "took %.2f ms (predicted %.2f ms)", n, prefix, len(extend_lens),
            f" through {layers} layers" if layers else "", " beside reads" if overlapped else "",
            s * 1e3, predicted * 1e3,
        )  # fmt: skip

    def set_read_cpu(
        self, tier: str, per_token_s: float, per_load_s: float, per_token_layer_s: float
    ) -> None:
        """A split's load from ``tier`` costs the process ``per_load_s`` + ``per_token_s``
        per token + ``per_token_layer_s`` per token and layer of CPU (measured apart: a
        probe read); planned with from now on, where the model is calibrated."""
        if not self.enabled:
            return
        with self._lock:
            cost = replace(
                self.prior.tier(tier),
                cpu_s_per_token=per_token_s,
                cpu_s_per_load=per_load_s,
                cpu_s_per_token_layer=per_token_layer_s,
            )
            self.prior = replace(self.prior, tiers={**self.prior.tiers, tier: cost})
            self.calibrator.set_tier_prior(tier, cost)

    def observe_unlayered(self, s: float) -> None:
        """An extend forward spent ``s`` outside its layer loop (``LayerClock``)."""
        if not self.enabled:
            return
        with self._lock:
            self.calibrator.add_unlayered(s)

    def observe_transfer(self, tier: str, nbytes: float, s: float) -> None:
        """One load of ``nbytes`` from ``tier`` took ``s`` (one latency: one planned load)."""
        if not self.enabled or nbytes <= 0 or s <= 0:
            return
        with self._lock:
            predicted = self.calibrator.model().load_s(tier, nbytes / self.shape.kv_bytes_per_token)
            self.calibrator.add_transfer(tier, nbytes, s)
        logger.debug(
            "cacheflow calibration: %s transfer of %d bytes took %.2f ms (predicted %.2f ms)",
            tier, int(nbytes), s * 1e3, predicted * 1e3,
        )  # fmt: skip

    def observe_split(self, measured_s: float, predicted_s: float) -> None:
        """A split restore that had the server to itself: what it cost beyond its forwards
        (the splice, the scheduler round between its chunk and its extend)."""
        if not self.enabled:
            return
        with self._lock:
            self.calibrator.add_split(measured_s, predicted_s)

    def observe_restore(self, tier: str, measured_s: float, predicted_s: float) -> None:
        """A restore from ``tier`` that had the server to itself: what it cost beyond its
        transfer (SGLang's hit query, hand-offs between its threads, admission)."""
        if not self.enabled:
            return
        with self._lock:
            self.calibrator.add_restore(tier, measured_s, predicted_s)
