"""What the runtime restores: a request's tokens, where its evicted KV lives, its KV buffer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglang_cacheflow.planner import Request, Span
from sglang_cacheflow.runtime.kv import KVCache


@dataclass
class RestoreRequest:
    """One request of a restore round.

    ``input_ids`` are all its tokens: the cached prefix, then the new tokens (at least one).
    Tokens ``[0, device_tokens)`` have their KV in ``kv`` already; the next ones are evicted
    to the tiers in ``spans`` (prefix order); the rest are new. ``page_hashes[p]`` is the
    key of page ``p`` (tokens ``[p*T, (p+1)*T)``, ``T = kv.page_tokens``) in the tiers;
    pages outside the evicted span may be ``""``.
    """

    id: str
    input_ids: torch.Tensor
    device_tokens: int
    spans: tuple[Span, ...]
    kv: KVCache
    page_hashes: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.input_ids = self.input_ids.reshape(-1)
        if self.new_tokens < 1:
            raise ValueError(
                f"request {self.id!r}: {self.input_ids.numel()} tokens leave no new token after "
                f"the cached prefix of {self.evicted_end}"
            )
        if self.kv.capacity < self.input_ids.numel():
            raise ValueError(
                f"request {self.id!r}: KV buffer holds {self.kv.capacity} tokens, "
                f"needs {self.input_ids.numel()}"
            )

    @property
    def evicted_end(self) -> int:
        return self.device_tokens + sum(s.tokens for s in self.spans)

    @property
    def new_tokens(self) -> int:
        return int(self.input_ids.numel()) - self.evicted_end

    def planner_request(self) -> Request:
        return Request(self.id, self.device_tokens, tuple(self.spans), self.new_tokens)
