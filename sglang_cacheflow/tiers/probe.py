"""What reading a tier costs the CPU of the process that reads, measured by a probe read.

A Redis client spends CPU per command it sends and reply it parses: about one command per
page (and layer block) of a read, plus a fixed part per call. On a CPU engine that CPU is
taken from the forward running beside the read, whatever the bytes. :func:`probe_read_cpu`
measures both parts on the machine at hand by reading one stored page once and ``pages``
times in one call, with the process's CPU clock; the process must be otherwise idle (the
SGLang backend runs it when it registers, before any request).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass

import torch

from sglang_cacheflow.tiers.base import KVTier, Namespace

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientCpu:
    """CPU seconds the reading process spends per read call and per page read."""

    per_call_s: float
    per_page_s: float


def probe_read_cpu(
    tier: KVTier, ns: Namespace, pages: int = 64, rounds: int = 5
) -> ClientCpu | None:
    """Measure :class:`ClientCpu` of ``tier`` in namespace ``ns`` (a probe page is written,
    read and deleted); None when the tier cannot store or read it (the caller plans without
    a CPU term). Medians over ``rounds``."""
    if pages < 2 or rounds < 1:
        raise ValueError(f"a probe needs pages >= 2 and rounds >= 1, got {pages}, {rounds}")
    key = f"cacheflow-cpu-probe-{os.getpid()}"
    page = torch.zeros(ns.layout.shape(), dtype=ns.layout.dtype)
    if not tier.put(ns, key, page):
        return None
    one: list[float] = []
    many: list[float] = []
    try:
        for _ in range(rounds):
            for n, out in ((1, one), (pages, many)):
                c = time.process_time()
                ok = tier.batch_get_into(ns, [key] * n, [page] * n)
                out.append(time.process_time() - c)
                if not all(ok):
                    return None
    finally:
        tier.delete(ns, [key])
    per_page = max(0.0, (statistics.median(many) - statistics.median(one)) / (pages - 1))
    cpu = ClientCpu(max(0.0, statistics.median(one) - per_page), per_page)
    logger.info(
        "%s read CPU: %.1f us a call + %.1f us a page (probe of %d pages)",
        type(tier).__name__, cpu.per_call_s * 1e6, cpu.per_page_s * 1e6, pages,
    )  # fmt: skip
    return cpu
