"""What the restore controller asks of SGLang's radix cache, reduced to plain objects, for
tests that drive the controller's decisions directly (the end-to-end behaviour is tested on
real servers)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from sglang_cacheflow.tiers.page import PageLayout


class Handle:
    """A request handle as SGLang's prefetch call carries it."""

    def __init__(self, rid: str) -> None:
        self.rid = rid


class Storage:
    """An L3 backend as a split restore's reader sees it: every page arrives (zeros)."""

    ns = SimpleNamespace(layout=PageLayout(4, 16, 2, 32, torch.float32))

    def read_pages(
        self, keys: list[str], pages: torch.Tensor, layers: tuple[int, int] | None = None
    ) -> list[bool]:
        pages.zero_()
        return [True] * len(keys)


class Cache:
    """The radix cache: L3 lookups answer ``hits`` (default: the whole span, in whole
    pages), prefetches are recorded in ``issued`` (rid -> tokens)."""

    enable_storage = False  # no SGLang prefetch is under way
    staged: tuple[int, int] | None = None  # what SGLang's prefetch stages (None: any)

    def __init__(self, hits: dict[str, int] | None = None) -> None:
        self.hits = hits
        self.issued: dict[str, int] = {}
        self.released: list[str] = []  # prefetches whose host pages were let go
        self.issue_order: list[tuple[str, int]] = []

    def cacheflow_storage_hit(self, call: dict[str, Any]) -> tuple[int, list[str]]:
        rid = call["request"].rid
        hit = self.hits[rid] if self.hits else len(call["new_input_tokens"]) // 16 * 16
        return hit, [f"{rid}-page{i}" for i in range(hit // 16)]

    def cacheflow_staged_load(self) -> tuple[int, int] | None:
        return self.staged

    def cacheflow_release_prefetch(self, rid: str) -> None:
        self.released.append(rid)

    def cacheflow_issue_prefetch(self, call: dict[str, Any]) -> None:
        rid, n = call["request"].rid, len(call["new_input_tokens"])
        self.issued[rid] = n
        self.issue_order.append((rid, n))

    def cacheflow_storage(self) -> Storage:
        return Storage()
