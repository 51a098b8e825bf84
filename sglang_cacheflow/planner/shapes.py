"""Restore shapes of one request and their timing against shared resource clocks.

A shape is one way to restore a request's evicted span:

- ``token`` split ``s``: recompute tokens [d, d+s) through all layers while loading
  [d+s, end) (Cake's order; ``s = 0`` is load-all, ``s = E`` is recompute-all);
- ``layer`` split ``l``: recompute layers [0, l) of the whole span while loading layers
  [l, L) (CacheFlow's layer-wise split);
- ``load_front`` split ``j``: load [d, d+j) and recompute [d+j, end) in the same forward,
  waiting per layer for the loaded KV (SGLang's extend over a capped hit).

The new tokens are prefilled last; every forward starts layer i as soon as the KV it reads
for layer i is in (layer-wise overlap). :meth:`Shaper.run` prices a shape against the
current free time of the compute resource and of each tier's I/O channel, and, when asked,
emits the timed :class:`Step` list; the search and the final plan use this one function,
so what is searched is what is emitted.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from sglang_cacheflow.planner.capabilities import Capabilities
from sglang_cacheflow.planner.cost import CostModel, ReadCpu
from sglang_cacheflow.planner.plan import Action, Step
from sglang_cacheflow.planner.request import Request


class ShapeKind(StrEnum):
    """How a shape divides a span between recompute and load (module doc)."""

    TOKEN = "token"  # recompute the front tokens, load the back (Cake's order)
    LAYER = "layer"  # recompute the bottom layers of every token, load the top ones
    LOAD_FRONT = "load_front"  # load the front tokens, recompute the back with the new ones


TOKEN, LAYER, LOAD_FRONT = ShapeKind.TOKEN, ShapeKind.LAYER, ShapeKind.LOAD_FRONT
NEG = float("-inf")


@dataclass(frozen=True, slots=True)
class Shape:
    kind: ShapeKind
    split: int  # tokens (TOKEN, LOAD_FRONT) or layers (LAYER), counted from the span's start
    # a token split proper run in its new tokens' forward (``one_forward_token_splits``), not
    # as a chunk of the front and then the extend; a layer split runs so wherever it can
    one_forward: bool = False

    def describe(self, evicted: int, num_layers: int) -> str:
        """Short text: ``token split 4096+4096`` is 4096 recomputed then 4096 loaded."""
        if evicted == 0:
            return "prefill only"
        if self.kind == LAYER:
            if self.split in (0, num_layers):
                return "load all" if self.split == 0 else "recompute all"
            return f"layer split {self.split}/{num_layers}"
        recomputed = self.split if self.kind == TOKEN else evicted - self.split
        if recomputed in (0, evicted):
            return "recompute all" if recomputed else "load all"
        if self.kind == TOKEN:
            return f"token split {self.split}+{evicted - self.split}"
        return f"load front {self.split}+{evicted - self.split}"


@dataclass(slots=True)
class Outcome:
    """A shape priced against the clocks: when the compute side and the loads are ready."""

    compute_ready: float  # A: compute resource done with the restore's own recompute
    load_ready: float  # B: earliest start of the consuming forward allowed by the loads
    ttft: float
    compute_free: float  # new clock of the compute resource
    io_free: dict[str, float]  # new clocks of the tiers this shape loads from


class TierRange(NamedTuple):
    """One evicted range of a request and what loading from its tier costs."""

    tier: str
    start: int  # absolute token positions [start, end)
    end: int
    latency_s: float
    s_per_token_layer: float  # transfer seconds of one token's KV in one layer
    streamed: bool  # the tier's loads arrive layer by layer
    setup_s: float
    # the client's CPU of a split's load (TierCost): per token, per load, per token-layer
    cpu_per_tok: float
    cpu_per_load: float
    cpu_per_tok_layer: float


class Shaper:
    """Prices and emits the shapes of one request under one cost model."""

    __slots__ = (
        "bytes_per_token",
        "caps",
        "cost",
        "device_tokens",
        "evicted",
        "grid",
        "new",
        "num_layers",
        "one_forward",
        "one_forward_token",
        "prefill_s",
        "ranges",
        "reads_until",
        "req",
        "tiers",
    )

    def __init__(
        self, req: Request, cost: CostModel, caps: Capabilities, chunk_tokens: int
    ) -> None:
        self.req = req
        self.cost = cost
        self.caps = caps
        self.num_layers = cost.shape.num_layers
        self.bytes_per_token = cost.shape.kv_bytes_per_token
        self.device_tokens = req.device_tokens
        self.evicted = req.evicted_tokens
        self.new = req.new_tokens
        self.ranges = req.tier_ranges()
        # whether a layer split, a token split runs in the new tokens' forward (``Capabilities``)
        self.one_forward = caps.split_in_one_forward(True, self.evicted + self.new)
        self.one_forward_token = caps.split_in_one_forward(False, self.evicted + self.new)
        self.tiers = [
            TierRange(
                t,
                a,
                b,
                cost.tier(t).latency_s,
                self.bytes_per_token / (cost.tier(t).bandwidth_Bps * self.num_layers),
                caps.streams(t),
                cost.tier(t).setup_s,
                cost.tier(t).cpu_s_per_token,
                cost.tier(t).cpu_s_per_load,
                cost.tier(t).cpu_s_per_token_layer,
            )
            for t, a, b in self.ranges
        ]
        self.prefill_s = cost.recompute_s(req.evicted_end, req.new_tokens)
        # loads of the round (any request's) run until then: a recompute before it is slowed
        self.reads_until = NEG
        # Split points: chunk boundaries in absolute positions (page aligned), plus both ends.
        d, e = self.device_tokens, self.evicted
        first = (d // chunk_tokens + 1) * chunk_tokens
        self.grid = [0, *range(first - d, e, chunk_tokens), e] if e else [0]

    # -- pricing -------------------------------------------------------------------------

    def _loads(
        self,
        lo: int,
        hi: int,
        l0: int,
        io: dict[str, float],
        cper: float,
        steps: list[Step] | None,
        split: bool = False,
    ) -> tuple[float, dict[str, float]]:
        """Load tokens [lo, hi) x layers [l0, L) (``split``: a split's load); return the
        earliest start of a forward that reads them layer by layer from layer 0 at ``cper``
        seconds a layer, and the new clocks of the tiers used. (Hot path of the search: plain
        arithmetic, no calls.)"""
        ready = NEG
        free: dict[str, float] = {}
        L = self.num_layers
        nl = L - l0
        if nl <= 0:
            return ready, free
        split_streams = split and self.caps.streamed_splits
        for tier, a, b, lat, per_tok, streamed, setup, *_ in self.tiers:
            streamed = streamed or split_streams
            x = a if a > lo else lo
            y = b if b < hi else hi
            if x >= y:
                continue
            start = free[tier] if tier in free else io.get(tier, 0.0)
            per = (y - x) * per_tok
            finish = start + lat + nl * per
            free[tier] = finish
            # Layer m (from l0) is in at start + lat + (m - l0 + 1) * per and the forward
            # begins layer m at its start + m * cper: the binding layer is the first or last.
            r = start + lat + per - l0 * cper
            if streamed:
                last = finish - (L - 1) * cper
                if last > r:
                    r = last
            else:
                r = finish - l0 * cper
            r += setup  # usable later, but the channel is free at ``finish``
            if r > ready:
                ready = r
            if steps is not None:
                steps.append(Step(x, y, l0, L, Action.LOAD, tier, start, finish, lat, streamed))
        return ready, free

    def _compute(
        self,
        lo: int,
        hi: int,
        l0: int,
        l1: int,
        at: float,
        steps: list[Step] | None,
        overlapped: bool = False,
        reads_until: float = NEG,
        cpu: ReadCpu | None = None,
    ) -> float:
        """Recompute tokens [lo, hi) x layers [l0, l1) from ``at``: slowed throughout when
        ``overlapped`` (its own loads run beside it), else while loads already in flight
        (other requests') run, until ``reads_until``; delayed by the part of its own loads'
        client CPU (``cpu``) spent while it runs."""
        n = hi - lo
        if n <= 0 or l1 <= l0:
            return at
        c = self.cost.compute
        pairs = n * lo + n * (n - 1) / 2
        frac = (l1 - l0) / self.num_layers
        dur = frac * (c.step_s + n / c.tokens_per_s + c.attention_s_per_token_pair * pairs)
        if frac < 1.0:  # the part outside the layer loop is paid whole (ComputeCost.fixed_s)
            dur += (1.0 - frac) * min(c.unlayered_s, c.step_s)
        if overlapped:
            dur *= 1.0 + c.overlap_slowdown
        else:
            dur = self._beside(dur, at, reads_until)
        if cpu is not None:
            dur += cpu.during(at, dur)
        if steps is not None:
            steps.append(Step(lo, hi, l0, l1, Action.RECOMPUTE, None, at, at + dur))
        return at + dur

    def _read_cpu(self, lo: int, hi: int, l0: int, io: dict[str, float]) -> ReadCpu | None:
        """The client CPU of a split's load of tokens [lo, hi) x layers [l0, L), and when
        that load runs (None where its tiers cost none)."""
        cpu, first, last = 0.0, math.inf, NEG
        nl = self.num_layers - l0
        for tier, a, b, lat, per_tok, _, _, cpu_tok, cpu_load, cpu_tok_layer in self.tiers:
            x, y = max(a, lo), min(b, hi)
            if x >= y or not (cpu_tok or cpu_load or cpu_tok_layer):
                continue
            start = io.get(tier, 0.0)
            cpu += cpu_load + (y - x) * (cpu_tok + nl * cpu_tok_layer)
            first = min(first, start)
            last = max(last, start + lat + nl * (y - x) * per_tok)
        return ReadCpu(cpu, first, last) if cpu > 0 and last > first else None

    def _beside(self, dur: float, at: float, reads_until: float) -> float:
        """A forward of ``dur`` seconds alone, begun at ``at``: slowed while loads run beside
        it (until ``reads_until``), at full speed after."""
        slow = 1.0 + self.cost.compute.overlap_slowdown
        if reads_until <= at or slow <= 1.0:
            return dur
        if at + dur * slow <= reads_until:
            return dur * slow
        # the work done beside the loads is (reads_until - at) / slow
        return dur + (reads_until - at) * (1.0 - 1.0 / slow)

    def _price(
        self,
        kind: ShapeKind,
        split: int,
        tc: float,
        io: dict[str, float],
        steps: list[Step] | None,
        one: bool = False,
    ) -> tuple[float, float, float, dict[str, float]]:
        """(compute ready A, load ready B, TTFT, new tier clocks) of one shape (``one``: a
        token split in one forward, :attr:`Shape.one_forward`)."""
        d, end, L = self.device_tokens, self.device_tokens + self.evicted, self.num_layers
        cper = self.prefill_s / L
        # a split proper (0 < split < the span's end): a chunk, a hand-off, an extend
        is_split = kind != LOAD_FRONT and 0 < split < (L if kind == LAYER else self.evicted)
        reads = max(self.reads_until, max(io.values(), default=NEG))  # loads in flight
        cpu: ReadCpu | None = None
        one_token_forward = one and is_split and kind == TOKEN and self.one_forward_token
        if one_token_forward:
            # Cake's order in one forward: the front and the new tokens go through each layer
            # once the back's KV of that layer has streamed in (a load front mirrored); the
            # front is priced here, the new tokens' share (one fixed cost) below
            mid = d + split
            front = self.cost.recompute_s(d, split)
            pace = (front + self.prefill_s - self.cost.compute.step_s) / L
            pace *= 1.0 + self.cost.compute.overlap_slowdown
            cpu = self._read_cpu(mid, end, 0, io)
            b, free = self._loads(mid, end, 0, io, pace, steps, True)
            a = self._compute(d, mid, 0, L, max(tc, b), steps, True, reads, cpu)
            b = NEG
        elif kind == TOKEN:
            mid = d + split
            cpu = self._read_cpu(mid, end, 0, io) if is_split else None
            a = self._compute(d, mid, 0, L, tc, steps, mid < end, reads, cpu)
            b, free = self._loads(mid, end, 0, io, cper, steps, is_split)
        elif kind == LAYER and is_split and self.one_forward:
            # the span and the new tokens through layers [0, split), then the new tokens
            # alone through the rest, each layer as its span KV streams in
            cpu = self._read_cpu(d, end, split, io)
            a = self._compute(d, end + self.new, 0, split, tc, None, True, reads, cpu)
            if steps is not None:
                steps.append(Step(d, end, 0, split, Action.RECOMPUTE, None, tc, a))
            top_per = (self.prefill_s - self.cost.compute.fixed_s(0.0)) / L
            b, free = self._loads(d, end, split, io, top_per, steps, True)
            b += split * top_per  # when the top layers can begin
        elif kind == LAYER:
            cpu = self._read_cpu(d, end, split, io) if is_split else None
            a = self._compute(d, end, 0, split, tc, steps, split < L, reads, cpu)
            b, free = self._loads(d, end, split, io, cper, steps, is_split)
        else:  # LOAD_FRONT: the back's recompute is the forward that waits for the loads
            mid = d + split
            rc = self.cost.recompute_s(mid, end - mid)
            if rc > 0:
                if mid > d:
                    rc *= 1.0 + self.cost.compute.overlap_slowdown
                    cpu = self._read_cpu(d, mid, 0, io)  # the read runs beside the forward
                b, free = self._loads(d, mid, 0, io, rc / L, steps)
                a = self._compute(mid, end, 0, L, max(tc, b), steps, mid > d, reads, cpu)
                b = NEG
            else:
                a = tc
                b, free = self._loads(d, mid, 0, io, cper, steps)
        # a split's hand-off from its chunk to its extend (0 < split < the span's end; in one
        # forward, what narrowing it costs): what its forwards do not price, learnt
        one_forward = is_split and kind == LAYER and self.one_forward
        hand_off = self.cost.compute.split_s if is_split else 0.0
        if self.new:
            prefill = self.prefill_s
            if (kind == LOAD_FRONT and split < self.evicted) or one_token_forward:
                # the recomputed part and the new tokens are one forward: one fixed cost
                prefill = max(0.0, prefill - self.cost.compute.step_s)
            elif one_forward:  # the top layers only; the unlayered part ran with the bottom
                prefill = (L - split) / L * (prefill - self.cost.compute.fixed_s(0.0))
            start = max(a, b) + hand_off
            if is_split:
                # the extend reads the span layer by layer while the split's loads stream
                # in: it runs beside them until they end
                prefill = self._beside(prefill, start, max(free.values(), default=NEG))
                if cpu is not None:
                    prefill += cpu.during(start, prefill)
            ttft = start + prefill
            if steps is not None:
                e = self.req.evicted_end
                steps.append(
                    Step(e, e + self.new, 0, L, Action.PREFILL, None, ttft - prefill, ttft)
                )
        else:  # nothing to prefill: done when its last own step ends
            ttft = max(free.values(), default=0.0)
            if a > tc:
                ttft = max(ttft, a)
            ttft += hand_off
        return a, b, ttft, free

    def token_split(
        self, split: int, tc: float, io: dict[str, float], one: bool | None = None
    ) -> tuple[Shape, Outcome]:
        """A token split at ``split``: in one forward (``one``), as a chunk and an extend, or
        (None) whichever of the two ends first where the executor runs both."""
        two = Shape(TOKEN, split)
        if not (self.one_forward_token and 0 < split < self.evicted) or one is False:
            return two, self.run(two, tc, io)
        single = Shape(TOKEN, split, True)
        got = self.run(single, tc, io)
        if one:
            return single, got
        other = self.run(two, tc, io)
        return (single, got) if got.ttft <= other.ttft else (two, other)

    def runs_in_one_forward(self, shape: Shape) -> bool:
        """Whether ``shape`` runs in its new tokens' forward: a token split so marked, a
        layer split proper wherever the executor can."""
        if shape.kind == LAYER:
            return self.one_forward and 0 < shape.split < self.num_layers
        return shape.one_forward

    def run(
        self, shape: Shape, tc: float, io: dict[str, float], steps: list[Step] | None = None
    ) -> Outcome:
        """Price ``shape`` with compute free at ``tc`` and tier channels free at ``io``."""
        a, b, ttft, free = self._price(shape.kind, shape.split, tc, io, steps, shape.one_forward)
        return Outcome(a, b, ttft, ttft if self.new else a, free)

    # -- search --------------------------------------------------------------------------

    def best(self, tc: float, io: dict[str, float]) -> tuple[Shape, Outcome]:
        """The allowed shape with the earliest TTFT given the clocks."""
        cands: list[tuple[float, Shape]] = []
        if self.caps.token_split:
            # not in one forward: CacheFlow was no faster with it (docs/benchmarks.md,
            # "Cake's order in one forward"); Cake's rule takes it (:meth:`token_split`)
            cands += self._crossing(TOKEN, self.grid, tc, io)
        if self.caps.layer_split:
            cands += self._layer_crossing(tc, io)
        if self.caps.load_front or not cands:
            points = self.grid if self.caps.load_front else [0]
            points = [j for j in points if self.req.stages(j)]
            cands += [
                self._convex_min(LOAD_FRONT, seg, tc, io)
                for seg in self._load_front_segments(points)
            ]
        best = min(cands, key=lambda c: c[0])[1]
        return best, self.run(best, tc, io)

    def _load_front_segments(self, points: list[int]) -> list[list[int]]:
        """Split points where the TTFT jumps: a tier's first loaded token adds its latency,
        and loading everything drops the back's forward. Between jumps the TTFT is convex
        (a max of convex pieces: pipelined loads grow linearly, the back's recompute
        shrinks convexly)."""
        cuts = sorted({t.start - self.device_tokens for t in self.tiers} | {self.evicted})
        segs: list[list[int]] = []
        cur: list[int] = []
        ci = 0
        for j in points:
            while ci < len(cuts) and j > cuts[ci]:
                ci += 1
                if cur:
                    segs.append(cur)
                    cur = []
            cur.append(j)
            if j == self.evicted and len(cur) > 1:
                segs.append(cur[:-1])
                cur = [j]
        if cur:
            segs.append(cur)
        return segs

    def _convex_min(
        self, kind: ShapeKind, points: list[int], tc: float, io: dict[str, float]
    ) -> tuple[float, Shape]:
        """Minimum of a convex TTFT over ``points``: the first point whose forward
        difference is not negative."""
        lo, hi = 0, len(points) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            here = self._price(kind, points[mid], tc, io, None)[2]
            if self._price(kind, points[mid + 1], tc, io, None)[2] >= here:
                hi = mid
            else:
                lo = mid + 1
        return self._price(kind, points[lo], tc, io, None)[2], Shape(kind, points[lo])

    def _crossing(
        self, kind: str, points: list[int], tc: float, io: dict[str, float]
    ) -> list[tuple[float, Shape]]:
        """Binary search for the first split where compute is no earlier than the loads,
        and for the first where the loads end before the extend starts.

        TTFT = max(A(x), B(x)) + prefill with A non-decreasing and B non-increasing in x;
        the prefill runs slower while the split's loads (ending at F(x), non-increasing) run
        beside it, which makes the TTFT about linear between the two splits found. So the
        optimum is at one of them or the split before the first.
        """
        seen: dict[int, float] = {}

        def first(ready: Callable[[float, float, dict[str, float]], bool]) -> int:
            lo, hi = 0, len(points) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                a, b, seen[mid], free = self._price(kind, points[mid], tc, io, None)
                if ready(a, b, free):
                    hi = mid
                else:
                    lo = mid + 1
            return lo

        meet = first(lambda a, b, free: a >= b)
        ends = meet
        if self.cost.compute.overlap_slowdown > 0:
            ends = first(lambda a, b, free: a >= max(free.values(), default=NEG))
        low = self._first_split()  # the first point if it loads all, else the next one
        return [
            (
                seen[i] if i in seen else self._price(kind, points[i], tc, io, None)[2],
                Shape(kind, points[i]),
            )
            for i in sorted({max(low, x) for x in (meet - 1, meet, ends)})
            if i < len(points)
        ]

    def _first_split(self) -> int:
        """0, or 1 where loading the whole span (split 0 of a token or layer split, which is
        no split) is a load the engine cannot stage (``Request.staged_load``)."""
        return 0 if self.req.stages(self.evicted) else 1

    def _layer_crossing(self, tc: float, io: dict[str, float]) -> list[tuple[float, Shape]]:
        """The layer split where compute meets the loads, solved in closed form.

        A(l) = tc + l * C / L rises linearly; the loads' readiness B(l) is a max of lines
        falling in l (one per tier and per end of the layer range), so A(l) >= B(l) holds
        from the largest crossing point of A with those lines on.
        """
        L = self.num_layers
        if len({t.tier for t in self.tiers}) < len(self.tiers) or self.one_forward:
            # a tier's loads queue up, or the top layers start with the loads (no closed form)
            return self._crossing(LAYER, list(range(L + 1)), tc, io)
        # for 0 < l < L the bottom layers run while the top ones stream in
        # A(l) = tc + slow * (fixed + l * (C - fixed) / L): the unlayered part paid whole
        slow = 1.0 + self.cost.compute.overlap_slowdown
        fixed = self.cost.compute.fixed_s(0.0)
        c_full = self.cost.recompute_s(self.device_tokens, self.evicted)
        c_layer = slow * (c_full - fixed) / L
        cper = self.prefill_s / L
        low = self._first_split()
        points: set[int] = set()
        # The chunk is also delayed by the loads' client CPU spent while it runs, between
        # none and all of it: both ends of A give crossings, each priced in full below.
        cpu = sum(
            t.cpu_per_load + (t.end - t.start) * (t.cpu_per_tok + L * t.cpu_per_tok_layer)
            for t in self.tiers
        )
        for a0 in {tc + slow * fixed, tc + slow * fixed + cpu}:
            cross = ends = 0.0
            for tier, a, b, lat, per_tok, streamed, setup, *_ in self.tiers:
                streamed = streamed or self.caps.streamed_splits  # 0 < l < L: a split
                start = io.get(tier, 0.0) + lat
                base = start + setup
                per = (b - a) * per_tok
                # B's pieces as k0 - k1 * l, l = first loaded layer (see _loads)
                if streamed:
                    lines = [(base + per, cper), (base + L * per - (L - 1) * cper, per)]
                else:
                    lines = [(base + L * per, per + cper)]
                for k0, k1 in lines:
                    if c_layer + k1 > 0:
                        cross = max(cross, (k0 - a0) / (c_layer + k1))
                # where the loads (ending at start + (L - l) * per) end before the extend
                if slow > 1.0 and c_layer + per > 0:
                    ends = max(ends, (start + L * per - a0) / (c_layer + per))
            hi, end = (min(L, max(0, math.ceil(x - 1e-12))) for x in (cross, ends))
            points |= {max(low, hi - 1), max(low, hi), max(low, end)}
        return [(self._price(LAYER, x, tc, io, None)[2], Shape(LAYER, x)) for x in points]

    # -- Cake's run-time meeting point -----------------------------------------------------

    def cake_split(self, tc: float, io: dict[str, float]) -> int:
        """Where Cake's pointers meet: compute claims front chunks, one I/O worker claims
        back chunks (paying a tier's latency per chunk); each side claims its next chunk when
        it gets to it, so chunk k is recomputed iff compute reaches it no later than I/O.

        The executors recompute the claimed front in one forward (the plan's step), so the
        compute pointer advances at the pace of that forward: one per-forward cost, not one
        per chunk (which would make Cake load far past the meeting point wherever a forward's
        fixed cost is large, as on a CPU)."""
        g, n = self.grid, len(self.grid) - 1
        if n == 0:
            return 0
        d = self.device_tokens
        t0 = max((io.get(t.tier, 0.0) for t in self.tiers), default=0.0)

        slow = 1.0 + self.cost.compute.overlap_slowdown  # the I/O worker runs alongside

        def compute_reaches(k: int) -> float:
            return tc + slow * self.cost.recompute_s(d, g[k])

        def io_reaches(k: int) -> float:
            # I/O has loaded chunks k+1..n-1 (tokens [d + g[k+1], d + e)) before chunk k.
            lo = d + g[k + 1]
            t = t0
            for _tier, a, b, lat, per_tok, *_ in self.tiers:
                x = max(a, lo)
                if x < b:
                    t += (b - x) * per_tok * self.num_layers
                    # one latency per chunk whose first token lies in [max(a, lo), b)
                    t += lat * (bisect_left(g, b - d) - bisect_left(g, x - d))
            return t

        lo, hi = 0, n  # f = number of front chunks compute claims
        while lo < hi:
            mid = (lo + hi) // 2
            if compute_reaches(mid) <= io_reaches(mid):
                lo = mid + 1
            else:
                hi = mid
        return g[lo]
