"""Analytic cost model: how long recomputing or loading a range of KV takes.

Recomputing tokens [p, p+n) through all layers costs
``step_s + n / tokens_per_s + attention_s_per_token_pair * (n*p + n*(n-1)/2)``; through ``l``
of ``L`` layers, ``l/L`` of that except ``unlayered_s`` (the part of ``step_s`` spent
outside the layer loop), which a forward pays whole whatever layers it runs. Loading n tokens
from a tier costs ``latency + n * kv_bytes_per_token / bandwidth`` (a layer range loads its
share). Times are for the whole tensor-parallel group; each rank loads ``1/tp`` of the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    tp: int = 1
    # An attended (query, key) pair's arithmetic over a token's through the layers' weights
    # (:func:`attention_ratio`); 0 when unknown. Calibration prices attention with it until
    # its samples show the term on their own.
    attention_ratio: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "dtype_bytes", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.attention_ratio < 1.0:
            raise ValueError(f"model.attention_ratio must be in [0, 1), got {self.attention_ratio}")
        if self.num_kv_heads % self.tp and self.tp % self.num_kv_heads:
            raise ValueError(
                f"model.tp={self.tp} must divide num_kv_heads={self.num_kv_heads} (or be a "
                "multiple of it, with KV heads replicated)"
            )

    @property
    def kv_bytes_per_token(self) -> float:
        """Bytes of K and V, all layers, one token, as loaded by one TP rank."""
        heads_per_rank = max(1.0, self.num_kv_heads / self.tp)
        return 2.0 * self.num_layers * heads_per_rank * self.head_dim * self.dtype_bytes


def attention_ratio(
    hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, mlp_matrices: int = 3
) -> float:
    """Multiply-adds of one attended (query, key) pair in a decoder layer (``q.k`` and the
    value's weight: ``2 * heads * head_dim``) over one token's through the layer's weights
    (Q, K, V and O projections, and an MLP of ``mlp_matrices`` matrices of ``hidden x
    intermediate``: 3 where gated, as in Llama and Qwen2). The layer count cancels; so does
    tensor parallelism, which splits both alike."""
    if min(hidden, heads, kv_heads, head_dim, intermediate, mlp_matrices) < 1:
        raise ValueError("attention_ratio needs positive model dimensions")
    weights = hidden * head_dim * (2 * heads + 2 * kv_heads) + mlp_matrices * hidden * intermediate
    return 2.0 * heads * head_dim / weights


@dataclass(frozen=True)
class ComputeCost:
    tokens_per_s: float
    attention_s_per_token_pair: float = 0.0
    step_s: float = 0.0  # fixed cost of one forward (launches, scheduling); fitted by calibration
    # A forward that runs while loads are in flight is this much slower (the copies compete
    # for memory bandwidth and, on a CPU, for cores); fitted by calibration.
    overlap_slowdown: float = 0.0
    # What a split restore (part recomputed, part loaded) costs beyond its forwards: the
    # executor's hand-offs between its chunk and its extend (SGLang: the splice, a scheduler
    # round; a layer split in one forward: narrowing it, and what the fit misses of its few
    # tokens' top layers); on the compute resource's path. Fitted by calibration; below 0
    # (down to -step_s) where splits run faster than their forwards' prices.
    split_s: float = 0.0
    # The part of ``step_s`` outside the layer loop (batch set-up, embedding, logits): a
    # forward through some of the layers pays it whole. Measured by the engine that can
    # (SGLang on CPU times its layer loop); 0 scales all of ``step_s`` with the layers.
    unlayered_s: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens_per_s <= 0:
            raise ValueError(f"compute.tokens_per_s must be > 0, got {self.tokens_per_s}")
        fields = (
            self.attention_s_per_token_pair,
            self.step_s,
            self.overlap_slowdown,
            self.unlayered_s,
        )
        if min(fields) < 0:
            raise ValueError(
                "compute.attention_s_per_token_pair, step_s, overlap_slowdown and "
                "unlayered_s must be >= 0"
            )
        if self.split_s < -self.step_s:
            raise ValueError(
                f"compute.split_s must be >= -step_s ({-self.step_s}), got {self.split_s}"
            )

    def seconds(self, prefix: float, n: float) -> float:
        """All-layer time to compute n tokens that follow ``prefix`` tokens of KV."""
        if n <= 0:
            return 0.0
        pairs = n * prefix + n * (n - 1) / 2
        return self.step_s + n / self.tokens_per_s + self.attention_s_per_token_pair * pairs

    def fixed_s(self, frac: float) -> float:
        """The unlayered part of a forward through ``frac`` of the layers, beyond ``frac``
        of an all-layer forward: what :meth:`CostModel.recompute_s` adds to the layer share."""
        return (1.0 - frac) * min(self.unlayered_s, self.step_s) if frac < 1.0 else 0.0


@dataclass(frozen=True)
class TierCost:
    """A tier's channel: ``latency_s + bytes / bandwidth_Bps`` per load, during which the
    channel is busy; then ``setup_s`` before the loaded KV can be used, during which the
    channel already carries the next load (an executor's hand-offs between its I/O threads
    and its scheduler, e.g. SGLang's prefetch acknowledgement and admission).

    ``cpu_s_per_token``, ``cpu_s_per_token_layer`` and ``cpu_s_per_load``: the CPU a split's
    load costs the process that runs the forwards (a Redis client's commands, about one per
    page and read call, and the bytes of each layer), per loaded token, per loaded token and
    layer, and per load. A forward running while the load does is delayed by the
    part of it spent meanwhile, whatever the forward's length (on a CPU engine the client
    and the forward share the cores); the load is taken to spend it evenly over its time.
    """

    bandwidth_Bps: float
    latency_s: float = 0.0
    setup_s: float = 0.0
    cpu_s_per_token: float = 0.0
    cpu_s_per_load: float = 0.0
    cpu_s_per_token_layer: float = 0.0

    def __post_init__(self) -> None:
        if self.bandwidth_Bps <= 0:
            raise ValueError(f"tier bandwidth must be > 0, got {self.bandwidth_Bps}")
        if self.latency_s < 0:
            raise ValueError(f"tier latency must be >= 0, got {self.latency_s}")
        if self.setup_s < 0:
            raise ValueError(f"tier setup time must be >= 0, got {self.setup_s}")
        if min(self.cpu_s_per_token, self.cpu_s_per_load, self.cpu_s_per_token_layer) < 0:
            raise ValueError("a tier's CPU per token, token layer and load must be >= 0")

    def read_cpu_s(self, tokens: float, layers: float) -> float:
        """The client's CPU seconds of a split's load of ``tokens`` tokens x ``layers``
        layers."""
        if tokens <= 0:
            return 0.0
        per_token = self.cpu_s_per_token + layers * self.cpu_s_per_token_layer
        return self.cpu_s_per_load + tokens * per_token

    @classmethod
    def from_gbps(cls, bandwidth_GBps: float, latency_ms: float = 0.0) -> TierCost:
        return cls(bandwidth_GBps * 1e9, latency_ms / 1e3)


@dataclass(frozen=True)
class CostModel:
    shape: ModelShape
    compute: ComputeCost
    tiers: dict[str, TierCost] = field(default_factory=dict)

    def tier(self, name: str) -> TierCost:
        try:
            return self.tiers[name]
        except KeyError:
            raise KeyError(
                f"tier {name!r} has no cost entry; known tiers: {sorted(self.tiers)}"
            ) from None

    def recompute_s(self, prefix: float, n: float, layers: float | None = None) -> float:
        """Time to recompute n tokens after ``prefix`` through ``layers`` layers (default all)."""
        if n <= 0:
            return 0.0
        frac = 1.0 if layers is None else layers / self.shape.num_layers
        return frac * self.compute.seconds(prefix, n) + self.compute.fixed_s(frac)

    def load_s(self, tier: str, n: float, layers: float | None = None) -> float:
        """Time to load n tokens' KV for ``layers`` layers (default all) from ``tier``."""
        if n <= 0:
            return 0.0
        frac = 1.0 if layers is None else layers / self.shape.num_layers
        t = self.tier(tier)
        return t.latency_s + n * frac * self.shape.kv_bytes_per_token / t.bandwidth_Bps


class ReadCpu(NamedTuple):
    """A split's load as the client's CPU sees it: ``cpu_s`` spent evenly over
    ``[start, finish)``."""

    cpu_s: float
    start: float
    finish: float

    def during(self, at: float, dur: float) -> float:
        """What a forward of ``dur`` seconds alone, begun at ``at``, is delayed by: the CPU
        spent while it runs, which lengthens it and so takes in more until the load ends
        (``extra = rate * (dur + extra)`` while both run)."""
        begin = max(at, self.start)
        if at + dur <= begin or begin >= self.finish:
            return 0.0
        rate = self.cpu_s / (self.finish - self.start)
        if rate < 1.0:
            extra = rate * (at + dur - begin) / (1.0 - rate)
            if at + dur + extra <= self.finish:
                return extra
        return rate * (self.finish - begin)
