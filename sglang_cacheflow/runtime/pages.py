"""Writing a request's KV to a tier as pages, and page keys for token sequences."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from sglang_cacheflow.runtime.kv import KVCache
from sglang_cacheflow.tiers.base import KVTier, Namespace


def page_hashes(input_ids: torch.Tensor, page_tokens: int, salt: str = "") -> list[str]:
    """Chained SHA-256 keys of every page of ``input_ids`` (a page's key covers all tokens
    up to its end, as SGLang's storage keys do); a partial last page gets a key too."""
    ids = input_ids.reshape(-1).tolist()
    out: list[str] = []
    prev = salt.encode()
    for p in range(0, len(ids), page_tokens):
        h = hashlib.sha256(prev)
        h.update(",".join(map(str, ids[p : p + page_tokens])).encode())
        prev = h.digest()
        out.append(h.hexdigest())
    return out


def store_pages(
    tier: KVTier,
    namespace: Namespace,
    kv: KVCache,
    hashes: Sequence[str],
    first_page: int,
    end_page: int,
) -> list[bool]:
    """Put pages ``[first_page, end_page)`` of ``kv`` (all layers) into ``tier``."""
    pages = [kv.page(p).cpu() for p in range(first_page, end_page)]
    return tier.batch_put(namespace, list(hashes[first_page:end_page]), pages)
