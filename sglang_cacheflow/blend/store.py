"""Chunk KV in the tiers: a chunk's pages in score order, its scores beside them.

A chunk is stored under a key from its tokens and the preamble it was computed after; the
namespace (model, page layout, rank) keeps models and layouts apart. Its tokens are stored
in the order of their selection score, highest first, so recomputing the best ``k`` of them
leaves a contiguous run of pages to read: sparse transfer is a page range, and every tier
(host memory, Redis, Redis Cluster, an emulated link) serves it with its own integrity
checks. The order and the scores go into meta pages of the same layout (their first layers'
bytes), read with a layer-range read; a meta page that does not decode is a miss.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

from sglang_cacheflow.tiers.base import KVTier, LayerRange, Namespace

_MAGIC = 0x43464348  # "CFCH"
_VERSION = 1
_HEADER = struct.Struct("<IIqq")  # magic, version, tokens, start


def chunk_key(chunk_ids: torch.Tensor, preamble_ids: torch.Tensor, scorer: str) -> str:
    """Hex key of a chunk: its tokens, the preamble it was computed after, and the scorer
    that ordered its pages (two scorers store two orders, never a mix of both)."""
    h = hashlib.sha256(scorer.encode() + b"|")
    for ids in (preamble_ids, chunk_ids):
        h.update(",".join(map(str, ids.reshape(-1).tolist())).encode())
        h.update(b"|")
    return h.hexdigest()


@dataclass(frozen=True)
class StoredChunk:
    """What the store holds about one chunk."""

    key: str
    tokens: int
    start: int  # position of its first token when it was computed (the preamble's length)
    order: torch.Tensor  # (tokens,) int64: token indices by score, highest first
    scores: torch.Tensor  # (tokens,) float32, by token index

    def pages(self, page_tokens: int) -> int:
        return -(-self.tokens // page_tokens)


class ChunkStore:
    """Chunks of one namespace in one tier."""

    def __init__(self, tier: KVTier, namespace: Namespace) -> None:
        self.tier = tier
        self.namespace = namespace
        self.layout = namespace.layout

    @property
    def page_tokens(self) -> int:
        return self.layout.page_tokens

    def kv_hashes(self, key: str, first: int, end: int) -> list[str]:
        return [f"{key}-p{i}" for i in range(first, end)]

    def _meta_spans(self, tokens: int) -> list[tuple[str, LayerRange]]:
        """(page hash, layers) of each meta page: the meta bytes fill whole layers."""
        size = _HEADER.size + 8 * tokens
        layers = -(-size // self.layout.layer_bytes)
        per_page = self.layout.num_layers
        return [
            (f"m{i}", (0, min(per_page, layers - i * per_page)))
            for i in range(-(-layers // per_page))
        ]

    def put(self, key: str, kv: torch.Tensor, start: int, scores: torch.Tensor) -> bool:
        """Store a chunk: ``kv`` is ``(num_layers, 2, tokens, kv_heads, head_dim)`` computed
        at positions ``[start, start + tokens)``; ``scores`` one per token."""
        n = kv.shape[2]
        if scores.shape != (n,):
            raise ValueError(
                f"scores must have one entry per token ({n}), got {tuple(scores.shape)}"
            )
        scores = scores.detach().to(torch.float32).cpu()
        order = torch.argsort(scores, descending=True, stable=True)
        t = self.page_tokens
        npages = -(-n // t)
        data = torch.zeros((*kv.shape[:2], npages * t, *kv.shape[3:]), dtype=self.layout.dtype)
        data[:, :, :n] = kv[:, :, order].cpu()
        pages = [data[:, :, i * t : (i + 1) * t].contiguous() for i in range(npages)]
        hashes = self.kv_hashes(key, 0, npages)
        meta = _encode_meta(n, start, order, scores)
        spans = self._meta_spans(n)
        page_bytes = self.layout.page_bytes
        for i, (name, _) in enumerate(spans):
            page = self.layout.empty()
            raw = page.view(torch.uint8).reshape(-1)
            raw.zero_()
            part = meta[i * page_bytes : (i + 1) * page_bytes]
            raw[: len(part)] = torch.frombuffer(bytearray(part), dtype=torch.uint8)
            pages.append(page)
            hashes.append(f"{key}-{name}")
        return all(self.tier.batch_put(self.namespace, hashes, pages))

    def meta(self, key: str, tokens: int) -> StoredChunk | None:
        """The stored order and scores of a chunk of ``tokens`` tokens, or None (a miss, or
        meta that does not decode)."""
        spans = self._meta_spans(tokens)
        outs = [self.layout.empty(layers) for _, layers in spans]
        ok = []
        for layers in sorted({layers for _, layers in spans}, reverse=True):  # 1 or 2 calls
            idx = [i for i, (_, span) in enumerate(spans) if span == layers]
            hashes = [f"{key}-{spans[i][0]}" for i in idx]
            ok += self.tier.batch_get_into(self.namespace, hashes, [outs[i] for i in idx], layers)
        if not all(ok):
            return None
        raw = b"".join(o.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() for o in outs)
        return _decode_meta(key, raw, tokens)

    def read(
        self,
        parts: list[tuple[StoredChunk, int]],
        layers: LayerRange,
        outs: list[torch.Tensor],
    ) -> list[bool]:
        """Read layers ``layers`` of each ``(chunk, first_page)``'s pages ``[first_page,
        pages)`` into ``outs`` (one per page, in that order): one tier call for all."""
        hashes = [
            h
            for chunk, first in parts
            for h in self.kv_hashes(chunk.key, first, chunk.pages(self.page_tokens))
        ]
        return self.tier.batch_get_into(self.namespace, hashes, outs, layers)


def _encode_meta(n: int, start: int, order: torch.Tensor, scores: torch.Tensor) -> bytes:
    return (
        _HEADER.pack(_MAGIC, _VERSION, n, start)
        + order.to(torch.int32).numpy().tobytes()
        + scores.to(torch.float32).numpy().tobytes()
    )


def _decode_meta(key: str, raw: bytes, tokens: int) -> StoredChunk | None:
    magic, version, n, start = _HEADER.unpack_from(raw)
    if magic != _MAGIC or version != _VERSION or n != tokens or start < 0:
        return None
    body = raw[_HEADER.size : _HEADER.size + 8 * n]
    order = torch.frombuffer(bytearray(body[: 4 * n]), dtype=torch.int32).to(torch.int64)
    scores = torch.frombuffer(bytearray(body[4 * n :]), dtype=torch.float32).clone()
    if not torch.equal(torch.sort(order).values, torch.arange(n)):
        return None  # not a permutation: never scatter KV to the wrong tokens
    return StoredChunk(key, n, start, order, scores)
