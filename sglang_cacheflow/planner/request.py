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

    def __post_init__(self) -> None:
        if self.device_tokens < 0 or self.new_tokens < 0:
            raise ValueError(f"request {self.id!r}: device_tokens and new_tokens must be >= 0")

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
