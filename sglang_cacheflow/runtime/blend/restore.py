"""Selective recompute over reused chunk KV, the loads overlapped layer by layer.

A prompt is ``[preamble][chunk 0][chunk 1]...[query]``. The preamble's KV is resident
(computed once). A chunk that sits where it was computed (chunk 0, right after the
preamble) is an exact prefix: its KV is loaded as is. Every other chunk is *reused*: its
keys are rotated by the position delta, a share ``ratio`` of its tokens is recomputed with
the query through every layer, and the KV of the rest is read from the tier; a loader
thread reads layer ``l + 1`` while the forward runs layer ``l``. Under the offline choice the
recomputed tokens' KV is never read (their pages are skipped). A chunk the store does not
have is recomputed in full; a page that fails in the middle of a restore makes the prompt
recompute in full. Both are counted; a lost page never reaches attention.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sglang_cacheflow.blend.loader import Load, Loader, LoadFailed, offline_load, recomputed_tokens
from sglang_cacheflow.blend.rope import KeyRotator
from sglang_cacheflow.blend.selection import (
    key_deviation,
    probe_scores,
    random_choice,
    spectral_scores,
    top,
)
from sglang_cacheflow.blend.store import ChunkStore, chunk_key
from sglang_cacheflow.planner.blend import Selection, check_selection
from sglang_cacheflow.runtime.kv import KVCache
from sglang_cacheflow.runtime.model import ModelAdapter

CHECK_LAYER = 1  # the online choice compares keys at this layer (CacheBlend's early layer)


@dataclass(frozen=True)
class BlendPrompt:
    """Token ids of a prompt built from a preamble, chunks and a query."""

    preamble: torch.Tensor
    chunks: tuple[torch.Tensor, ...]
    query: torch.Tensor

    def __post_init__(self) -> None:
        if self.query.numel() < 1:
            raise ValueError("a prompt needs at least one query token after its chunks")
        if any(c.numel() < 1 for c in self.chunks):
            raise ValueError("every chunk must have at least one token")

    @property
    def ids(self) -> torch.Tensor:
        parts = [self.preamble.reshape(-1), *(c.reshape(-1) for c in self.chunks)]
        return torch.cat([*parts, self.query.reshape(-1)])

    @property
    def offsets(self) -> list[int]:
        """Position of each chunk's first token."""
        out, pos = [], self.preamble.numel()
        for c in self.chunks:
            out.append(pos)
            pos += c.numel()
        return out

    @property
    def tokens(self) -> int:
        return self.preamble.numel() + sum(c.numel() for c in self.chunks) + self.query.numel()


@dataclass
class BlendResult:
    """One restore: the first token's logits, the prompt's KV, and what it took."""

    logits: torch.Tensor
    kv: KVCache
    ttft_s: float
    selection: Selection
    ratio: float  # reused tokens recomputed / reused tokens (after rounding to pages)
    recomputed: int  # reused tokens recomputed
    reused: int  # tokens of chunks at a new position
    exact: int  # tokens of a chunk loaded as an exact prefix
    loaded_bytes: int = 0
    load_wait_s: float = 0.0  # the forward waiting for a layer's loads
    missing_chunks: int = 0  # chunks the store did not have: recomputed in full
    fallback: bool = False  # a page failed mid-restore: the prompt was recomputed in full


