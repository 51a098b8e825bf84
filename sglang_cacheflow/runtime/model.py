"""Model adapter: drive a transformers Llama/Qwen2 model's own modules over a token range
and a layer range, reading and writing the request's :class:`~sglang_cacheflow.runtime.kv.KVCache`.

Nothing of the model is re-implemented: :meth:`ModelAdapter.run_layers` calls the model's
rotary embedding and decoder layers with a KV object that answers the one call attention
makes on a cache (``update``), writing the new tokens' K and V into the request's buffer and
handing back the keys and values of every earlier position. Earlier positions can be
on device from the start, loaded from a tier or recomputed earlier; the caller decides when
each layer may run (``before_layer``) and learns when it is done (``after_layer``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sglang_cacheflow.runtime.kv import KVCache

SUPPORTED = ("llama", "qwen2")

LayerHook = Callable[[int], None]


class _KVWriter:
    """What a decoder layer sees as ``past_key_values`` for tokens ``[start, start + n)``.

    ``store(layer)`` says whether the new K and V go into the cache (a repair of lost
    pages writes only the layers that were lost); when they do not, attention reads the
    cached prefix and the fresh K and V side by side.
    """

    is_compileable = False

    def __init__(self, kv: KVCache, start: int, store: Callable[[int], bool] | None) -> None:
        self.kv = kv
        self.start = start
        self.store = store

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *_: Any,
        **__: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[2]
        end = self.start + n
        if self.store is None or self.store(layer_idx):
            self.kv.write(layer_idx, self.start, key_states, value_states)
            # attention kernels are many times slower on token-major strided K/V than on a
            # contiguous copy of it
            k = self.kv.keys(layer_idx, end).contiguous()
            return k, self.kv.values(layer_idx, end).contiguous()
        k = torch.cat([self.kv.keys(layer_idx, self.start), key_states], dim=2)
        v = torch.cat([self.kv.values(layer_idx, self.start), value_states], dim=2)
        return k, v


class _ScatterWriter:
    """``past_key_values`` for tokens at scattered ``positions`` (sorted): their new K and V
    go to those positions, attention reads every position up to the last one (chunk reuse:
    the selected tokens' fresh KV among the reused KV of the others)."""

    is_compileable = False

    def __init__(self, kv: KVCache, positions: torch.Tensor) -> None:
        self.kv = kv
        self.positions = positions
        self.end = int(positions[-1]) + 1

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *_: Any,
        **__: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.kv.scatter(layer_idx, self.positions, key_states, value_states)
        k = self.kv.keys(layer_idx, self.end).contiguous()
        return k, self.kv.values(layer_idx, self.end).contiguous()


@dataclass(frozen=True)
class ModelInfo:
    num_layers: int
    num_kv_heads: int  # on this rank
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype
    device: torch.device


class ModelAdapter:
    """Partial forwards of a ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (possibly sharded
    for tensor parallelism by :func:`sglang_cacheflow.runtime.tp.shard_model`)."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        if config.model_type not in SUPPORTED:
            raise ValueError(
                f"model type {config.model_type!r} is not supported; the runtime drives "
                f"{', '.join(SUPPORTED)} models"
            )
        if getattr(config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported by the runtime")
        self.model = model.eval()
        self.config = config
        base = model.model
        self.embed_tokens = base.embed_tokens
        self.layers = base.layers
        self.norm = base.norm
        self.rotary_emb = base.rotary_emb
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        head_dim = attn.head_dim
        param = next(model.parameters())
        self.info = ModelInfo(
            num_layers=len(self.layers),
            num_kv_heads=attn.k_proj.out_features // head_dim,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            vocab_size=self.lm_head.out_features,
            dtype=param.dtype,
            device=param.device,
        )

    @property
    def num_layers(self) -> int:
        return self.info.num_layers

    def new_kv(self, tokens: int, page_tokens: int) -> KVCache:
        i = self.info
        return KVCache.empty(
            i.num_layers, i.num_kv_heads, i.head_dim, tokens, page_tokens, i.dtype, i.device
        )

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states at the input of layer 0, ``(1, n, hidden)``."""
        ids = input_ids.to(self.info.device).reshape(1, -1)
        return self.embed_tokens(ids)

    @torch.no_grad()
    def run_layers(
        self,
        kv: KVCache,
        hidden: torch.Tensor,
        start: int,
        l0: int,
        l1: int,
        *,
        before_layer: LayerHook | None = None,
        after_layer: LayerHook | None = None,
        store: Callable[[int], bool] | None = None,
    ) -> torch.Tensor:
        """Run layers ``[l0, l1)`` over tokens ``[start, start + n)`` whose hidden states at
        the input of ``l0`` are ``hidden`` (``(1, n, hidden)``); the KV of ``[0, start)`` at
        each layer must be in ``kv`` when ``before_layer(layer)`` returns. Returns the
        hidden states at the output of layer ``l1 - 1``."""
        n = hidden.shape[1]
        device = hidden.device
        positions = torch.arange(start, start + n, device=device).unsqueeze(0)
        # No mask when there is no prefix (SDPA's is_causal) or one query (it sees every
        # key); a mask would make attention expand the grouped KV heads into a copy.
        mask = None
        if start > 0 and n > 1:
            q = torch.arange(start, start + n, device=device)[:, None]
            k = torch.arange(start + n, device=device)[None, :]
            mask = (k <= q).view(1, 1, n, start + n)
        writer = _KVWriter(kv, start, store)
        return self._layers(hidden, positions, mask, writer, l0, l1, before_layer, after_layer)

    @torch.no_grad()
    def run_scattered(
        self,
        kv: KVCache,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        l0: int,
        l1: int,
        *,
        before_layer: LayerHook | None = None,
        after_layer: LayerHook | None = None,
    ) -> torch.Tensor:
        """Run layers ``[l0, l1)`` over tokens at ``positions`` (sorted, distinct) whose hidden
        states at the input of ``l0`` are ``hidden`` (``(1, n, hidden)``): causal attention
        over every position up to each token's own, the others' KV read from ``kv`` (it must
        be there when ``before_layer(layer)`` returns). Their new K and V are written at
        their positions. Returns the hidden states at the output of layer ``l1 - 1``."""
        positions = positions.to(device=hidden.device, dtype=torch.long)
        if positions.ndim != 1 or positions.numel() != hidden.shape[1]:
            raise ValueError(
                f"positions must be 1-D with one entry per token ({hidden.shape[1]}), "
                f"got shape {tuple(positions.shape)}"
            )
        if positions.numel() > 1 and bool((positions[1:] <= positions[:-1]).any()):
            raise ValueError("positions must be sorted and distinct")
        end = int(positions[-1]) + 1
        keys = torch.arange(end, device=hidden.device)[None, :]
        mask = (keys <= positions[:, None]).view(1, 1, positions.numel(), end)
        writer = _ScatterWriter(kv, positions)
        return self._layers(
            hidden, positions.unsqueeze(0), mask, writer, l0, l1, before_layer, after_layer
        )

    def _layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        writer: _KVWriter | _ScatterWriter,
        l0: int,
        l1: int,
        before_layer: LayerHook | None,
        after_layer: LayerHook | None,
    ) -> torch.Tensor:
        cos_sin = self.rotary_emb(hidden, positions)
        for layer in range(l0, l1):
            if before_layer is not None:
                before_layer(layer)
            hidden = self.layers[layer](
                hidden,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=writer,
                use_cache=True,
                position_embeddings=cos_sin,
            )
            if after_layer is not None:
                after_layer(layer)
        return hidden

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (fp32) from the last layer's output, ``(..., vocab)``."""
        return self.lm_head(self.norm(hidden)).float()

    @torch.no_grad()
    def prefill(self, kv: KVCache, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Plain forward of ``input_ids`` at positions ``[start, start + n)`` through every
        layer, KV of ``[0, start)`` already in ``kv``; returns the last token's logits."""
        hidden = self.run_layers(kv, self.embed(input_ids), start, 0, self.num_layers)
        return self.logits(hidden[0, -1])

    @torch.no_grad()
    def greedy(
        self, kv: KVCache, input_ids: torch.Tensor, logits: torch.Tensor, steps: int
    ) -> list[int]:
        """Greedy continuation of ``steps`` tokens after ``input_ids`` (whose KV is in
        ``kv``; ``logits`` are the last token's). ``kv`` must have room for them."""
        out: list[int] = []
        pos = int(input_ids.numel())
        for _ in range(steps):
            token = int(torch.argmax(logits))
            out.append(token)
            logits = self.prefill(kv, torch.tensor([token]), start=pos)
            pos += 1
        return out
