"""What reading a tier costs the CPU of the process that reads, measured by a probe read.

A Redis client spends CPU per command it sends and reply it parses: about one command per
page (and layer block) of a read, a little more for each layer's bytes, plus a fixed part
per call. On a CPU engine that CPU is taken from the forward running beside the read,
whatever the bytes. :func:`probe_read_cpu` measures them on the machine at hand by reading
one stored page, whole and its first layer, once and ``pages`` times in one call, with the
process's CPU clock less what the process spends anyway over the same time (its other
threads); the SGLang backend runs it when it registers, before any request.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sglang_cacheflow.tiers.base import KVTier, Namespace

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientCpu:
    """CPU seconds the reading process spends per read call, and per page read:
    ``per_page_s`` plus ``per_page_layer_s`` for each layer of it read (a ranged read of a
    few layers parses as many replies as a whole page's, with fewer bytes to copy)."""

    per_call_s: float
    per_page_s: float
    per_page_layer_s: float = 0.0


def _cpu_s(fn: Callable[[], object], idle_rate: float) -> float:
    """The process's CPU seconds in ``fn`` beyond what it spends anyway (``idle_rate``
    CPU seconds a second: its other threads)."""
    c, t = time.process_time(), time.perf_counter()
    fn()
    return max(0.0, time.process_time() - c - idle_rate * (time.perf_counter() - t))


def _idle_rate(seconds: float = 0.05) -> float:
    c = time.process_time()
    time.sleep(seconds)
    return (time.process_time() - c) / seconds


def probe_read_cpu(
    tier: KVTier, ns: Namespace, pages: int = 64, rounds: int = 5
) -> ClientCpu | None:
    """Measure :class:`ClientCpu` of ``tier`` in namespace ``ns`` (a probe page is written,
    read whole once and ``pages`` times in one call, its first layer ``pages`` times, and
    deleted); None when the tier cannot store or read it (the caller plans without a CPU
    term). Medians over ``rounds``."""
    if pages < 2 or rounds < 1:
        raise ValueError(f"a probe needs pages >= 2 and rounds >= 1, got {pages}, {rounds}")
    key = f"cacheflow-cpu-probe-{os.getpid()}"
    layers = ns.layout.num_layers
    page = torch.zeros(ns.layout.shape(), dtype=ns.layout.dtype)
    if not tier.put(ns, key, page):
        logger.warning("%s: the read CPU probe could not store its page", type(tier).__name__)
        return None
    failed = False

    def read(n: int, layer_range: tuple[int, int] | None) -> None:
        nonlocal failed
        out = page if layer_range is None else page[: layer_range[1] - layer_range[0]]
        failed |= not all(tier.batch_get_into(ns, [key] * n, [out] * n, layer_range))

    runs: dict[str, list[float]] = {"one": [], "whole": [], "layer": []}
    try:
        idle = _idle_rate()
        for _ in range(rounds):
            runs["one"].append(_cpu_s(lambda: read(1, None), idle))
            runs["whole"].append(_cpu_s(lambda: read(pages, None), idle))
            runs["layer"].append(_cpu_s(lambda: read(pages, (0, 1)), idle))
    finally:
        tier.delete(ns, [key])
    if failed:
        logger.warning("%s: the read CPU probe could not read its page", type(tier).__name__)
        return None
    one, whole, layer = (statistics.median(runs[k]) for k in ("one", "whole", "layer"))
    per_whole = max(0.0, (whole - one) / (pages - 1))  # a whole page, without the call
    per_call = max(0.0, one - per_whole)
    per_one_layer = max(0.0, (layer - per_call) / pages)  # a page's first layer
    per_layer = max(0.0, (per_whole - per_one_layer) / (layers - 1)) if layers > 1 else 0.0
    cpu = ClientCpu(per_call, max(0.0, per_one_layer - per_layer), per_layer)
    logger.info(
        "%s read CPU: %.1f us a call + %.1f us a page + %.2f us a page's layer (probe of %d "
        "pages)", type(tier).__name__, cpu.per_call_s * 1e6, cpu.per_page_s * 1e6,
        cpu.per_page_layer_s * 1e6, pages,
    )  # fmt: skip
    return cpu
