"""Split restores inside SGLang: one request recomputes part of its evicted span while the
rest of the same span is read from its tier, then the loaded part is spliced into its KV.

Two shapes of a request whose evicted span is ``[d, d+E)``:

- **token split** ``s`` (Cake's order): recompute tokens ``[d, d+s)``, load ``[d+s, d+E)``;
- **layer split** ``l`` (CacheFlow's): recompute layers ``[0, l)`` of the whole span, load
  layers ``[l, L)`` of it.

Both run in three steps:

1. **plan** (controller): :class:`SplitReader` starts reading the loaded part's pages (only
   its layers) from the tier (Redis, or the host pool) into *staging* memory of this
   restore's own, page by page in order, in the background;
2. **admission** (hooks around SGLang's ``PrefillAdder``): the request is admitted with a
   first chunk that ends at the *cut*: ``d+s`` for a token split; ``d+E`` for a layer split,
   whose chunk runs alone in its batch through layers ``[0, l)`` only (the model's layer
   loop is cut short for that forward) and is kept out of the radix tree until its top
   layers are in;
3. **splice** (:func:`splice`, right after SGLang checkpoints that chunk, before the next
   batch is built): wait for the reader, copy what landed into the request's KV slots
   (token split: into slots allocated now and written into its ``req_to_token`` row; layer
   split: into the layers ``[l, L)`` of the slots its chunk already owns) and checkpoint, so
   the span is a device node of the tree (the next turn of the conversation hits device
   memory) and the next chunk extends the new tokens over the whole prefix. Streamed
   (:func:`splice_streamed`, more than one layer group): the slots without the wait or the
   copy; the next chunk's layers wait for their groups (:mod:`~sglang_cacheflow.sglang.stream`).

Who owns what, when: staging belongs to the :class:`SplitRestore` until the splice; device
slots are allocated in the scheduler thread (by the chunk's extend, or at the splice) and
belong to the request's row from the moment they are written there (SGLang frees them with
the request or hands them to the tree). A page that does not arrive (tier down, checksum
failure, time-out) ends the loaded part there: the splice keeps the whole pages before it,
and the next chunk recomputes the rest through all layers (for a layer split, the tokens
whose top layers are missing are dropped from the request's prefix first), so a failure
never produces wrong KV, and the shortfall is counted as a fallback.

Under tensor parallelism every rank reads its own heads' pages; the number of pages spliced
is the MIN over the ranks (one ``all_reduce`` per split restore), so every rank extends the
same tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "SplitReader",
    "SplitRestore",
    "SplitUnavailable",
    "agree_pages",
    "alloc_slots",
    "row_of",
    "set_end",
    "splice",
    "splice_streamed",
    "start_host_split",
    "start_l3_split",
    "write_layer",
    "write_pages",
]

logger = logging.getLogger("sglang_cacheflow.sglang")

PAGES_PER_READ = 4
"""Pages per tier read: the granularity at which a failure or a time-out cuts the front."""

ReadPages = Callable[[int, int, int, int], list[bool]]
"""``read(lo, hi, a, b)`` fills staging pages ``[lo, hi)``, staging layers ``[a, b)``; one
bool per page."""


@dataclass
class SplitRestore:
    """One request's split restore: tokens ``[start, start + tokens)`` x layers ``layers`` of
    its span are loaded into staging; the rest of the span is recomputed."""

    rid: str
    tier: str
    start: int  # absolute position of the first loaded token (page aligned)
    tokens: int  # tokens planned to be loaded (whole pages)
    page_tokens: int
    staging: torch.Tensor  # (pages, loaded layers, 2, page_tokens, heads, head_dim)
    layers: tuple[int, int] = (0, 0)  # loaded layer range; (0, 0) means all of them
    release: Callable[[], None] | None = None  # undo what protects the source (host lock)
    skip_insert: bool = False  # the request's own skip_radix_cache_insert, restored at the end
    # where the span begins: the request is admitted with its prefix up to here (device
    # pages, and host pages before an L3 span, which SGLang loads back as for any host hit)
    span_start: int = 0
    # a split run in its new tokens' forward (sglang_cacheflow.sglang.one_forward)
    one_forward: bool = False
    # its layer groups are small at both ends (:meth:`group_layers`), fixed when the read
    # starts: a forward reads them from its first layer on (a token split in one forward)
    tapered: bool = False
    groups: int = 1  # the loaded layers are read in this many layer groups, one after another
    group_pages: list[int] = field(default_factory=list)  # per group: pages [0, n) landed
    error: str | None = None
    began: float | None = None  # perf_counter() when its read started
    read_s: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    landed: threading.Condition = field(default_factory=threading.Condition)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.groups = max(1, min(self.groups, self.staging.shape[1]))
        self.group_pages = [0] * self.groups

    @property
    def pages(self) -> int:
        return self.tokens // self.page_tokens

    @property
    def landed_pages(self) -> int:
        """Pages ``[0, n)`` whose every loaded layer is in staging."""
        return min(self.group_pages)

    def group_layers(self, g: int) -> tuple[int, int]:
        """Staging layers ``[a, b)`` of layer group ``g``: equal groups (they differ by one
        layer at most), except for a front load or a :attr:`tapered` read, whose groups grow
        towards the middle and shrink again (weights 1, 2, 3, ..., 3, 2, 1): the forward that
        reads them from its first layer on reads nothing before the first group has landed
        and, where the read is the slower, computes the last group after it ends, so both
        are kept short."""
        n, k = self.staging.shape[1], self.groups
        if not (self.loads_front or self.tapered):
            return g * n // k, (g + 1) * n // k
        weights = [min(i + 1, k - i) for i in range(k)]
        total = sum(weights)

        def edge(i: int) -> int:  # every group keeps at least one layer
            return min(max(i, round(n * sum(weights[:i]) / total)), n - (k - i))

        return edge(g), edge(g + 1)

    def group_of(self, layer: int) -> int:
        """The layer group holding staging layer ``layer``."""
        return next(g for g in range(self.groups) if layer < self.group_layers(g)[1])

    def _landed(self, g: int, pages: int) -> None:
        with self.landed:
            self.group_pages[g] = pages
            self.landed.notify_all()

    def wait_group(self, g: int, deadline: float) -> int:
        """Wait until layer group ``g`` has landed, its read has ended or ``deadline``
        (``perf_counter()``) passed; the pages ``[0, n)`` of that group in staging."""
        with self.landed:
            while self.group_pages[g] < self.pages and not self.done.is_set():
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self.landed.wait(left)
            return self.group_pages[g]

    @property
    def layer_share(self) -> float:
        """The share of each token's KV loaded: the loaded layers over all of them."""
        l0, l1 = self.layers
        return (l1 - l0) / l1 if self.layer_split else 1.0

    @property
    def layer_split(self) -> int | None:
        """``l`` of a layer split (layers ``[0, l)`` recomputed), None for a token split."""
        return self.layers[0] if self.layers[0] > 0 else None

    @property
    def loads_front(self) -> bool:
        """Whether this restore loads the front of its span (load front, or load all), the
        rest recomputed with the new tokens in one extend that the load streams into: no
        first chunk, the loaded slots are the request's prefix from its admission on."""
        return not self.layer_split and self.start == self.span_start

    @property
    def cut(self) -> int:
        """Where the request's first chunk ends: the loaded back's start for a token split,
        the span's end for a layer split."""
        return self.start + self.tokens if self.layer_split else self.start

    def close(self) -> None:
        """Stop the reader and release the source; the staging memory goes with the object."""
        self.cancelled = True
        if self.release is not None:
            release, self.release = self.release, None
            release()


