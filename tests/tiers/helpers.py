"""Helpers shared by the tier tests: random pages, page hashes, unique namespaces."""

from __future__ import annotations

import itertools
import uuid

import torch

from sglang_cacheflow.tiers import Namespace, PageLayout

_counter = itertools.count()


def random_pages(layout: PageLayout, n: int, seed: int = 0) -> list[torch.Tensor]:
    """Pages of random values (every byte pattern of the dtype is fair game for fp32/16)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(layout.shape(), generator=g) * 3).to(layout.dtype) for _ in range(n)]


def page_hashes(n: int) -> list[str]:
    base = uuid.uuid4().hex[:12]
    return [f"{base}{i:06x}" for i in range(n)]


def unique_ns(layout: PageLayout, **kw: int) -> Namespace:
    return Namespace(f"test-model-{next(_counter)}-{uuid.uuid4().hex[:6]}", layout, **kw)
