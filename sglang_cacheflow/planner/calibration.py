"""Calibrating the cost model from measured samples.

Compute: ``seconds = step_s + n / tokens_per_s + attention * (n*p + n*(n-1)/2)`` is linear
in its three coefficients, so a least-squares fit over (prefix, tokens, layers, seconds)
samples recovers them; a coefficient that comes out negative is dropped and the rest
refitted (non-negative least squares over three unknowns by enumeration). Where the model's
``attention_ratio`` is known, attention is priced at that share of the per-token cost unless
the samples show a term of their own (prefills from an empty cache cannot: their ``n`` and
``n^2`` rise together, and a fit left to itself drops the term). Forwards measured while
loads were in flight are fitted apart: the excess of the recent ones over the fitted model
(their summed time over what the model gives them alone) is the ``overlap_slowdown``. The
CPU the loads' client spent while such a forward ran (``TierCost.cpu_s_per_token``) is taken
off first: the slowdown is what is left (memory bandwidth, copies). The part of a forward
outside its layer loop (``unlayered_s``), which a forward through some layers pays whole, is
measured directly by an engine that can time its layer loop: the median of recent samples,
taken off a layer-limited sample before the fit.

Tiers: ``seconds = latency + bytes / bandwidth`` per transfer, tracked with exponentially
weighted sums, so recent transfers count most and each update is O(1): a weighted linear
regression of seconds on bytes gives latency and bandwidth; with transfers all of one size,
the latency keeps its prior and the bandwidth follows the average. What a tier's restores
cost beyond their transfers (an engine's lookups and hand-offs) is learnt from whole restores
that ran alone: the residual of measured over predicted, as a moving average added to the
tier's ``setup_s`` (never below 0); what a split restore costs beyond its forwards, the same
way, to the compute's ``split_s`` (down to minus one forward's fixed cost: a split may run
faster than the sum of its forwards' prices).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from sglang_cacheflow.planner.cost import ComputeCost, CostModel, TierCost


@dataclass
class _TierStats:
    prior: TierCost
    decay: float
    w: float = 0.0
    x: float = 0.0  # weighted sums of bytes, seconds, bytes^2, bytes*seconds
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def add(self, nbytes: float, seconds: float) -> None:
        k = self.decay
        self.w = self.w * k + 1.0
        self.x = self.x * k + nbytes
        self.y = self.y * k + seconds
        self.xx = self.xx * k + nbytes * nbytes
        self.xy = self.xy * k + nbytes * seconds

    def estimate(self) -> TierCost:
        if self.w == 0.0:
            return self.prior
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if var > 1e-6 * mx * mx and var > 0:
            slope = (self.xy / self.w - mx * my) / var
            latency = my - slope * mx
            if slope > 0 and latency >= 0:
                return replace(self.prior, bandwidth_Bps=1.0 / slope, latency_s=latency)
        # One transfer size (or a noisy fit): keep the latency, fit the bandwidth.
        latency = self.prior.latency_s if self.prior.latency_s < my else 0.5 * my
        return replace(self.prior, bandwidth_Bps=mx / max(my - latency, 1e-12), latency_s=latency)


@dataclass
class Calibrator:
    """Collects measured step times and produces a calibrated :class:`CostModel`."""

    prior: CostModel
    decay: float = 0.9  # weight kept by older tier samples at each new one
    max_compute_samples: int = 512
    # forwards beside reads that give the slowdown: the recent ones, since what else runs
    # beside a forward (other requests' reads, write-backs) changes with the load
    overlap_window: int = 32
    _compute: list[tuple[float, float, float, float]] = field(default_factory=list)
    # (prefix, tokens, layer fraction, seconds, read CPU the model charges it)
    _overlapped: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    setup_rate: float = 0.3  # weight of the newest residual in a tier's setup estimate
    _tiers: dict[str, _TierStats] = field(default_factory=dict)
    _setup: dict[str, float] = field(default_factory=dict)  # learnt extra setup_s per tier
    _split: float = 0.0  # learnt extra split_s
    _unlayered: list[float] = field(default_factory=list)  # recent unlayered seconds
    max_unlayered_samples: int = 64

    def add_compute(
        self,
        prefix: int,
        tokens: int,
        seconds: float,
        layers: int | None = None,
        overlapped: bool = False,
        read_cpu_s: float = 0.0,
    ) -> None:
        """A forward of ``tokens`` after ``prefix`` cached tokens over ``layers`` layers;
        ``overlapped`` when loads were in flight while it ran, ``read_cpu_s`` of their CPU
        (``TierCost.read_cpu_s``) spent meanwhile: the slowdown is what is left."""
        if tokens <= 0 or seconds <= 0:
            return
        frac = 1.0 if layers is None else layers / self.prior.shape.num_layers
        if overlapped:
            sample = (float(prefix), float(tokens), frac, float(seconds), float(read_cpu_s))
            self._overlapped.append(sample)
        else:
            self._compute.append((float(prefix), float(tokens), frac, float(seconds)))
        for samples in (self._compute, self._overlapped):
            if len(samples) > self.max_compute_samples:
                del samples[0]

    def add_unlayered(self, seconds: float) -> None:
        """A forward spent ``seconds`` outside its layer loop (see ``ComputeCost.unlayered_s``)."""
        if seconds < 0:
            return
        self._unlayered.append(float(seconds))
        if len(self._unlayered) > self.max_unlayered_samples:
            del self._unlayered[0]

    def unlayered_s(self) -> float:
        """The median of the recent unlayered samples (the prior's value before any)."""
        if not self._unlayered:
            return self.prior.compute.unlayered_s
        return statistics.median(self._unlayered)

    def add_transfer(self, tier: str, nbytes: float, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        stats = self._tiers.get(tier)
        if stats is None:
            prior = self.prior.tiers.get(tier, TierCost(1e9, 0.0))
            stats = self._tiers[tier] = _TierStats(prior, self.decay)
        stats.add(nbytes, seconds)

    def set_tier_prior(self, tier: str, cost: TierCost) -> None:
        """Plan ``tier`` with ``cost`` where nothing measured replaces it (its CPU terms,
        measured apart; its bandwidth and latency until transfers are fitted)."""
        self.prior = replace(self.prior, tiers={**self.prior.tiers, tier: cost})
        if tier in self._tiers:
            self._tiers[tier].prior = cost

    def add_restore(self, tier: str, measured_s: float, predicted_s: float) -> None:
        """A restore from ``tier`` that had the machine to itself took ``measured_s`` where
        the model (with the setup learnt so far) predicted ``predicted_s``: move the tier's
        extra setup toward the residual (never below 0, so that loads keep being tried)."""
        current = self._setup.get(tier, 0.0)
        residual = max(0.0, current + measured_s - predicted_s)
        self._setup[tier] = current + self.setup_rate * (residual - current)

    def add_split(self, measured_s: float, predicted_s: float) -> None:
        """A split restore that had the machine to itself took ``measured_s`` where the
        model predicted ``predicted_s``: move the compute's ``split_s`` (what a split costs
        beyond its forwards) toward the residual. It may go below 0, where splits run
        faster than their forwards' price (a chunk that overlaps less of its reads' CPU
        than charged, a narrowed forward cheaper than its layer share), but by no more than
        one forward's fixed cost (:meth:`model` holds it there as that cost is refitted)."""
        floor = -self.compute_cost().step_s
        residual = max(floor, self._split + measured_s - predicted_s)
        self._split += self.setup_rate * (residual - self._split)

    def setup_s(self, tier: str) -> float:
        """The extra setup learnt for ``tier`` (see :meth:`add_restore`)."""
        return self._setup.get(tier, 0.0)

    def compute_cost(self) -> ComputeCost:
        u = self.unlayered_s()
        if len(self._compute) < 3:  # nothing measured alone yet: fit what there is
            return self._fit([(p, n, f, t - c) for p, n, f, t, c in self._overlapped], u)
        alone = self._fit(self._compute, u)
        if not self._overlapped:
            return alone
        recent = self._overlapped[-self.overlap_window :]
        # summed, not averaged per forward: a long forward's slowdown is what costs time;
        # the reads' CPU is charged apart (TierCost), the slowdown is the rest
        measured = sum(t - c for *_, t, c in recent)
        modelled = sum(
            frac * alone.seconds(p, n) + alone.fixed_s(frac) for p, n, frac, _, _ in recent
        )
        slowdown = measured / modelled - 1.0 if modelled > 0 else 0.0
        return replace(alone, overlap_slowdown=min(max(slowdown, 0.0), 3.0))

    def _fit(self, samples: Sequence[tuple[float, float, float, float]], u: float) -> ComputeCost:
        s = np.asarray(samples).reshape(-1, 4)
        # a layer-limited forward's unlayered part is not its layer share: take it off
        s[:, 3] -= (1.0 - s[:, 2]) * u
        s = s[s[:, 3] > 0]
        m = len(s)
        if m < 3:
            return replace(self.prior.compute, unlayered_s=u)
        p, n, frac, y = s[:, 0], s[:, 1], s[:, 2], s[:, 3]
        pairs = n * p + n * (n - 1) / 2
        ratio = self.prior.shape.attention_ratio
        # columns: step, per-token, per-token-pair, and per-token with attention at the
        # model's ratio; each scaled by the layer fraction
        cols = np.stack([frac, frac * n, frac * pairs, frac * (n + ratio * pairs)], axis=1)
        # Every model has a per-token term (free or tied to attention). Where the ratio is
        # known, attention is never left out: the tied term is the default, and a free one
        # is kept only where the samples show it (one more parameter to pay for below).
        if ratio > 0:
            models = [(0, 3), (3,), (0, 1, 2), (1, 2)]
        else:
            models = [(0, 1, 2), (0, 1), (1, 2), (1,)]
        best: tuple[float, np.ndarray] | None = None
        for keep in models:
            sub = cols[:, keep]
            # relative least squares: every sample counts by its own scale
            coef, *_ = np.linalg.lstsq(sub / y[:, None], np.ones_like(y), rcond=None)
            if (coef < 0).any():
                continue
            # Bayesian information criterion: a term is kept only if it explains more than
            # noise. Prefills of 64-512 tokens from an empty cache cannot tell the attention
            # term from the per-token one (n and n^2 rise together); fitted anyway, it came
            # out at 0 to 4.5e-6 s per pair on one machine, and its spread decided which split
            # kind a server planned.
            sse = float(np.sum(((sub @ coef) / y - 1.0) ** 2))
            err = m * math.log(max(sse / m, 1e-30)) + len(keep) * math.log(m)
            if best is None or err < best[0]:
                full = np.zeros(4)
                full[list(keep)] = coef
                if full[3] > 0:  # the tied term: per-token, and attention at the ratio
                    full[1], full[2] = full[3], ratio * full[3]
                best = (err, full[:3])
        prior = self.prior.compute
        if best is None or best[1][1] <= 0:
            return replace(prior, unlayered_s=u)
        step, per_token, pair = (float(x) for x in best[1])  # plain floats, JSON-ready
        return ComputeCost(1.0 / per_token, pair, step, prior.overlap_slowdown, prior.split_s, u)

    def model(self) -> CostModel:
        """The prior with every measured part replaced by its fit."""
        tiers = dict(self.prior.tiers)
        tiers.update({name: st.estimate() for name, st in self._tiers.items()})
        for name, extra in self._setup.items():
            if extra > 0 and name in tiers:
                tiers[name] = replace(tiers[name], setup_s=tiers[name].setup_s + extra)
        compute = self.compute_cost()
        if self._split != 0:
            split_s = max(-compute.step_s, compute.split_s + self._split)
            compute = replace(compute, split_s=split_s)
        return replace(self.prior, compute=compute, tiers=tiers)
