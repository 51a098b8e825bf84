"""What a request has where: tokens on device, evicted spans per tier, new tokens."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """``tokens`` consecutive evicted tokens held by ``tier``."""

    tier: str
    tokens: int

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"span on tier {self.tier!r} has negative length {self.tokens}")


@dataclass(frozen=True)
class Request:
    """A request whose prefix is ``device_tokens`` on device, then ``spans`` in prefix order.

    The evicted region is ``[device_tokens, device_tokens + evicted_tokens)``; the
    ``new_tokens`` follow it and are always prefilled.
    """

    id: str
    device_tokens: int
    spans: tuple[Span, ...]
    new_tokens: int
    # A load that is not a split (a front of the span, or all of it) goes through the
    # engine's staging (SGLang: an L3 prefetch into host memory), which loads nothing or
    # between ``lo`` and ``hi`` tokens: its smallest prefetch and its free room. None: any.
    staged_load: tuple[int, int] | None = None
    # Tests and experiments: this request's shape, ``(kind, recomputed fraction)`` as
    # plan()'s ``force``, whatever the policy would choose. None: the policy's.
    force: tuple[str, float] | None = None

    def __post_init__(self) -> None:
        if self.device_tokens < 0 or self.new_tokens < 0:
            raise ValueError(f"request {self.id!r}: device_tokens and new_tokens must be >= 0")
        if self.staged_load is not None and min(self.staged_load) < 0:
            raise ValueError(f"request {self.id!r}: staged_load bounds must be >= 0")

    def stages(self, tokens: int) -> bool:
        """Whether a load of the span's first ``tokens`` that is not a split can run."""
        if tokens == 0 or self.staged_load is None:
            return True
        lo, hi = self.staged_load
        return lo <= tokens <= hi

    @property
    def evicted_tokens(self) -> int:
        return sum(s.tokens for s in self.spans)

    @property
    def evicted_end(self) -> int:
        return self.device_tokens + self.evicted_tokens

    def tier_ranges(self) -> list[tuple[str, int, int]]:
        """``(tier, start, end)`` in absolute token positions, empty spans dropped."""
        out: list[tuple[str, int, int]] = []
        pos = self.device_tokens
        for span in self.spans:
            if span.tokens:
                out.append((span.tier, pos, pos + span.tokens))
                pos += span.tokens
        return out
