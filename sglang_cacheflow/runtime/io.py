"""I/O workers: the LOAD steps of a plan, split into (layer group, pages) tasks and run
by a few threads per tier, each marking its cells on the request's readiness board.

A load step of tokens ``[a, b)`` and layers ``[l0, L)`` becomes tasks of a few layers
each, issued layer group after layer group, so the forward that waits for layer ``l``
can start as soon as that layer is in. A tier that keeps its pages in this process
(the host tier) lends them as views, copied straight into the request's KV buffer (by DMA
on the worker's own CUDA stream when the tier's pages are pinned). From other tiers, whole
pages are read straight into the KV buffer on CPU; partial pages (a step that begins or
ends inside a page), and every page on a CUDA device, go through a staging buffer (pinned
on CUDA). A page the tier cannot return is marked failed, never used.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from sglang_cacheflow.runtime.kv import KVCache
from sglang_cacheflow.runtime.readiness import FAILED, READY, Readiness
from sglang_cacheflow.tiers.base import KVTier, Namespace

logger = logging.getLogger(__name__)


@dataclass
class LoadTask:
    """Layers ``[l0, l1)`` of tokens ``[start, end)`` of one request from one tier."""

    request: str
    step: int  # index of the LOAD step in the request's plan
    tier: str
    start: int
    end: int
    l0: int
    l1: int
    kv: KVCache
    readiness: Readiness
    page_hashes: Sequence[str]


@dataclass
class StepTransfer:
    """Measured transfer of one LOAD step: bytes and first-issue to last-landing time."""

    tier: str
    nbytes: int = 0
    first_s: float = float("inf")
    last_s: float = 0.0
    failed_pages: int = 0
    tasks_left: int = 0

    @property
    def seconds(self) -> float:
        return max(0.0, self.last_s - self.first_s)


@dataclass
class IOStats:
    loaded_bytes: int = 0
    failed_pages: int = 0
    tasks: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int, failed: int) -> None:
        with self._lock:
            self.loaded_bytes += nbytes
            self.failed_pages += failed
            self.tasks += 1


def split_load(
    start: int, end: int, l0: int, l1: int, bytes_per_token_layer: int, task_bytes: int
) -> list[tuple[int, int]]:
    """Layer groups ``[g0, g1)`` of a load step, each at least ``task_bytes`` (but one
    layer at least): few calls for a small step, streaming for a large one."""
    per_layer = max(1, (end - start) * bytes_per_token_layer)
    group = max(1, min(l1 - l0, -(-task_bytes // per_layer)))
    return [(g, min(l1, g + group)) for g in range(l0, l1, group)]


class IOEngine:
    """Worker threads per tier running :class:`LoadTask` s in submission order."""

    def __init__(
        self,
        tiers: dict[str, KVTier],
        namespace: Namespace,
        workers_per_tier: int = 2,
        on_task_done: Callable[[LoadTask, int], None] | None = None,
    ) -> None:
        self.tiers = tiers
        self.namespace = namespace
        self.workers_per_tier = workers_per_tier
        self.on_task_done = on_task_done
        self.stats = IOStats()
        self.transfers: dict[tuple[str, int], StepTransfer] = {}
        self._lock = threading.Lock()
        self._queues: dict[str, queue.Queue[LoadTask | None]] = {}
        self._threads: list[threading.Thread] = []

    def submit(self, tasks: Sequence[LoadTask]) -> None:
        """Queue ``tasks`` (in the order given, per tier) and start the workers."""
        for t in tasks:
            key = (t.request, t.step)
            tr = self.transfers.setdefault(key, StepTransfer(t.tier))
            tr.tasks_left += 1
            q = self._queues.get(t.tier)
            if q is None:
                if t.tier not in self.tiers:
                    raise KeyError(
                        f"plan loads from tier {t.tier!r}, executor has {sorted(self.tiers)}"
                    )
                q = self._queues[t.tier] = queue.Queue()
                for i in range(self.workers_per_tier):
                    th = threading.Thread(
                        target=self._worker,
                        args=(t.tier, q),
                        name=f"cf-io-{t.tier}-{i}",
                        daemon=True,
                    )
                    self._threads.append(th)
            q.put(t)
        for q in self._queues.values():
            for _ in range(self.workers_per_tier):
                q.put(None)
        for th in self._threads:
            th.start()

    def join(self) -> None:
        for th in self._threads:
            th.join()

    def busy(self) -> bool:
        """Whether any submitted load is still running or queued."""
        with self._lock:
            return any(tr.tasks_left > 0 for tr in self.transfers.values())

    def _worker(self, tier_name: str, q: queue.Queue[LoadTask | None]) -> None:
        tier = self.tiers[tier_name]
        stream = None
        if torch.cuda.is_available():
            stream = torch.cuda.Stream()
        while True:
            task = q.get()
            if task is None:
                return
            t0 = time.perf_counter()
            try:
                nbytes, failed = self._run(tier, task, stream)
            except Exception:  # a tier must not raise, but a restore never trusts one that does
                logger.exception("load of %s [%d, %d) failed", task.request, task.start, task.end)
                task.readiness.mark(task.start, task.end, task.l0, task.l1, FAILED)
                nbytes, failed = 0, -(-(task.end - task.start) // task.kv.page_tokens)
            t1 = time.perf_counter()
            self.stats.add(nbytes, failed)
            with self._lock:
                tr = self.transfers[(task.request, task.step)]
                tr.nbytes += nbytes
                tr.failed_pages += failed
                tr.first_s = min(tr.first_s, t0)
                tr.last_s = max(tr.last_s, t1)
                tr.tasks_left -= 1
            if self.on_task_done is not None:
                self.on_task_done(task, failed)

    def _run(
        self, tier: KVTier, task: LoadTask, stream: torch.cuda.Stream | None
    ) -> tuple[int, int]:
        kv, T = task.kv, task.kv.page_tokens
        layers = (task.l0, task.l1)
        on_cpu = kv.device.type == "cpu"
        pages = range(task.start // T, -(-task.end // T))
        hashes: list[str] = []
        spans: list[tuple[int, int, int]] = []  # (page, lo, hi)
        missing: list[tuple[int, int]] = []
        for p in pages:
            lo, hi = max(task.start, p * T), min(task.end, (p + 1) * T)
            h = task.page_hashes[p] if p < len(task.page_hashes) else ""
            if not h:
                missing.append((lo, hi))
                continue
            hashes.append(h)
            spans.append((p, lo, hi))
        # Held until the copies are done: a view outlives its page's eviction, not its drop.
        srcs = tier.batch_views(self.namespace, hashes, layers) if hashes else []
        in_place = [False] * len(spans)
        if srcs is None:
            srcs, in_place = self._read(tier, kv, spans, hashes, layers)
        ok = [src is not None for src in srcs]
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for (p, lo, hi), src, done in zip(spans, srcs, in_place, strict=True):
                if src is not None and not done:
                    kv.tokens(lo, hi, layers).copy_(
                        src[:, :, lo - p * T : hi - p * T], non_blocking=not on_cpu
                    )
        if stream is not None:
            stream.synchronize()
        nbytes = 0
        failed = len(missing)
        for (_p, lo, hi), hit in zip(spans, ok, strict=True):
            if hit:
                nbytes += out_bytes(kv, hi - lo, task.l1 - task.l0)
                task.readiness.mark(lo, hi, task.l0, task.l1, READY)
            else:
                failed += 1
                task.readiness.mark(lo, hi, task.l0, task.l1, FAILED)
        for lo, hi in missing:
            task.readiness.mark(lo, hi, task.l0, task.l1, FAILED)
        return nbytes, failed

    def _read(
        self,
        tier: KVTier,
        kv: KVCache,
        spans: Sequence[tuple[int, int, int]],
        hashes: Sequence[str],
        layers: tuple[int, int],
    ) -> tuple[list[torch.Tensor | None], list[bool]]:
        """Read pages with :meth:`KVTier.batch_get_into`: a whole page on CPU straight into
        the KV buffer (flagged in place), any other into a staging page to copy from."""
        T, on_cpu = kv.page_tokens, kv.device.type == "cpu"
        in_place = [on_cpu and lo == p * T and hi == (p + 1) * T for p, lo, hi in spans]
        layout = kv.layout()
        outs = [
            kv.page(p, layers) if direct else layout.empty(layers, pin=not on_cpu)
            for (p, _lo, _hi), direct in zip(spans, in_place, strict=True)
        ]
        ok = tier.batch_get_into(self.namespace, hashes, outs, layers)
        return [out if hit else None for out, hit in zip(outs, ok, strict=True)], in_place


def out_bytes(kv: KVCache, tokens: int, layers: int) -> int:
    return tokens * layers * kv.bytes_per_token // kv.num_layers