class SplitReader:
    """A background thread that reads the backs of split restores, one after another in the
    order the plan serves them (the tier is one I/O channel in the plan). ``on_read(sp)``
    is called once a restore's read has ended, before the splice may use it: the whole read
    is one transfer for calibration (one latency, as the planner prices a load), however
    many tier calls it took."""

    def __init__(
        self,
        pages_per_read: int = PAGES_PER_READ,
        on_read: Callable[[SplitRestore], None] | None = None,
    ) -> None:
        self.pages_per_read = max(1, pages_per_read)
        self.on_read = on_read
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cacheflow-split")
        self._lock = threading.Lock()
        self._queued = 0  # restores submitted and not yet read
        self._idle_at = float("-inf")  # perf_counter() when the last read ended

    def submit(self, sp: SplitRestore, read: ReadPages) -> None:
        with self._lock:
            self._queued += 1
        self._pool.submit(self._run, sp, read)

    def busy_since(self, t: float) -> bool:
        """Whether a read was under way at some time since ``t`` (``perf_counter()``): a
        forward that ran then shared the machine with it (calibration's overlap)."""
        with self._lock:
            return self._queued > 0 or self._idle_at > t

    def _run(self, sp: SplitRestore, read: ReadPages) -> None:
        start = sp.began = time.perf_counter()
        # A streamed restore's layer groups go in one tier call each: the forward waits
        # per group, and every call pays the tier's latency.
        step = self.pages_per_read if sp.groups == 1 else max(1, sp.pages)
        try:
            for g in range(sp.groups):
                a, b = sp.group_layers(g)
                for lo in range(0, sp.pages, step):
                    if sp.cancelled:
                        sp.error = sp.error or "cancelled"
                        break
                    hi = min(sp.pages, lo + step)
                    ok = read(lo, hi, a, b)
                    good = ok.index(False) if False in ok else len(ok)
                    sp._landed(g, lo + good)
                    if good < hi - lo:
                        sp.error = f"page {lo + good} of {sp.pages} missing or corrupt"
                        break
                if sp.error:
                    break
        except Exception as e:  # a tier fault: the pages so far stand, the rest is recomputed
            logger.warning("cacheflow: split restore of rid=%s: read failed: %r", sp.rid, e)
            sp.error = repr(e)
        finally:
            sp.read_s = time.perf_counter() - start
            try:
                if self.on_read is not None and sp.landed_pages:
                    self.on_read(sp)
            finally:
                with self._lock:
                    self._queued -= 1
                    self._idle_at = time.perf_counter()
                with sp.landed:
                    sp.done.set()
                    sp.landed.notify_all()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def new_staging(pages: int, layers: int, page_tokens: int, heads: int, head_dim: int,
                dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Staging memory for ``pages`` pages in the tier's page format (pinned on CUDA hosts:
    page-locked memory is what the copy engine reads at full PCIe bandwidth)."""
    pin = torch.cuda.is_available()
    return torch.empty(
        (pages, layers, 2, page_tokens, heads, head_dim), dtype=dtype, pin_memory=pin
    )


class SplitUnavailable(RuntimeError):
    """What a split would load is not where it would read it; the message says why."""


def _new_split(
    req: Any, tier: str, front: int, layer: int, pages: int, like: tuple[int, ...],
    dtype: torch.dtype, groups: int, release: Callable[[], None] | None = None,
    one_forward: bool = False,
) -> SplitRestore:  # fmt: skip
    """A split restore of ``req``'s span (a planner ``Request``) loading ``pages`` pages from
    ``front`` tokens into the span and from layer ``layer`` on, in ``groups`` layer groups
    (``one_forward``: in its new tokens' forward, a token split's read then tapered);
    ``like`` is a page's (layers, 2, tokens, heads, dim)."""
    num_layers, _, page, heads, dim = like
    staging = new_staging(pages, num_layers - layer, page, heads, dim, dtype)
    start = req.device_tokens + front
    return SplitRestore(
        req.id, tier, start, pages * page, page, staging,
        layers=(layer, num_layers) if layer else (0, 0), release=release, groups=groups,
        span_start=req.device_tokens, one_forward=one_forward,
        tapered=one_forward and not layer,
    )  # fmt: skip


