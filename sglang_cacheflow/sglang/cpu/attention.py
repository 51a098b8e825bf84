"""The ``cacheflow_cpu`` attention backend: attention on CPU that pays only for new tokens.

SGLang's ``torch_native`` backend pads every extend's queries to the whole KV
length (``_run_sdpa_forward_extend``), so an extend over a cached prefix costs as
much attention as recomputing the prefix, and a cache hit saves only the MLPs.
This backend is ``torch_native`` with both SDPA paths replaced:

- extend: only the request's new queries attend, against prefix + new keys,
  with the causal diagonal offset by the prefix length (``is_causal`` when
  there is no prefix, a boolean mask otherwise, nothing for one new token);
- decode: each request's single query attends all its keys; the query heads
  that share a KV head are folded into one SDPA row block, so grouped-query
  attention reads every key once.

An extend may leave a hole between its queries (a token split in one forward,
:mod:`~sglang_cacheflow.sglang.one_forward`: the loaded back of a span leaves the
forward, its KV streamed in): where a request's prefix and new tokens do not add
up to its sequence, each query attends the keys up to its own position.

Per forward batch, the request layout (query ranges, KV slots, masks) is built
once and reused by every layer; a request whose KV slots are one contiguous run
reads the KV pool through a view instead of a gather. Cases this backend does
not specialise (encoder-decoder, cross attention, sliding windows, logit
capping) fall back to ``torch_native``'s code, which handles them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from torch.nn.functional import scaled_dot_product_attention

if TYPE_CHECKING:
    from sglang.srt.model_executor.model_runner import ModelRunner


@dataclass(frozen=True)
class _Request:
    """One request of a forward batch, as every layer's attention needs it."""

    q_start: int
    q_end: int
    prefix_len: int
    kv: slice | torch.Tensor
    """KV pool rows of the request's tokens: a slice when they are contiguous."""
    mask: torch.Tensor | None
    """Boolean [new, keys] mask, or None when ``is_causal`` or no mask applies."""
    is_causal: bool


@dataclass(frozen=True)
class _Plan:
    seq_lens: torch.Tensor
    """The batch's ``seq_lens`` tensor: the plan is reused while the same object comes in."""
    requests: tuple[_Request, ...]


def _kv_rows(tokens: torch.Tensor) -> slice | torch.Tensor:
    """A slice when ``tokens`` is one ascending run of consecutive slots, else int64 indices."""
    tokens = tokens.to(torch.int64)
    n = tokens.numel()
    if n == 0:
        return slice(0, 0)
    first, last = int(tokens[0]), int(tokens[-1])
    if last - first == n - 1 and (n == 1 or bool((tokens[1:] - tokens[:-1] == 1).all())):
        return slice(first, last + 1)
    return tokens


def _offset_causal_mask(new: int, prefix: int) -> torch.Tensor:
    """``mask[i, j]``: query ``i`` (position ``prefix + i``) may attend key ``j``."""
    keys = torch.arange(prefix + new).unsqueeze(0)
    queries = torch.arange(prefix, prefix + new).unsqueeze(1)
    return keys <= queries


