"""Chunk reuse beyond exact prefixes (CacheBlend, CacheTune): how much of a reused chunk to
recompute, and the round's predicted TTFTs.

A RAG prompt is ``[resident][exact][reused][new]``: the preamble's KV is on the device; the
exact chunk sits where it was computed, so its KV is loaded as is; the reused chunks sit at
new positions, so their KV is loaded with the keys rotated and a share ``ratio`` of their
tokens is recomputed through all layers together with the new tokens, to restore the
cross-chunk attention. Loads of layer i+1 overlap the compute of layer i.

This module owns the names of the ways those tokens are chosen (:class:`Selection`), the
pricing of one request at a ratio, and the choice of one ratio per round
(:func:`plan_blend`). It prices with :class:`~sglang_cacheflow.planner.cost.CostModel`
only; executors run what it returns and never re-decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from sglang_cacheflow.planner.cost import ComputeCost, CostModel

GRID_STEPS = 100  # ratios are searched on a 1% grid


class Selection(StrEnum):
    """How the recomputed share of the reused tokens is chosen."""

    # CacheTune: scores stored with the chunk; the selected tokens' KV is never read
    # (sparse transfer).
    OFFLINE = "offline"
    # CacheBlend: KV deviation at an early layer; needs every reused token's KV and one full
    # layer of recompute.
    ONLINE = "online"
    # Baseline: random tokens at the same ratio; they are scattered over the stored pages,
    # so every page holding an unselected token (in practice every page) is read.
    RANDOM = "random"


@dataclass(frozen=True)
class BlendRequest:
    """One prompt ``[resident][exact][reused][new]``, counted in tokens."""

    name: str
    tier: str  # where the chunk KV is read from (a key of CostModel.tiers)
    resident: int  # KV already on the device (the fixed preamble): neither loaded nor recomputed
    exact: int  # a chunk where it was computed (right after the preamble): loaded in full
    reused: int  # chunks at a new position: `ratio` of them recomputed, the rest loaded
    new: int  # query tokens: computed in full

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("blend request name must be non-empty")
        for field in ("resident", "exact", "reused"):
            value = getattr(self, field)
            if value < 0:
                raise ValueError(f"blend request {self.name!r}: {field} must be >= 0, got {value}")
        if self.new < 1:
            raise ValueError(
                f"blend request {self.name!r}: new must be >= 1 (the query yields the first "
                f"token), got {self.new}"
            )


@dataclass(frozen=True)
class BlendPlan:
    """One request's plan at the round's ratio."""

    name: str
    ratio: float  # share of `reused` tokens recomputed
    recomputed: int  # selected reused tokens + new tokens
    loaded: int  # exact + reused tokens whose KV is read from the tier
    compute_s: float
    load_s: float
    ttft_s: float  # predicted time from the round's start to this request's first token
    full_recompute_s: float  # recomputing every non-resident token alone (the baseline)


@dataclass(frozen=True)
class BlendRound:
    plans: list[BlendPlan]  # in serving order (the input order)
    ratio: float  # the ratio chosen for the round
    selection: Selection

    def __post_init__(self) -> None:
        if not self.plans:
            raise ValueError("a blend round needs at least one plan")

    @property
    def mean_ttft_s(self) -> float:
        return sum(p.ttft_s for p in self.plans) / len(self.plans)


def _selected(reused: int, ratio: float) -> int:
    """Reused tokens recomputed at ``ratio`` (all of them at 1.0)."""
    return reused if ratio >= 1.0 else round(ratio * reused)


def _forward_s(compute: ComputeCost, tokens: float, pairs: float) -> float:
    # ComputeCost.seconds assumes a contiguous run after a prefix; the selected tokens are
    # scattered inside the context, so the attention pairs are counted by the caller.
    if tokens <= 0:
        return 0.0
    return (
        compute.step_s + tokens / compute.tokens_per_s + compute.attention_s_per_token_pair * pairs
    )


def _price(
    req: BlendRequest, cost: CostModel, selection: Selection, ratio: float
) -> tuple[int, int, float, float]:
    """``(recomputed, loaded, compute_s, load_s)`` of one request at ``ratio``."""
    selected = _selected(req.reused, ratio)
    before = req.resident + req.exact
    # The recomputed tokens sit at scattered positions, so attention runs with a mask by
    # position over the whole context (the runtime's SDPA, SGLang's custom-mask extend):
    # every (query, key) pair is computed, the masked ones included.
    pairs = (selected + req.new) * (before + req.reused + req.new)
    compute_s = _forward_s(cost.compute, selected + req.new, pairs)
    if selection is Selection.ONLINE:
        # The deviation that picks the tokens is measured on one fully recomputed layer,
        # and it compares against the stored KV of every reused token.
        compute_s += cost.recompute_s(before, req.reused, layers=1)
        loaded = req.exact + req.reused
    elif selection is Selection.RANDOM:
        loaded = req.exact + (req.reused if selected < req.reused else 0)
    else:
        loaded = req.exact + req.reused - selected
    return selected + req.new, loaded, compute_s, cost.load_s(req.tier, loaded)


def _serve(priced: Sequence[tuple[str, float, float]], num_layers: int) -> list[float]:
    """TTFT of each ``(tier, compute_s, load_s)`` served in order on one compute resource and
    one I/O channel per tier, loads streamed layer by layer from the round's start."""
    compute_free = 0.0
    io_free: dict[str, float] = {}
    ttfts: list[float] = []
    for tier, tc, tio in priced:
        if tio > 0:
            start = io_free.get(tier, 0.0)
            done = start + tio
            io_free[tier] = done
            # Layer 0 waits for its own load and for the previous request's forward; the last
            # layer waits for the last load. Alone: max(Tc, Tio) + min(Tc, Tio) / L.
            ttft = max(max(compute_free, start + tio / num_layers) + tc, done + tc / num_layers)
        else:
            ttft = compute_free + tc
        # The forwards run in serving order, so the next one starts after this one ends
        # (idle waits for loads included): TTFTs never decrease along the round.
        compute_free = ttft
        ttfts.append(ttft)
    return ttfts


