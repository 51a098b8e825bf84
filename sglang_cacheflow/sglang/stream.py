"""A split restore's load streamed into the extend of the request's new tokens.

Without streaming, the splice waits for the whole load before the new tokens' extend starts
(:func:`~sglang_cacheflow.sglang.split.splice`). Streamed (``stream_groups`` > 1), the reader
lands the loaded layers group by group, the splice gives the request the KV slots of its
whole loaded part at once (:func:`~sglang_cacheflow.sglang.split.splice_streamed`), and the
extend starts. Layer ``i`` of a forward asks the device KV pool for its buffers through the
pool's ``layer_transfer_counter`` (as HiCache's layer-wise host loads do);
:class:`StreamedLayers` sits there, after HiCache's own counter, and waits for the group
holding layer ``i`` of every split in flight, then copies its landed pages from staging into
their slots. The copy runs in the scheduler's thread, inside the forward, so nothing else
writes those slots meanwhile.

Who owns what, when: staging belongs to the split restore until :meth:`StreamedLayers.finish`;
the slots belong to the request's ``req_to_token`` row from the splice on, and its KV is kept
out of the radix tree (``skip_radix_cache_insert``) until every layer is in.

A layer that does not land whole (tier down, a record failing its checksum, ``split_wait_s``
passed) was attended over missing KV, so that forward's result for the request is not used:
after the forward every TP rank agrees on the pages whose every layer landed (one
``all_reduce``), the request's KV is cut back to them (:func:`cut_back`, the slots after are
freed) and it is made SGLang's chunked request again, so that result counts as a middle chunk
(no token) and its next chunk recomputes the rest through all layers. Requires a scheduler
without SGLang's overlap loop: the cut must happen before the next batch is built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sglang_cacheflow.sglang.split import SplitRestore, agree_pages, row_of, set_end, write_layer

__all__ = ["Stream", "StreamedLayers", "cut_back", "cut_to", "no_input_logprobs"]


@dataclass
class Stream:
    """One split restore whose loaded part streams into ``slots`` (token order)."""

    sp: SplitRestore
    slots: torch.Tensor
    deadline: float  # perf_counter() after which a missing group is given up
    req: Any = None  # SGLang's request (finished before its extend: aborted, slots freed)
    copied: int = -1  # pages copied in every layer filled so far (-1: none filled)
    filled: set[int] = field(default_factory=set)  # staging layers copied
    waited_s: float = 0.0

    @property
    def first_layer(self) -> int:
        return self.sp.layers[0]


class StreamedLayers:
    """The device KV pool's ``layer_transfer_counter``: HiCache's counter (``inner``) first,
    then the layers of the streams in flight. Anything else is HiCache's counter's."""

    def __init__(self, pool: Any, inner: Any | None) -> None:
        self.pool = pool
        self.inner = inner
        self.streams: dict[str, Stream] = {}

    @classmethod
    def install(cls, pool: Any) -> StreamedLayers:
        """Put a :class:`StreamedLayers` in front of ``pool``'s counter (once)."""
        inner = getattr(pool, "layer_transfer_counter", None)
        if isinstance(inner, cls):
            return inner
        layers = cls(pool, inner)
        pool.register_layer_transfer_counter(layers)
        return layers

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def add(self, rid: str, stream: Stream) -> None:
        self.streams[rid] = stream

    def wait_until(self, layer: int) -> None:
        """Layer ``layer`` (the pool's own index) is about to be read: wait for it."""
        if self.inner is not None:
            self.inner.wait_until(layer)
        for rid, stream in list(self.streams.items()):
            if stream.req is not None and stream.req.finished():
                # aborted before its extend: SGLang has freed its slots, write nothing
                del self.streams[rid]
                stream.sp.close()
                continue
            self._fill(stream, layer)

    def _fill(self, st: Stream, layer: int) -> None:
        k = layer - st.first_layer
        if k < 0 or k in st.filled or k >= st.sp.staging.shape[1]:
            return
        t0 = time.perf_counter()
        n = st.sp.wait_group(st.sp.group_of(k), st.deadline)
        st.waited_s += time.perf_counter() - t0
        if n:
            write_layer(self.pool, st.slots, st.sp.staging[:n, k], layer)
        st.copied = n if st.copied < 0 else min(st.copied, n)
        st.filled.add(k)

    def finish(self, rid: str, group: Any | None) -> tuple[Stream, int] | None:
        """``rid``'s forward has run: copy any layer it did not ask for, and the pages whose
        every layer is in on every TP rank. None if ``rid`` does not stream."""
        st = self.streams.pop(rid, None)
        if st is None:
            return None
        for k in range(st.sp.staging.shape[1]):
            self._fill(st, st.first_layer + k)
        return st, agree_pages(max(0, st.copied), group)


def cut_back(st: Stream, pages: int, req: Any, tree_cache: Any, scheduler: Any) -> None:
    """The forward just run attended over layers of ``st`` that did not land: cut ``req``'s
    KV back to the ``pages`` whole pages of its loaded part (:func:`cut_to`)."""
    sp = st.sp
    cut_to(req, sp.start + pages * sp.page_tokens, tree_cache, scheduler, sp.skip_insert)


def cut_to(req: Any, keep: int, tree_cache: Any, scheduler: Any, skip_insert: bool) -> None:
    """The forward just run gave ``req`` a result not to use: cut its KV back to its first
    ``keep`` tokens and make it the scheduler's chunked request again, so that the result
    is a middle chunk (no token) and the next chunk recomputes the rest through every
    layer. ``skip_insert``: the request's ``skip_radix_cache_insert`` from now on."""
    chunked = scheduler.chunked_req
    if chunked is not None and chunked is not req:  # admission keeps such a batch clear
        raise RuntimeError(
            f"cacheflow: rid={req.rid} must be cut back while rid={chunked.rid} is being chunked"
        )
    row = row_of(req, tree_cache)
    if req.extend_end > keep:
        tree_cache.token_to_kv_pool_allocator.free(row[keep : req.extend_end].to(torch.int64))
    set_end(req, keep)
    req.prefix_len = keep
    if keep == 0:  # nothing left: the request starts over without a row
        tree_cache.req_to_token_pool.free(req)
    req.skip_radix_cache_insert = skip_insert
    if chunked is None:  # its last chunk, now a middle one (SGLang counted it if chunked)
        scheduler.chunked_req = req
        req.inflight_middle_chunks += 1


def no_input_logprobs(batch: Any, i: int) -> None:
    """The ``i``-th request of ``batch`` was cut back: none of its input logprobs came out
    right."""
    starts = batch.extend_logprob_start_lens if batch.return_logprob else None
    if starts is not None:
        starts[i] = batch.extend_lens[i]
