"""What SGLang 0.5.23 with ``--enable-cacheflow`` can run: the restore shapes the planner may
choose for it (see docs/sglang.md, "Split restores")."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sglang_cacheflow.planner.capabilities import Capabilities
from sglang_cacheflow.tiers.names import HOST_TIER, L3_TIER

SGLANG = Capabilities(
    token_split=True, layer_split=True, load_front=True, streamed_tiers=frozenset({HOST_TIER})
)
"""The extend loads the front of a hit (host loads stream per layer through
``LayerDoneCounter``; a storage prefetch lands whole pages in host memory first) and
recomputes the back. Split restores run as a first chunk that recomputes the front (token
split) or the bottom layers of the span (layer split) while the project's reader brings the
rest into staging memory, spliced into the request's KV slots before the new tokens extend
(so a split's load is not streamed)."""

SGLANG_STREAMED = replace(SGLANG, streamed_splits=True)
"""As :data:`SGLANG`, with split restores streamed (``stream_groups`` > 1): the extend of the
new tokens starts at the splice and each of its layers waits for that layer of the load."""


def sglang_capabilities(
    stream_groups: int | None,
    batch_tokens: int = 0,
    front_loads: bool = False,
    one_forward_layer: bool = False,
    one_forward_token: bool = False,
) -> Capabilities:
    """What a server runs: splits streamed with ``stream_groups`` > 1, and then, with
    ``front_loads`` (``stream_front_loads``), L3 front loads (load front, load all) too,
    through the split reader, where they are otherwise SGLang's prefetch, and with
    ``one_forward_layer``, ``one_forward_token`` (``one_forward_*_splits``) layer and token
    splits in the new tokens' forward (:mod:`~sglang_cacheflow.sglang.one_forward`). Prefills
    batched in forwards of up to ``batch_tokens`` tokens (:func:`prefill_budget`)."""
    streamed = (stream_groups or 1) > 1
    caps = SGLANG_STREAMED if streamed else SGLANG
    if streamed and front_loads:
        caps = replace(caps, streamed_tiers=frozenset({HOST_TIER, L3_TIER}))
    if streamed:
        caps = replace(
            caps,
            one_forward_layer_splits=one_forward_layer,
            one_forward_token_splits=one_forward_token,
        )
    return replace(caps, batch_tokens=max(0, batch_tokens))


def prefill_budget(server_args: Any) -> int:
    """Tokens SGLang puts in one prefill forward: its ``chunked_prefill_size`` (a request
    beyond it is chunked), within ``max_prefill_tokens``; 0 where neither is set."""
    limits = [
        int(v) for v in (
            getattr(server_args, "chunked_prefill_size", None),
            getattr(server_args, "max_prefill_tokens", None),
        )
        if v is not None and int(v) > 0
    ]  # fmt: skip
    return min(limits, default=0)
