"""What an executor can run; the planner plans only shapes its executor supports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    """Restore shapes an executor supports.

    ``token_split``: recompute the front of a span while loading its back (Cake's order).
    ``layer_split``: recompute the bottom layers of a span while loading the top ones.
    ``load_front``: load the front of a span, recompute the back in the same forward
    (what SGLang's extend does with a capped host hit).
    ``streamed_tiers``: tiers whose loads arrive layer by layer, so a forward can start
    on layer i as soon as layer i is in (``None``: every tier).
    ``streamed_splits``: the loads of token and layer splits stream layer by layer into
    the forward that follows them, from any tier (the executor reads them itself, whatever
    its whole-span loads do).
    ``one_forward_layer_splits``: a layer split runs in the forward of the new tokens: the
    span and the new tokens go through the bottom layers together, the new tokens alone
    through the top ones, whose span KV streams in meanwhile (one forward's fixed cost);
    where the span and the new tokens fit one forward (``batch_tokens``).
    ``one_forward_token_splits``: a token split runs in the forward of the new tokens
    (Cake's order in one forward): the front and the new tokens go through every layer
    together, each layer once the back's KV of that layer has streamed in; within
    ``batch_tokens`` too.
    ``batch_tokens``: the engine runs the waiting prefills together in forwards of up to
    this many tokens (SGLang: ``chunked_prefill_size``), each of them getting its first
    token when the forward holding its last token ends; under a policy it does not serve
    one restore per forward (the baselines), the restores that load nothing are timed so
    (:mod:`~sglang_cacheflow.planner.batching`). 0: one restore per forward.
    """

    token_split: bool = True
    layer_split: bool = True
    load_front: bool = False
    streamed_tiers: frozenset[str] | None = None
    streamed_splits: bool = False
    one_forward_layer_splits: bool = False
    one_forward_token_splits: bool = False
    batch_tokens: int = 0

    def split_in_one_forward(self, layer: bool, tokens: int) -> bool:
        """Whether a layer split (``layer``) or a token split whose span and new tokens are
        ``tokens`` together runs in the new tokens' forward (``one_forward_layer_splits``,
        ``one_forward_token_splits``; within ``batch_tokens``)."""
        allowed = self.one_forward_layer_splits if layer else self.one_forward_token_splits
        budget = self.batch_tokens
        return allowed and (not budget or tokens <= budget)

    def streams(self, tier: str) -> bool:
        """Whether whole-span loads from ``tier`` arrive layer by layer."""
        return self.streamed_tiers is None or tier in self.streamed_tiers


#: The reference runtime streams every tier layer by layer. It can also run load-front
#: shapes, but a token split restores the same tokens with a cheaper recompute (the front of
#: a span attends to fewer tokens than its back), so the planner need not search them.
RUNTIME = Capabilities(token_split=True, layer_split=True, load_front=False)