class ChunkReuse:
    """Stores chunks and restores prompts built from them, on one model and one store.

    ``probe`` (token ids of any text unlike the preamble) selects the offline scorer: with
    it, a chunk is also computed after the probe and its tokens score by how far their KV
    moves (:func:`~.selection.probe_scores`); without it, by CacheTune's spectral score.
    """

    def __init__(
        self,
        model: ModelAdapter,
        store: ChunkStore,
        preamble: torch.Tensor,
        probe: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.store = store
        self.preamble = preamble.reshape(-1).cpu()
        self.probe = probe.reshape(-1).cpu() if probe is not None and probe.numel() else None
        self.scorer = "probe" if self.probe is not None else "spectral"
        self.rotator = KeyRotator(model.rotary_emb, model.config)
        self._preamble_kv = model.new_kv(max(1, self.preamble.numel()), store.page_tokens)
        if self.preamble.numel():
            model.prefill(self._preamble_kv, self.preamble)

    # -- the offline step ------------------------------------------------------------------
    def store_chunk(self, chunk: torch.Tensor) -> bool:
        """Compute a chunk after the preamble, score its tokens and store it."""
        chunk = chunk.reshape(-1).cpu()
        kv = self._new_kv(self.preamble.numel() + chunk.numel())
        start = self.preamble.numel()
        self.model.prefill(kv, chunk, start=start)
        end = start + chunk.numel()
        alone = kv.data[:, :, start:end]
        if self.probe is None:
            scores = spectral_scores(alone[0, 1])
        else:
            shift = self.probe.numel()
            probed_kv = self._new_kv(end + shift)
            self.model.prefill(probed_kv, self.probe, start=start)
            self.model.prefill(probed_kv, chunk, start=start + shift)
            probed = probed_kv.data[:, :, start + shift : end + shift].clone()
            probed[:, 0] = self.rotator.rotate(probed[:, 0], -shift)
            scores = probe_scores(alone, probed)
        return self.store.put(self.key(chunk), alone, start, scores)

    def key(self, chunk: torch.Tensor) -> str:
        """The store key of ``chunk`` under this preamble and scorer."""
        return chunk_key(chunk, self.preamble, self.scorer)

    # -- restores --------------------------------------------------------------------------
    def full(self, prompt: BlendPrompt, extra: int = 0) -> tuple[torch.Tensor, KVCache, float]:
        """The reference: every token after the preamble recomputed. (logits, KV, seconds)"""
        self._check(prompt)
        t = time.perf_counter()
        kv = self._new_kv(prompt.tokens + extra)
        pre = self.preamble.numel()
        hidden = self.model.run_layers(
            kv, self.model.embed(prompt.ids[pre:]), pre, 0, self.model.num_layers
        )
        logits = self.model.logits(hidden[0, -1])
        return logits, kv, time.perf_counter() - t

    def restore(
        self,
        prompt: BlendPrompt,
        selection: Selection | str,
        ratio: float,
        *,
        extra: int = 0,
        seed: int = 0,
        layers_per_read: int = 1,
    ) -> BlendResult:
        """Restore ``prompt``'s KV from its stored chunks, recomputing ``ratio`` of each
        reused chunk's tokens chosen by ``selection``; ``extra`` leaves room for decoding."""
        selection = check_selection(selection)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        self._check(prompt)
        t0 = time.perf_counter()
        kv = self._new_kv(prompt.tokens + extra)
        gen = torch.Generator().manual_seed(seed)
        t = self.store.page_tokens
        loads, chosen, budgets = [], [], []
        reused = exact = missing = missing_tokens = 0
        online_pool: list[torch.Tensor] = []  # positions the online choice picks from
        for index, (chunk, offset) in enumerate(zip(prompt.chunks, prompt.offsets, strict=True)):
            n = chunk.numel()
            stored = self.store.meta(self.key(chunk), n)
            positions = torch.arange(offset, offset + n)
            if stored is None:  # not stored (or unreadable): this chunk is recomputed
                missing += 1
                missing_tokens += n
                chosen.append(positions)
                continue
            is_exact = index == 0 and offset == stored.start
            if is_exact:
                exact += n
            else:
                reused += n
            if is_exact or selection is Selection.OFFLINE:  # the best k: their pages unread
                picked, load = offline_load(stored, offset, is_exact, ratio, t)
                chosen.append(picked)
                loads.append(load)
                continue
            k = recomputed_tokens(n, ratio, t)  # as many as the offline choice's whole pages
            delta = offset - stored.start
            if selection is Selection.RANDOM:
                picked = random_choice(n, k, gen)
                chosen.append(offset + picked)
                mask = torch.ones(n, dtype=torch.bool)
                mask[picked] = False
                keep = mask[stored.order].nonzero().reshape(-1)  # stored order -> token
                loads.append(Load(stored, 0, keep, offset + stored.order[keep], delta))
            else:  # online: every token loaded, the choice made at CHECK_LAYER
                online_pool.append(positions)
                budgets.append(k)
                loads.append(Load(stored, 0, torch.arange(n), offset + stored.order, delta))
        online = selection is Selection.ONLINE and bool(online_pool)

        def place(l0: int, l1: int, load: Load, keys: torch.Tensor, values: torch.Tensor) -> None:
            kv.data[l0:l1, 0, load.positions] = keys.to(kv.device)
            kv.data[l0:l1, 1, load.positions] = values.to(kv.device)

        loader = Loader(
            self.store, loads, self.rotator, kv.num_layers, place, 1 if online else 0,
            layers_per_read,
        ).start()  # fmt: skip
        result = BlendResult(
            logits=torch.empty(0), kv=kv, ttft_s=0.0, selection=selection, ratio=0.0,
            recomputed=0, reused=reused, exact=exact, missing_chunks=missing,
        )  # fmt: skip
        try:
            logits, computed = self._forward(prompt, kv, loader, chosen, online_pool, budgets)
            recomputed = computed - missing_tokens
        except LoadFailed:
            loader.thread.join()
            logits, kv_full, _ = self.full(prompt, extra)
            result.kv, result.fallback, recomputed = kv_full, True, reused
        loader.thread.join()
        result.logits = logits
        result.ttft_s = time.perf_counter() - t0
        result.recomputed = recomputed
        result.ratio = recomputed / reused if reused else 0.0
        result.loaded_bytes = loader.loaded_bytes
        result.load_wait_s = loader.waited_s
        return result

    def _forward(
        self,
        prompt: BlendPrompt,
        kv: KVCache,
        loader: Loader,
        chosen: list[torch.Tensor],
        online_pool: list[torch.Tensor],
        budgets: list[int],
    ) -> tuple[torch.Tensor, int]:
        """The selective forward; returns the last token's logits and how many tokens before
        the query it recomputed."""
        model, ids = self.model, prompt.ids
        pre, end = self.preamble.numel(), prompt.tokens
        query = torch.arange(end - prompt.query.numel(), end)
        if online_pool:  # CacheBlend: layer 0 in full, then the deviating tokens
            hidden = model.run_layers(kv, model.embed(ids[pre:]), pre, 0, CHECK_LAYER)
            loader.wait(CHECK_LAYER)
            pool = torch.cat(online_pool)
            fresh = self._keys(CHECK_LAYER, hidden[:, pool - pre], pool)
            deviation = key_deviation(fresh, kv.data[CHECK_LAYER, 0, pool])
            chosen = [*chosen, pool[top(deviation, sum(budgets))]]
            positions = torch.sort(torch.cat([*chosen, query])).values
            out = model.run_scattered(
                kv, hidden[:, positions - pre], positions, CHECK_LAYER, model.num_layers,
                before_layer=loader.wait,
            )  # fmt: skip
        else:
            positions = torch.sort(torch.cat([*chosen, query])).values
            out = model.run_scattered(
                kv, model.embed(ids[positions]), positions, 0, model.num_layers,
                before_layer=loader.wait,
            )  # fmt: skip
        return model.logits(out[0, -1]), positions.numel() - query.numel()

    def _keys(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Keys ``(tokens, kv_heads, head_dim)`` that ``layer`` computes from ``hidden``."""
        block = self.model.layers[layer]
        x = block.input_layernorm(hidden)
        info = self.model.info
        k = block.self_attn.k_proj(x).view(1, -1, info.num_kv_heads, info.head_dim).transpose(1, 2)
        cos, sin = self.model.rotary_emb(x, positions.unsqueeze(0))
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        return k[0].transpose(0, 1)

    def _new_kv(self, tokens: int) -> KVCache:
        kv = self.model.new_kv(tokens, self.store.page_tokens)
        pre = self.preamble.numel()
        if pre:
            kv.data[:, :, :pre] = self._preamble_kv.data[:, :, :pre]
        return kv

    def _check(self, prompt: BlendPrompt) -> None:
        if not torch.equal(prompt.preamble.reshape(-1).cpu(), self.preamble):
            raise ValueError(
                "the prompt's preamble differs from the one its chunks were stored after"
            )
