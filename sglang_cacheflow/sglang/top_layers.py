"""A layer split in the forward of its new tokens: the span leaves the forward at layer ``l``.

A layer split ``l`` of a span ``[d, d+E)`` recomputes layers ``[0, l)`` of the span and loads
layers ``[l, L)``. Run as two forwards (a chunk through the bottom layers, then the new tokens'
extend), it pays a forward's fixed cost twice (on the CPU engine most of a forward of a few
tokens is reading the weights) and hands off between them. Here it is one forward: the
request is admitted with its whole extend ``[d, d+E+n)``; the span and the new tokens run
through layers ``[0, l)`` together, and at layer ``l`` (:class:`TopLayers`, forward pre-hooks
on the model's decoder layers) the forward narrows to the ``n`` new tokens: their hidden
states and residual, their positions, KV slots, and the batch's extend lengths (the span is
now prefix). Their attention at layers ``[l, L)`` reads the span's KV, which the split's load
streams into the span's slots as each layer is asked for
(:class:`~sglang_cacheflow.sglang.stream.StreamedLayers`).

Who owns what, when: the span's slots are the request's from its admission (SGLang allocates
them with its extend); the bottom layers are written by this forward, the top ones by the
stream; the request's KV stays out of the radix tree until the stream is settled after the
forward (a load that falls short cuts the request back, as for any streamed split).

Limits: one request in the forward (a streamed split runs alone); the CPU engine's attention
backends, which read the batch's extend lengths at every layer (a CUDA backend plans its
kernels once per forward). Input logprobs are never asked over a span: SGLang matches no
prefix over the tokens whose input logprobs a request wants.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["TopLayers", "narrow_extend"]


def narrow_extend(fb: Any, span: int) -> None:
    """Make ``fb`` (SGLang's ``ForwardBatch`` of one extending request) the extend of its
    tokens after the first ``span``, which become prefix."""
    keep = slice(span, None)
    fb.input_ids = fb.input_ids[keep]
    fb.positions = fb.positions[keep]
    fb.out_cache_loc = fb.out_cache_loc[keep]
    fb.extend_prefix_lens = fb.extend_prefix_lens + span
    fb.extend_seq_lens = fb.extend_seq_lens - span
    fb.extend_prefix_lens_cpu = [p + span for p in fb.extend_prefix_lens_cpu]
    fb.extend_seq_lens_cpu = [n - span for n in fb.extend_seq_lens_cpu]
    fb.extend_num_tokens = sum(fb.extend_seq_lens_cpu)
    if fb.extend_logprob_start_lens_cpu is not None:
        fb.extend_logprob_start_lens_cpu = [
            max(0, s - span) for s in fb.extend_logprob_start_lens_cpu
        ]
    if fb.num_token_non_padded is not None:
        fb.num_token_non_padded = torch.full_like(fb.num_token_non_padded, fb.extend_num_tokens)
    from sglang.srt.model_executor.forward_context import get_attn_backend

    get_attn_backend().init_forward_metadata(fb)  # the attention layout of the narrowed batch


class TopLayers:
    """Forward pre-hooks on ``stack.layers[layer:]`` that narrow one forward to its tokens
    after the first ``span`` at ``layer`` (see the module doc). ``switched_at``: when the
    forward reached ``layer`` (``perf_counter()``), None before."""

    def __init__(self, stack: Any, layer: int, span: int) -> None:
        self.layer, self.span = layer, span
        self.switched_at: float | None = None
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
            self._positions = positions[self.span :]
        return (self._positions, hidden, fb, *args[3:]), kwargs

    def _narrow(self, hidden: Any, fb: Any) -> Any:
        from sglang.srt.layers.layer_boundary.residual import batch as residual

        # the layer below's output, complete, with the residual it still owes
        hidden = residual.complete_output(hidden, fb)
        handoff = residual.export_replay_handoff(hidden, fb)
        keep = slice(self.span, None)
        narrowed = handoff._replace(
            value=handoff.value[keep],
            residual=None if handoff.residual is None else handoff.residual[keep],
        )
        narrow_extend(fb, self.span)
        return residual.import_replay_handoff(narrowed, fb)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