def _round(
    requests: Sequence[BlendRequest], cost: CostModel, selection: Selection, ratio: float
) -> BlendRound:
    priced = [_price(r, cost, selection, ratio) for r in requests]
    ttfts = _serve(
        [(r.tier, tc, tio) for r, (_, _, tc, tio) in zip(requests, priced, strict=True)],
        cost.shape.num_layers,
    )
    plans = [
        BlendPlan(
            name=r.name,
            ratio=ratio,
            recomputed=recomputed,
            loaded=loaded,
            compute_s=tc,
            load_s=tio,
            ttft_s=ttft,
            full_recompute_s=cost.recompute_s(r.resident, r.exact + r.reused + r.new),
        )
        for r, (recomputed, loaded, tc, tio), ttft in zip(requests, priced, ttfts, strict=True)
    ]
    return BlendRound(plans, ratio, selection)


def check_selection(selection: Selection | str) -> Selection:
    try:
        return Selection(selection)
    except ValueError:
        known = ", ".join(s.value for s in Selection)
        raise ValueError(f"unknown selection {selection!r}; known: {known}") from None


def plan_blend(
    requests: Sequence[BlendRequest],
    cost: CostModel,
    *,
    selection: Selection | str = Selection.OFFLINE,
    min_ratio: float = 0.15,
    ratio: float | None = None,
) -> BlendRound:
    """Plan one round of blended requests, served in the input order.

    One ratio for the whole round: the one in ``[min_ratio, 1]`` (``min_ratio``, then a 1%
    grid above it) with the lowest mean TTFT, the larger on a tie (better quality).
    ``ratio`` forces it. ``min_ratio`` is a quality floor: below it the cross-chunk attention
    is not restored well enough. Raises ``ValueError`` for an empty round, duplicate names,
    an unknown selection, ``min_ratio`` outside ``[0, 1]`` or a forced ratio outside
    ``[min_ratio, 1]``; ``KeyError`` for a tier the cost model does not know.
    """
    sel = check_selection(selection)
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if not requests:
        raise ValueError("plan_blend needs at least one request")
    names = [r.name for r in requests]
    if len(set(names)) != len(names):
        raise ValueError(f"blend request names must be unique, got {names}")
    for r in requests:
        cost.tier(r.tier)  # the KeyError names the known tiers
    if ratio is not None:
        if ratio < min_ratio:
            raise ValueError(
                f"ratio={ratio} is below min_ratio={min_ratio}: raise ratio or lower min_ratio"
            )
        if not ratio <= 1.0:
            raise ValueError(f"ratio must be in [min_ratio, 1], got {ratio}")
        return _round(requests, cost, sel, ratio)

    # Largest first, so that a later candidate replaces the best only when strictly faster;
    # the floor itself is a candidate even when it is off the grid.
    grid = (k / GRID_STEPS for k in range(GRID_STEPS, -1, -1))
    candidates = [r for r in grid if r > min_ratio] + [min_ratio]
    best: BlendRound | None = None
    for r in candidates:
        rnd = _round(requests, cost, sel, r)
        if best is None or rnd.mean_ttft_s < best.mean_ttft_s:
            best = rnd
    assert best is not None
    return best
