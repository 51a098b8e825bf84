"""A split restore in the forward of its new tokens: part of the span leaves the forward at
one layer while the rest of it streams in.

Run as two forwards (a chunk that recomputes part of the span, then the new tokens' extend),
a split pays a forward's fixed cost twice (on the CPU engine most of a forward of a few tokens
is reading the weights) and hands off between them. Here it is one forward: the request is
admitted with its whole extend ``[d, d+E+n)`` and, at one layer, forward pre-hooks on the
model's decoder layers (:class:`Narrowed`) take the span's loaded rows out of it: their hidden
states and residual, positions, KV slots, and the batch's extend lengths. The rows that stay
read the loaded KV, which the split's load streams into the span's slots as each layer is
asked for (:class:`~sglang_cacheflow.sglang.stream.StreamedLayers`).

- A layer split ``l`` (layers ``[0, l)`` recomputed, ``[l, L)`` loaded): the span and the new
  tokens run through layers ``[0, l)`` together; at layer ``l`` the span's ``E`` rows leave
  and become prefix, the new tokens alone go on.
- A token split ``s`` (Cake's order: tokens ``[d, d+s)`` recomputed, ``[d+s, d+E)`` loaded):
  the back's rows leave before layer 0, so the front and the new tokens go through every
  layer together with a hole between them. Positions keep the hole, and the attention
  backend reads each query's position rather than a prefix length (``cacheflow_cpu``:
  :mod:`~sglang_cacheflow.sglang.cpu.attention`). The front never attends to the back, so
  only the new tokens need each layer's group, but a layer waits for it as a whole.
- A blend (:mod:`~sglang_cacheflow.sglang.blend`): the loaded tokens of reused chunks, rows
  anywhere in the extend, leave before layer 0 the same way.

Who owns what, when: the span's slots are the request's from its admission (SGLang allocates
them with its extend); the computed part is written by this forward, the loaded part by the
stream; the request's KV stays out of the radix tree until the stream is settled after the
forward (a load that falls short cuts the request back, as for any streamed split: what this
forward computed of the span is whole up to the loaded part's first missing page).

Limits: one request in the forward (a streamed split runs alone); the CPU engine's attention
backends, which read the batch's extend lengths at every layer (a CUDA backend plans its
kernels once per forward). Input logprobs are never asked over a span: SGLang matches no
prefix over the tokens whose input logprobs a request wants.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["Narrowed", "narrow_extend"]


def _kept(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The rows ``keep`` (ascending int64 indices) of ``x``."""
    return x.index_select(0, keep.to(x.device))


def narrow_extend(fb: Any, drop: torch.Tensor) -> torch.Tensor:
    """Take the extend rows ``drop`` (ascending int64 indices, one request's) out of ``fb``
    (SGLang's ``ForwardBatch`` of one extending request): a run of them from row 0 becomes
    prefix; any other leaves a hole in the positions. Returns the rows kept."""
    n = fb.input_ids.shape[0]
    gone = drop.numel()
    mask = torch.ones(n, dtype=torch.bool)
    mask[drop] = False
    keep = mask.nonzero().reshape(-1)
    lead = int(keep[0]) if keep.numel() else n  # dropped rows before the first kept one
    fb.input_ids = _kept(fb.input_ids, keep)
    fb.positions = _kept(fb.positions, keep)
    fb.out_cache_loc = _kept(fb.out_cache_loc, keep)
    if lead:
        fb.extend_prefix_lens = fb.extend_prefix_lens + lead
        fb.extend_prefix_lens_cpu = [p + lead for p in fb.extend_prefix_lens_cpu]
    fb.extend_seq_lens = fb.extend_seq_lens - gone
    fb.extend_seq_lens_cpu = [m - gone for m in fb.extend_seq_lens_cpu]
    fb.extend_num_tokens = sum(fb.extend_seq_lens_cpu)
    if fb.extend_logprob_start_lens_cpu is not None:
        before = torch.cumsum(mask, 0).tolist()  # rows kept up to and including each row
        fb.extend_logprob_start_lens_cpu = [
            s if s == 0 else before[min(s, n) - 1] for s in fb.extend_logprob_start_lens_cpu
        ]
    if fb.num_token_non_padded is not None:
        fb.num_token_non_padded = torch.full_like(fb.num_token_non_padded, fb.extend_num_tokens)
    from sglang.srt.model_executor.forward_context import get_attn_backend

    get_attn_backend().init_forward_metadata(fb)  # the attention layout of the narrowed batch
    return keep


class Narrowed:
    """Forward pre-hooks on ``stack.layers[layer:]`` that take the extend rows ``drop``
    (ascending indices) out of one forward at ``layer`` (see the module doc).
    ``switched_at``: when the forward reached ``layer`` (``perf_counter()``), None before."""

    def __init__(self, stack: Any, layer: int, drop: torch.Tensor) -> None:
        self.layer, self.drop = layer, drop.to(torch.int64)
        self.switched_at: float | None = None
        self._keep: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._handles = [
            stack.layers[i].register_forward_pre_hook(self._hook, with_kwargs=True)
            for i in range(layer, stack.end_layer)
        ]

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        positions, hidden, fb = args[:3]
        if self._positions is None:
            self.switched_at = time.perf_counter()
            hidden = self._narrow(hidden, fb)
            assert self._keep is not None
            self._positions = _kept(positions, self._keep)
        return (self._positions, hidden, fb, *args[3:]), kwargs

    def _narrow(self, hidden: Any, fb: Any) -> Any:
        from sglang.srt.layers.layer_boundary.residual import batch as residual

        # the layer below's output (or the embeddings), complete, with the residual it owes
        hidden = residual.complete_output(hidden, fb)
        handoff = residual.export_replay_handoff(hidden, fb)
        self._keep = keep = narrow_extend(fb, self.drop)
        narrowed = handoff._replace(
            value=_kept(handoff.value, keep),
            residual=None if handoff.residual is None else _kept(handoff.residual, keep),
        )
        return residual.import_replay_handoff(narrowed, fb)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
