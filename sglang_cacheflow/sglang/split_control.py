"""The restore controller's split restores in flight (:class:`SplitControl`, a part of
:class:`~sglang_cacheflow.sglang.controller.CacheFlowController`): starting their reads,
what admission and the forward ask of them, the splice, and the streams into the extend.
The mechanics (reader, staging, splice) are :mod:`~sglang_cacheflow.sglang.split` and
:mod:`~sglang_cacheflow.sglang.stream`."""

from __future__ import annotations

import time
from typing import Any

import torch

from sglang_cacheflow.planner import Capabilities, ModelShape, Request
from sglang_cacheflow.sglang.accounting import RestoreAccounting
from sglang_cacheflow.sglang.config import CacheFlowConfig
from sglang_cacheflow.sglang.costs import CostTracker
from sglang_cacheflow.sglang.decision import Decision
from sglang_cacheflow.sglang.split import (
    PAGES_PER_READ,
    SplitReader,
    SplitRestore,
    SplitUnavailable,
    alloc_slots,
    row_of,
    splice,
    splice_streamed,
    start_host_split,
    start_l3_split,
)
from sglang_cacheflow.sglang.stream import Stream, StreamedLayers, cut_back, no_input_logprobs
from sglang_cacheflow.tiers.names import L3_TIER

__all__ = ["SplitControl"]