def _plan(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    prefix_lens: torch.Tensor | None,
    new_lens: torch.Tensor | None,
    positions: torch.Tensor | None = None,
) -> _Plan:
    """The per-request layout of an extend (with prefix and new lengths, and the queries'
    ``positions`` where an extend has a hole) or a decode batch."""
    lens = [int(x) for x in seq_lens.tolist()]
    rows = [int(x) for x in req_pool_indices.tolist()]
    if prefix_lens is None or new_lens is None:
        prefixes = [n - 1 for n in lens]
        news = [1] * len(lens)
    else:
        prefixes = [int(x) for x in prefix_lens.tolist()]
        news = [int(x) for x in new_lens.tolist()]
    requests = []
    q_start = 0
    for row, total, prefix, new in zip(rows, lens, prefixes, news, strict=True):
        kv = _kv_rows(req_to_token[row, :total])
        if prefix + new != total:  # a hole: each query attends up to its position
            if positions is None or prefix + new > total:
                raise ValueError(f"prefix {prefix} + new {new} != sequence length {total}")
            queries = positions[q_start : q_start + new].to(torch.int64).unsqueeze(1)
            mask = torch.arange(total).unsqueeze(0) <= queries
            requests.append(_Request(q_start, q_start + new, prefix, kv, mask, False))
            q_start += new
            continue
        is_causal = prefix == 0 and new > 1
        mask = _offset_causal_mask(new, prefix) if prefix > 0 and new > 1 else None
        requests.append(_Request(q_start, q_start + new, prefix, kv, mask, is_causal))
        q_start += new
    return _Plan(seq_lens, tuple(requests))


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    request: _Request,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of ``q`` [new, H, D] over ``k``, ``v`` [prefix + new, Hkv, D] -> [new, H, Dv]."""
    new, heads, dim = q.shape
    kv_heads = k.shape[1]
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    k_h, v_h = k.transpose(0, 1), v.transpose(0, 1)
    if new == 1 and request.mask is None:
        # Every key is visible: fold the query heads of each KV head into rows.
        group = heads // kv_heads
        out = scaled_dot_product_attention(q.reshape(kv_heads, group, dim), k_h, v_h, scale=scaling)
        return out.reshape(1, heads, v.shape[-1])
    out = scaled_dot_product_attention(
        q.transpose(0, 1),
        k_h,
        v_h,
        attn_mask=request.mask,
        is_causal=request.is_causal,
        scale=scaling,
        enable_gqa=heads != kv_heads,
    )
    return out.transpose(0, 1)


class CpuAttnBackend(TorchNativeAttnBackend):
    """``torch_native`` with prefix-aware extend and grouped decode (see the module doc)."""

    def __init__(self, model_runner: ModelRunner) -> None:
        super().__init__(model_runner)
        self._cached_plan: _Plan | None = None
        self._positions: torch.Tensor | None = None

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        self._cached_plan = None
        self._positions = getattr(forward_batch, "positions", None)

    def _plan_for(
        self,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        prefix_lens: torch.Tensor | None,
        new_lens: torch.Tensor | None,
    ) -> _Plan:
        plan = self._cached_plan
        if plan is None or plan.seq_lens is not seq_lens:
            plan = _plan(
                req_to_token, req_pool_indices, seq_lens, prefix_lens, new_lens, self._positions
            )
            self._cached_plan = plan
        return plan

    def _run_sdpa_forward_extend(
        self,
        query: torch.Tensor,
        output: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        extend_prefix_lens: torch.Tensor,
        extend_seq_lens: torch.Tensor,
        encoder_lens: torch.Tensor | None = None,
        scaling: float | None = None,
        enable_gqa: bool = False,
        causal: bool = False,
        is_cross_attn: bool = False,
        sliding_window_size: int | None = None,
    ) -> torch.Tensor:
        if encoder_lens is not None or is_cross_attn or not causal or sliding_window_size:
            return super()._run_sdpa_forward_extend(
                query,
                output,
                k_cache,
                v_cache,
                req_to_token,
                req_pool_indices,
                seq_lens,
                extend_prefix_lens,
                extend_seq_lens,
                encoder_lens,
                scaling=scaling,
                enable_gqa=enable_gqa,
                causal=causal,
                is_cross_attn=is_cross_attn,
                sliding_window_size=sliding_window_size,
            )
        plan = self._plan_for(
            req_to_token, req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens
        )
        for request in plan.requests:
            if request.q_end == request.q_start:
                continue
            output[request.q_start : request.q_end] = _attend(
                query[request.q_start : request.q_end],
                k_cache[request.kv],
                v_cache[request.kv],
                request,
                scaling,
            )
        return output

    def _run_sdpa_forward_decode(
        self,
        query: torch.Tensor,
        output: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        encoder_lens: torch.Tensor | None = None,
        scaling: float | None = None,
        enable_gqa: bool = False,
        causal: bool = False,
        is_cross_attn: bool = False,
        sliding_window_size: int | None = None,
    ) -> torch.Tensor:
        if encoder_lens is not None or is_cross_attn or sliding_window_size:
            return super()._run_sdpa_forward_decode(
                query,
                output,
                k_cache,
                v_cache,
                req_to_token,
                req_pool_indices,
                seq_lens,
                encoder_lens,
                scaling=scaling,
                enable_gqa=enable_gqa,
                causal=causal,
                is_cross_attn=is_cross_attn,
                sliding_window_size=sliding_window_size,
            )
        plan = self._plan_for(req_to_token, req_pool_indices, seq_lens, None, None)
        for request in plan.requests:
            output[request.q_start : request.q_end] = _attend(
                query[request.q_start : request.q_end],
                k_cache[request.kv],
                v_cache[request.kv],
                request,
                scaling,
            )
        return output


def create_cpu_attn_backend(runner: ModelRunner) -> CpuAttnBackend:
    """Factory registered with SGLang's ``register_attention_backend``."""
    return CpuAttnBackend(runner)
