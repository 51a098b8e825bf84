"""Chunk reuse beyond exact prefixes in SGLang (CacheBlend, CacheTune): a request's marked
chunks blended in the forward of its extend, on the CPU engine.

A request marks token ranges of its prompt as chunks (``custom_params["cacheflow"]
["chunks"]``, :func:`~sglang_cacheflow.sglang.config.request_chunks`); the tokens before the
first chunk are its preamble, an ordinary radix prefix. A chunk is stored in the chunk
store (:class:`~sglang_cacheflow.blend.store.ChunkStore`, ``chunk_store`` of the
configuration) under its tokens and the preamble, with its tokens in score order
(CacheTune's spectral score of the layer-0 values).

- **Plan** (at admission, :meth:`ChunkReuse.plan`): the chunks wholly after the tree's match
  are looked up; the hits go to :func:`~sglang_cacheflow.planner.plan_blend` as one request
  (a blend runs alone in its batch) with the cost model of the restores, which returns the
  share of a reused chunk recomputed; where it predicts no gain over recomputing, the
  request is served plainly. The first chunk, where it was stored after the same preamble,
  is exact: loaded whole.
- **Forward** (:meth:`ChunkReuse.begin`): the request is admitted with its whole extend.
  Before layer 0 the rows of the loaded tokens leave the forward
  (:class:`~sglang_cacheflow.sglang.one_forward.Narrowed`): the recomputed tokens (each
  reused chunk's best, the missed chunks, the text between and the query) go through every
  layer at their own positions, and each layer first waits for the loader
  (:class:`~sglang_cacheflow.blend.loader.Loader`), which writes the loaded tokens' KV of
  that layer into the slots the extend allocated, keys moved by the chunk's position delta.
  The ``cacheflow_cpu`` attention masks each query to the keys up to its position.
- **After** (:meth:`ChunkReuse.finish`): a blend whose load failed is cut back to the prefix
  it was admitted with and recomputed plainly (counted ``load_failed``); a blended request's
  KV never enters the radix tree (``skip_radix_cache_insert``): it is not what a prefill of
  the prompt computes. Chunks a request missed are stored from its slots once its forward
  has computed them (:meth:`ChunkReuse.fill`), on a background thread.

Stored chunk KV is the KV a request computed: a chunk after other chunks carries their
context (as LMCache stores CacheBlend chunks); the recomputed share repairs the cross-chunk
attention of its new context. Limits: the CPU engine (a CUDA backend needs a masked
extend), one TP rank, an unchunked extend (a prompt over the chunked-prefill size is served
plainly), requests without input logprobs and without a split restore of their own.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from sglang_cacheflow.blend.loader import Load, Loader, LoadFailed, offline_load
from sglang_cacheflow.blend.rope import KeyRotator
from sglang_cacheflow.blend.selection import spectral_scores
from sglang_cacheflow.blend.store import ChunkStore, StoredChunk, chunk_key
from sglang_cacheflow.planner.blend import BlendRequest, plan_blend
from sglang_cacheflow.planner.cost import CostModel
from sglang_cacheflow.sglang.config import CacheFlowConfig
from sglang_cacheflow.sglang.metrics import RestoreMetrics
from sglang_cacheflow.sglang.split import row_of
from sglang_cacheflow.sglang.stream import cut_to, no_input_logprobs
from sglang_cacheflow.tiers.base import KVTier, Namespace
from sglang_cacheflow.tiers.host import HostTier
from sglang_cacheflow.tiers.names import HOST_TIER
from sglang_cacheflow.tiers.page import PageLayout

__all__ = ["Blend", "ChunkReuse", "chunk_namespace"]

logger = logging.getLogger(__name__)

SCORER = "spectral"  # the offline score stored chunks are ordered by (part of their key)
PAGE_TOKENS = 16
"""Tokens per page of the chunk store, apart from ``--page-size``: the recomputed share of a
reused chunk is rounded up to whole pages (its best tokens' pages are left unread)."""


def chunk_namespace(model: str, pool: Any, page_tokens: int) -> Namespace:
    """The chunk store's namespace: the model's, apart from HiCache's pages (a clear of
    the L3 storage must not drop chunks), in the device pool's KV shape and dtype."""
    k = pool.k_buffer[0]
    layout = PageLayout(len(pool.k_buffer), page_tokens, k.shape[1], k.shape[2], k.dtype)
    return Namespace(f"{model}.chunks", layout)


def _rotary(model: Any) -> Any:
    """The model's first rotary module, or None."""
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    return next((m for m in model.modules() if isinstance(m, RotaryEmbedding)), None)


class _InvFreq:
    """What :class:`KeyRotator` reads of a rotary module: SGLang's keeps ``inv_freq`` only
    inside its cos/sin cache, so it is computed again with the module's own scaling, and
    checked against the cache's step from one position to the next (a variant that scales
    positions some other way, e.g. linear scaling, is refused rather than moved wrongly)."""

    def __init__(self, rope: Any) -> None:
        if rope is None:
            raise ValueError("the model has no SGLang rotary embedding whose keys can be moved")
        if not rope.is_neox_style or rope.rotary_dim != rope.head_size:
            raise ValueError(
                "chunk reuse moves keys rotated over the whole head in two halves (neox style); "
                f"this model's rotary embedding has rotary_dim={rope.rotary_dim} of "
                f"head_size={rope.head_size}, is_neox_style={rope.is_neox_style}"
            )
        arg = next(iter(inspect.signature(rope._compute_inv_freq).parameters))
        value = rope.scaling_factor if arg == "scaling_factor" else rope.base
        inv = rope._compute_inv_freq(value).to(device="cpu", dtype=torch.float64)
        rows = rope.cos_sin_cache[:2].to(device="cpu", dtype=torch.float64)
        half = rows.shape[1] // 2
        angles = torch.atan2(rows[:, half:], rows[:, :half])
        step = torch.remainder(angles[1] - angles[0] + torch.pi, 2 * torch.pi) - torch.pi
        if not torch.allclose(step, inv, rtol=2e-2, atol=1e-3):
            raise ValueError(
                f"{type(rope).__name__} scales positions in a way the RoPE fix-up does not "
                "model (default, llama3 and yarn rotary embeddings are supported)"
            )
        self.inv_freq = inv


@dataclass
class Blend:
    """One request's planned blend."""

    rid: str
    prefix_len: int  # the request's prefix when planned: its extend starts there
    loads: list[Load]
    ratio: float
    exact: int  # tokens of the exact chunk, loaded whole
    loaded: int  # tokens whose KV is read (exact included)
    recomputed: int  # reused chunks' tokens recomputed
    skip_insert: bool = False  # the request's own skip_radix_cache_insert, before the blend
    loader: Loader | None = None
    failed: bool = False
    handles: list[Any] = field(default_factory=list)

    @functools.cached_property
    def drop(self) -> torch.Tensor:
        """The extend rows whose KV is loaded (ascending)."""
        rows = torch.cat([x.positions for x in self.loads]) - self.prefix_len
        return torch.sort(rows).values


@dataclass
class _Chunks:
    """A request's marked chunks: ``[start, end)`` ranges and their store keys."""

    spans: list[tuple[int, int]]
    keys: list[str]
    ratio: float | None = None  # the recomputed share the request forces on itself
    missed: set[int] = field(default_factory=set)  # indices looked up and not found
    planned_at: int | None = None  # the prefix length the last plan was made for


class ChunkReuse:
    """The chunk reuse of one scheduler process (see the module doc)."""

    def __init__(
        self,
        tier: KVTier,
        namespace: Namespace,
        cache: Any,
        tier_name: str,
        min_ratio: float,
        metrics: RestoreMetrics,
        force_ratio: float | None = None,
    ) -> None:
        self.store = ChunkStore(tier, namespace)
        self.cache = cache  # the radix cache: request rows, the slot allocator
        self.pool = cache.token_to_kv_pool_allocator.get_kvcache()
        self.tier_name = tier_name
        self.min_ratio = min_ratio
        self.force_ratio = force_ratio
        self.metrics = metrics
        self.chunks: dict[str, _Chunks] = {}  # requests with chunks, by rid
        self.blends: dict[str, Blend] = {}  # planned, not yet run
        self.rotator: KeyRotator | None = None
        self.running: Blend | None = None  # the blend in the forward under way
        self.disabled: str | None = None  # why this model cannot be blended, once known
        self._puts = ThreadPoolExecutor(1, thread_name_prefix="chunk-store")
        self._stored: set[str] = set()  # keys stored (or being stored) by this process
        self._lock = threading.Lock()

    # -- arrival ---------------------------------------------------------------------------
    def take(
        self, rid: str, ids: list[int], spans: list[tuple[int, int]], ratio: float | None = None
    ) -> None:
        """A request arrives marking ``spans`` of its prompt ``ids`` as chunks (``ratio``:
        the recomputed share it forces on itself)."""
        t = torch.tensor(ids, dtype=torch.int64)
        preamble = t[: spans[0][0]]
        keys = [chunk_key(t[s:e], preamble, SCORER) for s, e in spans]
        self.chunks[rid] = _Chunks(spans, keys, ratio)

    @classmethod
    def create(
        cls, cfg: CacheFlowConfig, cache: Any, model: str, metrics: RestoreMetrics
    ) -> ChunkReuse:
        """The chunk reuse ``cfg`` asks for (``chunk_store``), over ``cache``'s pool."""
        assert cfg.chunk_store is not None
        if cfg.chunk_store == HOST_TIER:
            tier: KVTier = HostTier(cfg.chunk_store_mb << 20)
        else:
            from sglang_cacheflow.tiers.redis import RedisTier, RedisTierConfig

            options = {"client_name": "sglang-cacheflow-chunks", **cfg.redis}
            tier = RedisTier(RedisTierConfig.from_dict({**options, "url": cfg.redis_url}))
            if cfg.link:  # seen through the L3's emulated link (benchmarks)
                from sglang_cacheflow.tiers.shaping import LinkShape, ShapedTier

                tier = ShapedTier(tier, LinkShape.parse(cfg.link))
        pool = cache.token_to_kv_pool_allocator.get_kvcache()
        ns = chunk_namespace(model, pool, PAGE_TOKENS)
        logger.info("cacheflow: chunk reuse, chunks in %s (%s)", cfg.chunk_store, ns.prefix)
        return cls(
            tier, ns, cache, cfg.chunk_store, cfg.blend_min_ratio, metrics, cfg.force_blend_ratio
        )

    def keep_only(self, live: set[str]) -> None:
        """Forget the requests not in ``live`` (finished, aborted, or past their prefill)."""
        self.chunks = {rid: c for rid, c in self.chunks.items() if rid in live}
        self.blends = {rid: b for rid, b in self.blends.items() if rid in live}

    # -- plan ------------------------------------------------------------------------------
    def plan(self, req: Any, prefix_len: int, extend_len: int, cost: CostModel) -> Blend | None:
        """Plan ``req``'s blend for an admission of ``extend_len`` tokens after
        ``prefix_len`` (its tree match), or None: nothing to reuse, or no gain predicted."""
        ch = self.chunks.get(req.rid)
        if ch is None or self.disabled is not None:
            return None
        if ch.planned_at == prefix_len:  # considered again in a later round
            return self.blends.get(req.rid)
        ch.planned_at = prefix_len
        self.blends.pop(req.rid, None)
        hits: list[tuple[int, StoredChunk, bool]] = []
        for i, (s, e) in enumerate(ch.spans):
            if s < prefix_len or e > prefix_len + extend_len:
                continue  # in the tree already (whole or in part), or past this extend
            stored = self.store.meta(ch.keys[i], e - s)
            self.metrics.blend("chunks", "miss" if stored is None else "hit")
            if stored is None:  # stored again once computed (gone, or its meta unreadable)
                ch.missed.add(i)
                with self._lock:
                    self._stored.discard(ch.keys[i])
                continue
            hits.append((s, stored, i == 0 and s == stored.start))
        if not hits:
            return None
        exact = sum(st.tokens for _, st, is_exact in hits if is_exact)
        reused = sum(st.tokens for _, st, is_exact in hits if not is_exact)
        request = BlendRequest(
            req.rid, self.tier_name, prefix_len, exact, reused, extend_len - exact - reused
        )
        forced = ch.ratio if ch.ratio is not None else self.force_ratio
        min_ratio = self.min_ratio if forced is None else min(self.min_ratio, forced)
        rnd = plan_blend([request], cost, min_ratio=min_ratio, ratio=forced)
        plan = rnd.plans[0]
        if forced is None and plan.ttft_s >= plan.full_recompute_s:
            self.metrics.blend("requests", "plain")
            return None
        loads, recomputed = [], 0
        for s, stored, is_exact in hits:
            picked, load = offline_load(stored, s, is_exact, rnd.ratio, self.store.page_tokens)
            recomputed += picked.numel()
            loads.append(load)
        loaded = sum(x.keep.numel() for x in loads)
        blend = Blend(req.rid, prefix_len, loads, rnd.ratio, exact, loaded, recomputed)
        self.blends[req.rid] = blend
        return blend

    def runs_alone(self, req: Any) -> bool:
        return req.rid in self.blends

    def admit(self, req: Any) -> None:
        """``req`` is admitted for its blend: its KV stays out of the tree from now on."""
        blend = self.blends[req.rid]
        blend.skip_insert, req.skip_radix_cache_insert = req.skip_radix_cache_insert, True

    def drop(self, req: Any, reason: str) -> None:
        """Serve ``req`` plainly after all (its admission cannot take a blend)."""
        blend = self.blends.pop(req.rid, None)
        if blend is not None:
            self._fallback(req, blend, reason)

    # -- forward ---------------------------------------------------------------------------
    def begin(self, batch: Any, worker: Any, stack: Any) -> Blend | None:
        """``batch`` is a blend alone in its forward: start its loader and make each of
        ``stack``'s layers wait for its KV. The caller narrows the forward to the
        recomputed rows (:meth:`Blend.drop`)."""
        planned = [(r, self.blends.pop(r.rid)) for r in batch.reqs if r.rid in self.blends]
        if not planned:
            return None
        req, blend = planned[0]
        starts = batch.extend_logprob_start_lens if batch.return_logprob else None
        over_loaded = starts is not None and starts[0] <= int(blend.drop[-1])  # input logprobs
        moved = req.prefix_len != blend.prefix_len
        # admission runs a blend alone; a model whose layer loop cannot be hooked is not blended
        if len(batch.reqs) > 1 or stack is None or moved or over_loaded:
            for r, b in planned:
                self._fallback(r, b, "unsupported")
            return None
        if self.rotator is None:
            model = worker.model_runner.model
            try:
                self.rotator = KeyRotator(_InvFreq(_rotary(model)), model.config)
            except ValueError as e:
                self.disabled = str(e)
                logger.error("cacheflow: chunk reuse is off for this model: %s", e)
                self._fallback(req, blend, "unsupported")
                return None
        row = row_of(req, self.cache)
        pool = self.pool
        start = getattr(pool, "start_layer", 0) or 0

        def place(l0: int, l1: int, load: Load, keys: torch.Tensor, values: torch.Tensor) -> None:
            slots = row[load.positions].to(torch.int64)
            for layer in range(l0, l1):
                kb, vb = pool.k_buffer[layer - start], pool.v_buffer[layer - start]
                kb[slots] = keys[layer - l0].to(device=kb.device, dtype=kb.dtype)
                vb[slots] = values[layer - l0].to(device=vb.device, dtype=vb.dtype)

        blend.loader = Loader(self.store, blend.loads, self.rotator, len(pool.k_buffer), place)
        blend.loader.start()
        blend.handles = [
            stack.layers[i].register_forward_pre_hook(self._waiter(blend, i - start, place))
            for i in range(stack.start_layer, stack.end_layer)
        ]
        self.running = blend
        return blend

    def _waiter(self, blend: Blend, layer: int, place: Any) -> Any:
        def wait(module: Any, args: tuple) -> None:
            assert blend.loader is not None
            try:
                blend.loader.wait(layer)
            except LoadFailed:
                # attention must read finite numbers: zeros where the layer did not land
                # (the forward's result is not used, the request is cut back after it)
                blend.failed = True
                for load in blend.loads:
                    zero = torch.zeros(1, load.keep.numel(), *self.pool.k_buffer[0].shape[1:])
                    place(layer, layer + 1, load, zero, zero)

        return wait

    def finish(self, batch: Any, scheduler: Any) -> dict[str, bool]:
        """After the forward of a blend: settle it (used, or cut back and recomputed).
        Returns ``{rid: used}``: the forward waited for loads (it calibrates no compute),
        and one cut back gave its request no token."""
        blend, self.running = self.running, None
        if blend is None:
            return {}
        for h in blend.handles:
            h.remove()
        assert blend.loader is not None
        blend.loader.thread.join()
        req = batch.reqs[0]
        if blend.failed or blend.loader.failed:
            cut_to(req, blend.prefix_len, self.cache, scheduler, blend.skip_insert)
            no_input_logprobs(batch, 0)
            self._fallback(req, blend, "load_failed")
            return {req.rid: False}
        self.metrics.blend("requests", "blended")
        self.metrics.blend("tokens", "exact", blend.exact)
        self.metrics.blend("tokens", "loaded", blend.loaded - blend.exact)
        self.metrics.blend("tokens", "recomputed", blend.recomputed)
        logger.info(
            "cacheflow blend rid=%s ratio=%.2f loaded=%d (exact %d) recomputed=%d wait=%.1fms",
            req.rid, blend.ratio, blend.loaded, blend.exact, blend.recomputed,
            1e3 * blend.loader.waited_s,
        )  # fmt: skip
        return {req.rid: True}

    def _fallback(self, req: Any, blend: Blend, reason: str) -> None:
        """``req`` is served plainly after all: its KV may enter the tree again."""
        req.skip_radix_cache_insert = blend.skip_insert
        self.chunks.pop(req.rid, None)  # a retry recomputes: no second blend
        self.metrics.blend("requests", "fallback")
        self.metrics.blend("fallbacks", reason)
        logger.warning("cacheflow blend rid=%s recomputed plainly: %s", req.rid, reason)

    # -- fill ------------------------------------------------------------------------------
    def fill(self, batch: Any) -> None:
        """Store the chunks the requests of ``batch`` missed, now computed in their slots."""
        for req in batch.reqs:
            ch = self.chunks.get(req.rid)
            if ch is None or not ch.missed:
                continue
            row = row_of(req, self.cache)
            for i in sorted(ch.missed):
                s, e = ch.spans[i]
                if e > req.extend_end:
                    continue  # not computed yet (a later chunk of a chunked prefill)
                ch.missed.discard(i)
                with self._lock:
                    if ch.keys[i] in self._stored:
                        continue
                    self._stored.add(ch.keys[i])
                kv = self._gather(row[s:e].to(torch.int64))
                self._puts.submit(self._put, ch.keys[i], kv, s)

    def _gather(self, slots: torch.Tensor) -> torch.Tensor:
        """``(layers, 2, tokens, kv_heads, head_dim)`` of ``slots``, copied off the pool."""
        pool = self.pool
        return torch.stack(
            [
                torch.stack((k[slots], v[slots]))
                for k, v in zip(pool.k_buffer, pool.v_buffer, strict=True)
            ]
        ).cpu()

    def _put(self, key: str, kv: torch.Tensor, start: int) -> None:
        try:
            ok = self.store.put(key, kv, start, spectral_scores(kv[0, 1]))
        except Exception:
            logger.exception("cacheflow: storing chunk %s failed", key[:12])
            ok = False
        if ok:
            self.metrics.blend("chunks", "stored")
        else:
            with self._lock:
                self._stored.discard(key)  # a later request may try again

    def close(self) -> None:
        self._puts.shutdown(wait=True)