class SplitControl:
    """Split restores from their plan to their first token. Mixed into the controller,
    whose configuration, cache, accounting and TP group it uses."""

    cfg: CacheFlowConfig
    cache: Any
    page_size: int
    shape: ModelShape
    caps: Capabilities
    tp_group: Any | None
    account: RestoreAccounting
    costs: CostTracker
    scheduler: Any

    def _init_splits(self, cfg: CacheFlowConfig, cache: Any) -> None:
        self.splits: dict[str, Decision] = {}  # split restores not yet spliced, by rid
        self.reader = SplitReader(on_read=self._split_read)
        self.groups = max(1, cfg.stream_groups or 1)  # layer groups of a split's read
        self.layers: StreamedLayers | None = None  # the pool's layer waits, when streaming
        if self.groups > 1:
            self.layers = StreamedLayers.install(cache.token_to_kv_pool_allocator.get_kvcache())
        self.streamed: dict[str, Decision] = {}  # spliced split restores still streaming
        # a front load's slots, the request's prefix after its tree match until its row holds
        # them (SGLang reads the prefix through the cache's ``prefix_device_indices``)
        self.front_slots: dict[str, torch.Tensor] = {}
        self._read_cpu_known = False

    def _plan_read_cpu(self) -> None:
        """Price a split's load with what a read costs this process's CPU, once the L3
        backend has measured it (a probe read at its registration): a streamed split reads
        its pages in one call per layer group, an unstreamed one ``PAGES_PER_READ`` pages a
        call."""
        if self._read_cpu_known:
            return
        storage = self.cache.cacheflow_storage()
        cpu = getattr(storage, "read_cpu", None)
        if cpu is None:
            return
        self._read_cpu_known = True
        pt = self.page_size
        if self.groups > 1:  # every page in each group's call, each layer in one of them
            per_token, per_load = self.groups * cpu.per_page_s / pt, self.groups * cpu.per_call_s
        else:
            per_token, per_load = (cpu.per_page_s + cpu.per_call_s / PAGES_PER_READ) / pt, 0.0
        self.costs.set_read_cpu(L3_TIER, per_token, per_load, cpu.per_page_layer_s / pt)

    def read_cpu_during(self, reqs: Any, started: float, seconds: float) -> float:
        """The client CPU the reads of ``reqs``' split restores spent while a forward of
        ``seconds`` begun at ``started`` ran, as the cost model prices it (spent evenly
        over each read; one still under way is taken to last as predicted)."""
        model = self.costs.model()
        total = 0.0
        for req in reqs:
            d = self.splits.get(req.rid) or self.streamed.get(req.rid)
            sp = d.split if d is not None else None
            if sp is None or sp.began is None:
                continue
            layers = sp.layer_share * self.shape.num_layers
            cpu = model.tier(sp.tier).read_cpu_s(sp.tokens, layers)
            if cpu <= 0:
                continue
            end = sp.began + (
                sp.read_s if sp.done.is_set() else model.load_s(sp.tier, sp.tokens, layers)
            )
            overlap = min(end, started + seconds) - max(sp.began, started)
            if end > sp.began and overlap > 0:
                total += cpu * overlap / (end - sp.began)
        return total

    def _start_l3_split(
        self,
        req: Request,
        front: int,
        layer: int,
        one: bool,
        keys: list[str],
        tokens: int | None = None,
    ) -> SplitRestore | None:
        """Start the read of a split's L3 part (``front`` tokens or ``layer`` layers
        recomputed; ``one``: in its new tokens' forward,
        :mod:`~sglang_cacheflow.sglang.one_forward`), or of a front load (``tokens`` of the
        span's front, ``front`` and ``layer`` 0)."""
        try:
            storage = self.cache.cacheflow_storage()
            sp = start_l3_split(
                self.reader, storage, req, front, layer, keys, self.page_size, self.groups,
                tokens, one,
            )  # fmt: skip
        except SplitUnavailable as e:
            self.account.split_unavailable(req, str(e))
            return None
        return sp

    def _start_host_split(
        self, sreq: Any, req: Request, front: int, layer: int, one: bool
    ) -> SplitRestore | None:
        """Start copying a split's host part to staging (as :meth:`_start_l3_split`)."""
        try:
            node = sreq.best_match_node
            sp = start_host_split(
                self.reader, self.cache, node, req, front, layer, self.page_size, self.groups,
                one,
            )  # fmt: skip
        except SplitUnavailable as e:
            self.account.split_unavailable(req, str(e))
            return None
        return sp

    def _split_read(self, sp: SplitRestore) -> None:
        """A split restore's read ended (reader thread): calibrate the tier from it."""
        nbytes = sp.landed_pages * sp.page_tokens * sp.layer_share * self.shape.kv_bytes_per_token
        self.costs.observe_transfer(sp.tier, nbytes, sp.read_s)

    def split_of(self, rid: str) -> SplitRestore | None:
        """``rid``'s split restore not yet spliced, if any."""
        d = self.splits.get(rid)
        return d.split if d is not None else None

    def front_load(self, rid: str) -> SplitRestore | None:
        """``rid``'s streamed front load (:attr:`SplitRestore.loads_front`) not yet admitted."""
        sp = self.split_of(rid)
        return sp if sp is not None and sp.loads_front else None

    def admit_front_load(self, req: Any, prefix_len: int) -> int:
        """``req`` is being admitted with ``prefix_len`` tokens of prefix: give it the slots of
        its front load as the prefix's continuation and stream the load into its extend
        (:mod:`~sglang_cacheflow.sglang.stream`). The tokens added to its prefix; 0 when its
        prefix is not where the load begins or device memory is short (the span is then
        recomputed, the fallback counted)."""
        d = self.splits.get(req.rid)
        sp = d.split if d is not None else None
        if sp is None or not sp.loads_front:
            return 0
        if prefix_len != sp.start or req.kv.holds_kv:
            self.drop_split(req.rid, "split_cut_missed")
            return 0
        slots = alloc_slots(self.cache, sp.tokens)
        if slots is None:
            self.drop_split(req.rid, "split_no_device_memory")
            return 0
        del self.splits[req.rid]
        slots = slots.to(torch.int64)
        self.front_slots[req.rid] = slots
        # its KV is not whole until every layer has landed: keep it out of the tree till then
        sp.skip_insert, req.skip_radix_cache_insert = req.skip_radix_cache_insert, True
        self._stream(req, d, slots)  # front loads are planned only when streaming
        return sp.tokens

    def runs_alone(self, req: Any) -> bool:
        """Whether ``req`` is admitted for a layer split's first chunk, or for a split's one
        forward (:attr:`SplitRestore.one_forward`); either runs alone."""
        sp = self.split_of(req.rid)
        if sp is None:
            return False
        if sp.one_forward:  # the whole loaded part inside the extend, the new tokens after it
            return req.prefix_len <= sp.start and req.extend_end > sp.start + sp.tokens
        return bool(sp.layer_split) and req.extend_end == sp.cut

    def layer_chunk_of(self, batch: Any) -> int | None:
        """``l`` when ``batch`` is a layer split's first chunk, alone in its forward: the
        forward runs layers ``[0, l)`` only."""
        sp = self._split_alone(batch)
        return sp.layer_split if sp is not None and not sp.one_forward else None

    def _split_alone(self, batch: Any) -> SplitRestore | None:
        reqs = batch.reqs
        if len(reqs) != 1 or not self.runs_alone(reqs[0]):
            return None
        return self.split_of(reqs[0].rid)

    def begin_one_forward(self, batch: Any) -> tuple[int, torch.Tensor] | None:
        """``(layer, rows)`` when ``batch`` is a split's one forward
        (:mod:`~sglang_cacheflow.sglang.one_forward`): its extend ``rows`` (the loaded part
        of its span) leave the forward at ``layer``, ``l`` of a layer split, 0
        of a token split; the load now streams into the loaded part's slots
        (:mod:`~sglang_cacheflow.sglang.stream`), settled after the forward by
        :meth:`finish_streams`. None for any other batch."""
        sp = self._split_alone(batch)
        if sp is None or not sp.one_forward or self.layers is None:
            return None
        req = batch.reqs[0]
        slots = row_of(req, self.cache)[sp.start : sp.start + sp.tokens].to(torch.int64)
        self._stream(req, self.splits.pop(req.rid), slots)
        lo = sp.start - req.prefix_len  # the extend begins at the request's prefix
        return sp.layer_split or 0, torch.arange(lo, lo + sp.tokens)

    def _stream(self, req: Any, d: Decision, slots: torch.Tensor) -> None:
        """Stream the load of ``d``'s split into ``slots`` from now, with the
        ``split_wait_s`` deadline; :meth:`finish_streams` settles it."""
        assert self.layers is not None and d.split is not None
        deadline = time.perf_counter() + self.cfg.split_wait_s
        self.layers.add(req.rid, Stream(d.split, slots, deadline, req))
        self.streamed[req.rid] = d

    def one_forward_done(self, batch: Any, seconds: float, started: float) -> None:
        """A layer split's one forward took ``seconds`` from ``started`` to its first
        loaded layer: the span's and the new tokens' bottom layers, beside the load,
        measure the overlap slowdown as a split's chunk does (a token split's one forward
        narrows before its first layer: nothing to measure so)."""
        sp = self.streamed[batch.reqs[0].rid].split
        if sp is None or not sp.layer_split:
            return
        cpu = self.read_cpu_during(batch.reqs, started, seconds)
        self.costs.observe_compute(
            batch.prefix_lens, batch.extend_lens, seconds, sp.layer_split, True, cpu
        )

    def drop_split(self, rid: str, reason: str) -> None:
        """Give up ``rid``'s split restore before its chunk ran: the span is recomputed."""
        d = self.splits.pop(rid, None)
        if d is None or d.split is None:
            return
        d.split.close()
        self.account.split_dropped(rid, d.tier, d.split.tokens, reason)

    def after_checkpoint(self, req: Any, scheduler: Any) -> None:
        """SGLang's ``scheduler`` checkpointed a chunk of ``req``: if it ends a split
        restore's front, splice the loaded back in
        (:func:`~sglang_cacheflow.sglang.split.splice`) and count it, or start streaming it
        into the next chunk (:mod:`~sglang_cacheflow.sglang.stream`)."""
        d = self.splits.get(req.rid)
        if d is None or d.split is None or req.prefix_len < d.split.cut:
            return
        del self.splits[req.rid]
        sp = d.split
        tree_cache = scheduler.tree_cache
        if self.layers is not None and req.prefix_len == sp.cut:
            self.scheduler = scheduler  # where a stream that falls short is cut back
            slots = splice_streamed(sp, req, tree_cache)
            if slots is not None:
                self._stream(req, d, slots)
                return
        try:
            if req.prefix_len > sp.cut:  # the front ran past the cut: nothing to splice
                got, waited, reason = 0, 0.0, "split_cut_missed"
                req.skip_radix_cache_insert = sp.skip_insert
            else:
                res = splice(sp, req, tree_cache, self.cfg.split_wait_s, self.tp_group)
                got, waited, reason = res.tokens, res.waited_s, res.reason
        finally:
            sp.close()
        self.account.spliced(d, sp, got, waited, reason)

    def streaming(self, req: Any) -> bool:
        """Whether ``req``'s next forward takes a streamed split's load (it runs without
        other restores or chunked requests, so that it can be cut back alone)."""
        return req.rid in self.streamed

    def finish_streams(self, batch: Any) -> dict[str, bool]:
        """A forward of ``batch`` has run: settle the streamed splits it took, by rid: True
        if the load landed whole, False if the request was cut back
        (:func:`~sglang_cacheflow.sglang.stream.cut_back`; that forward gave it no token)."""
        settled: dict[str, bool] = {}
        if self.layers is None or not self.streamed:
            return settled
        for rid in [r for r in self.streamed if r not in self.layers.streams]:
            del self.streamed[rid]  # aborted before its extend (StreamedLayers dropped it)
            self.front_slots.pop(rid, None)
        for i, req in enumerate(batch.reqs):
            self.front_slots.pop(req.rid, None)  # in its row now
            d = self.streamed.pop(req.rid, None)
            done = self.layers.finish(req.rid, self.tp_group) if d is not None else None
            if done is None:
                continue
            st, pages = done
            sp = st.sp
            settled[req.rid] = pages == sp.pages
            try:
                if pages < sp.pages:
                    cut_back(st, pages, req, self.cache, self.scheduler)
                    no_input_logprobs(batch, i)
                    reason = "split_timeout" if not sp.done.is_set() else "split_read_failed"
                else:
                    req.skip_radix_cache_insert = sp.skip_insert  # whole: publish it
                    reason = None
            finally:
                sp.close()
            self.account.spliced(d, sp, pages * sp.page_tokens, st.waited_s, reason, True)
        return settled