def start_l3_split(
    reader: SplitReader, storage: Any, req: Any, front: int, layer: int, keys: list[str],
    page: int, groups: int = 1, tokens: int | None = None, one_forward: bool = False,
) -> SplitRestore:  # fmt: skip
    """Start reading what a split loads of ``req``'s L3 span (a planner ``Request``) through
    ``storage`` (:class:`~sglang_cacheflow.sglang.storage.CacheFlowRedisStorage`): the pages after
    ``front`` tokens of the span (``tokens`` of them; None: to its end), their layers from
    ``layer`` on, in ``groups`` layer groups (more than one: streamed into the extend, see
    :mod:`~sglang_cacheflow.sglang.stream`; ``one_forward``: into its new tokens' forward,
    :mod:`~sglang_cacheflow.sglang.one_forward`). ``keys``: the span's page keys."""
    from sglang_cacheflow.tiers.names import L3_TIER

    end = req.evicted_tokens if tokens is None else front + tokens
    back = keys[front // page : end // page]
    if storage is None or end > req.evicted_tokens or len(back) * page != end - front:
        raise SplitUnavailable(f"{len(back)} page keys, L3 backend {storage}")
    lay = storage.ns.layout
    like = (lay.num_layers, 2, page, lay.kv_heads, lay.head_dim)
    sp = _new_split(
        req, L3_TIER, front, layer, len(back), like, lay.dtype, groups, None, one_forward
    )

    def read(lo: int, hi: int, a: int, b: int) -> list[bool]:
        return storage.read_pages(back[lo:hi], sp.staging[lo:hi, a:b], (layer + a, layer + b))

    reader.submit(sp, read)
    return sp


def start_host_split(
    reader: SplitReader, cache: Any, node: Any, req: Any, front: int, layer: int, page: int,
    groups: int = 1, one_forward: bool = False,
) -> SplitRestore:  # fmt: skip
    """Start copying what a split loads of ``req``'s host hit (ending at ``node`` of the
    radix ``cache``) to staging: the pages after ``front`` tokens, their layers from
    ``layer`` on, in ``groups`` layer groups (``one_forward``: as for
    :func:`start_l3_split`). The host pages stay locked until the restore is closed."""
    from sglang_cacheflow.sglang.storage import canonical_page_view
    from sglang_cacheflow.tiers.names import HOST_TIER

    host = cache.cacheflow_host_pages(node)
    if host is None or len(host[1]) < req.evicted_tokens:
        raise SplitUnavailable(f"host pages of the hit not found ({host and len(host[1])})")
    pool, indices = host
    starts = indices[front : req.evicted_tokens : page].tolist()
    first = canonical_page_view(pool, int(starts[0]))
    unlock = cache.inc_host_lock_ref(node).to_dec_params()
    sp = _new_split(
        req, HOST_TIER, front, layer, len(starts), tuple(first.shape), first.dtype, groups,
        release=lambda: cache.dec_host_lock_ref(node, unlock), one_forward=one_forward,
    )  # fmt: skip

    def read(lo: int, hi: int, a: int, b: int) -> list[bool]:
        for i in range(lo, hi):
            page_ = canonical_page_view(pool, int(starts[i]))
            sp.staging[i, a:b].copy_(page_[layer + a : layer + b])
        return [True] * (hi - lo)

    reader.submit(sp, read)
    return sp


def write_pages(
    pool: Any, slots: torch.Tensor, staging: torch.Tensor, first_layer: int = 0
) -> None:
    """Copy staging pages (pages, layers, 2, page_tokens, heads, dim) into the device KV pool
    ``pool`` (SGLang's ``MHATokenToKVPool``: per-layer ``k_buffer``/``v_buffer`` of
    (slots, heads, dim)) at ``slots``, one token per slot, in order; staging layer ``i``
    goes to pool layer ``first_layer + i``."""
    layers = staging.shape[1]
    if first_layer + layers > pool.layer_num:
        raise ValueError(
            f"staging has layers [{first_layer}, {first_layer + layers}), the device pool "
            f"{pool.layer_num}"
        )
    idx = slots.to(device=pool.k_buffer[0].device, dtype=torch.int64)
    for i in range(layers):
        write_layer(pool, idx, staging[:, i], first_layer + i)


def write_layer(pool: Any, idx: torch.Tensor, pages: torch.Tensor, layer: int) -> None:
    """Copy one layer of staging pages (pages, 2, page_tokens, heads, dim) into the pool's
    layer ``layer`` at slots ``idx`` (int64, on the pool's device), one token per slot."""
    n = pages.shape[0] * pages.shape[2]
    kb, vb = pool.k_buffer[layer], pool.v_buffer[layer]
    kb[idx[:n]] = pages[:, 0].reshape(n, *kb.shape[1:]).to(device=kb.device, dtype=kb.dtype)
    vb[idx[:n]] = pages[:, 1].reshape(n, *vb.shape[1:]).to(device=vb.device, dtype=vb.dtype)


def agree_pages(pages: int, group: Any | None) -> int:
    """The pages every TP rank has (MIN over ``group``; the value itself without a group)."""
    if group is None or torch.distributed.get_world_size(group) <= 1:
        return pages
    t = torch.tensor([pages], dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=group)
    return int(t.item())


@dataclass(frozen=True)
class Spliced:
    tokens: int  # tokens written into the request's KV slots
    waited_s: float  # how long the scheduler waited for the reader
    reason: str | None  # why fewer tokens than planned, if so


def splice(
    sp: SplitRestore, req: Any, tree_cache: Any, wait_s: float, group: Any | None
) -> Spliced:
    """Put what landed of ``sp`` into ``req``'s KV (see the module doc, step 3).

    ``req`` has just been checkpointed at ``sp.cut``: its ``req_to_token`` row holds
    ``[0, cut)`` and its ``prefix_len`` is ``cut``. Called in the scheduler thread.
    """
    from sglang.srt.mem_cache.common import checkpoint_kv_cache

    t0 = time.perf_counter()
    if not sp.done.wait(wait_s):
        sp.cancelled = True  # the reader stops at its next page; what landed stands
    waited = time.perf_counter() - t0
    pages = agree_pages(min(sp.landed_pages, sp.pages), group)
    reason = None
    if pages < sp.pages:
        reason = "split_timeout" if not sp.done.is_set() else "split_read_failed"
    if sp.layer_split:
        n, failure = _splice_layers(sp, req, tree_cache, pages)
    else:
        n, failure = _splice_tokens(sp, req, tree_cache, pages)
    if req.kv.holds_kv:
        checkpoint_kv_cache(req, tree_cache)  # inserts [.., extend_end) into the tree
    return Spliced(n, waited, failure or reason)


def splice_streamed(sp: SplitRestore, req: Any, tree_cache: Any) -> torch.Tensor | None:
    """Give ``req`` the KV slots of ``sp``'s whole loaded part without waiting for the read
    (a token split's are allocated now, a layer split's are its chunk's) and keep its KV out
    of the tree until every layer has landed (:mod:`~sglang_cacheflow.sglang.stream` fills
    them). The slots, in token order; None without device memory for them."""
    from sglang.srt.mem_cache.common import checkpoint_kv_cache

    if sp.layer_split:
        slots = row_of(req, tree_cache)[sp.start : sp.start + sp.tokens].to(torch.int64)
    else:
        n, failure = _splice_tokens(sp, req, tree_cache, sp.pages, copy=False)
        if failure is not None or n == 0:
            return None
        slots = row_of(req, tree_cache)[sp.start : sp.start + n].to(torch.int64)
        sp.skip_insert, req.skip_radix_cache_insert = req.skip_radix_cache_insert, True
    checkpoint_kv_cache(req, tree_cache)  # not published (skip): the next extend resumes here
    return slots


def row_of(req: Any, tree_cache: Any) -> torch.Tensor:
    return tree_cache.req_to_token_pool.req_to_token[req.kv.req_pool_idx]


def _splice_tokens(
    sp: SplitRestore, req: Any, tree_cache: Any, pages: int, copy: bool = True
) -> tuple[int, Any]:
    """Token split: new slots for the back's landed pages, after the recomputed front (and
    their KV copied in, unless the stream copies it)."""
    n = pages * sp.page_tokens
    if n <= 0:
        return 0, None
    allocator = tree_cache.token_to_kv_pool_allocator
    slots = alloc_slots(tree_cache, n)
    if slots is None:
        return 0, "split_no_device_memory"
    try:
        if copy:
            write_pages(allocator.get_kvcache(), slots, sp.staging[:pages])
        tree_cache.req_to_token_pool.write(
            (req.kv.req_pool_idx, slice(sp.start, sp.start + n)), slots
        )
    except Exception:
        allocator.free(slots)
        raise
    set_end(req, sp.start + n)
    return n, None


def _splice_layers(sp: SplitRestore, req: Any, tree_cache: Any, pages: int) -> tuple[int, Any]:
    """Layer split: the loaded top layers into the slots the chunk computed the bottom ones
    in. Tokens whose top layers did not land leave the prefix (their slots are freed) and
    are recomputed through all layers by the next chunk."""
    n = pages * sp.page_tokens
    row = row_of(req, tree_cache)
    end = sp.start + sp.tokens
    if n > 0:
        slots = row[sp.start : sp.start + n].to(torch.int64)
        write_pages(tree_cache.token_to_kv_pool_allocator.get_kvcache(), slots, sp.staging[:pages],
                    first_layer=sp.layers[0])  # fmt: skip
    if n < sp.tokens:
        tree_cache.token_to_kv_pool_allocator.free(row[sp.start + n : end].to(torch.int64))
        set_end(req, sp.start + n)
        req.prefix_len = sp.start + n
        if sp.start + n == 0:  # nothing left: the request starts over without a row
            tree_cache.req_to_token_pool.free(req)
    req.skip_radix_cache_insert = sp.skip_insert  # its KV is whole again: publish it
    return n, None


def alloc_slots(tree_cache: Any, n: int) -> torch.Tensor | None:
    """``n`` device KV slots, evicting from the tree when the pool is short; None without
    room."""
    allocator = tree_cache.token_to_kv_pool_allocator
    slots = allocator.alloc(n)
    if slots is None:
        from sglang.srt.mem_cache.common import evict_from_tree_cache

        evict_from_tree_cache(tree_cache, n)
        slots = allocator.alloc(n)
    return slots


def set_end(req: Any, end: int) -> None:
    """The request's KV now ends at ``end``: the next checkpoint publishes ``[.., end)``."""
    req.kv.kv_allocated_len = end
    req.kv.kv_committed_len = end
    req.extend_end = end
