"""Redis tier (single server or Redis Cluster) on redis-py with hiredis: :class:`RedisTier`,
the KV operations (put, get, exists, delete, clear) over the key schema::

    {ns.prefix}:{<page hash>}:<block>
    e.g. cf1:Llama-3.1-8B:L32-kv-t256-h8-d128-bf16:tp0of1:{9f2c...}:3

One record (:mod:`~sglang_cacheflow.tiers.page`) per block of ``layers_per_block`` layers;
the braces are a Redis Cluster hash tag, so all blocks of a page share a node. Every
failure of a page is a miss for that page, counted in :attr:`RedisTier.stats` and logged;
no exception from Redis reaches the caller after construction. Elsewhere: options and
URLs in :mod:`~sglang_cacheflow.tiers.redis_config`, clients in
:mod:`~sglang_cacheflow.tiers.redis_connect`, how a batch is sent in
:mod:`~sglang_cacheflow.tiers.redis_batch`, the commands of puts and gets in
:mod:`~sglang_cacheflow.tiers.redis_commands`. Design and measurements: docs/tiers.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from sglang_cacheflow.tiers.base import (
    KVTier,
    LayerRange,
    Namespace,
    TierStats,
    check_batch,
    check_page_hash,
)
from sglang_cacheflow.tiers.page import blocks_for_range
from sglang_cacheflow.tiers.redis_batch import BatchEngine, ErrorLog, Op, Status
from sglang_cacheflow.tiers.redis_commands import GetCommands, PutCommands
from sglang_cacheflow.tiers.redis_config import (
    URL_SCHEMES,
    RedisTierConfig,
    RedisTierError,
    redact_url,
)
from sglang_cacheflow.tiers.redis_connect import REDIS_ERRORS, Client, connect, is_cluster

__all__ = ["URL_SCHEMES", "RedisTier", "RedisTierConfig", "RedisTierError", "redact_url"]

# The one logger of the tier, its batch engine included.
logger = logging.getLogger(__name__)


def _block_key(ns: Namespace, page_hash: str, block: int) -> str:
    return f"{ns.prefix}:{{{page_hash}}}:{block}"


class RedisTier(KVTier):
    """Pages in Redis or Redis Cluster. Thread-safe; see the module docstring."""

    name = "redis"

    def __init__(self, config: RedisTierConfig | str, **overrides: Any) -> None:
        if isinstance(config, str):
            config = RedisTierConfig(url=config, **overrides)
        elif overrides:
            config = RedisTierConfig(**{**config.__dict__, **overrides})
        self.config = config
        self.url = redact_url(config.url)
        self._stats = TierStats()
        self._log = ErrorLog(logger, self._stats)
        self._mac_key = config.mac_key()  # before connecting: a missing secret is a config error
        self._client = connect(config)
        self._batch = BatchEngine(self._client, config, self._log, self.url)
        self._closed = False

    @property
    def direct_io(self) -> bool:
        """Whether reads and writes use the one-copy path (see :class:`RedisTierConfig`)."""
        return self._batch.direct

    @property
    def is_cluster(self) -> bool:
        return is_cluster(self._client)

    @property
    def stats(self) -> TierStats:
        return self._stats

    @property
    def client(self) -> Client:
        """The redis-py client (for tools and tests; tier data goes through the methods)."""
        return self._client

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._batch.close()
        self._client.close()

    def block_keys(self, ns: Namespace, page_hash: str) -> list[str]:
        """Keys of every block of a page."""
        return [_block_key(ns, page_hash, b) for b in range(len(self.config.blocks_for(ns.layout)))]

    # -- KVTier --------------------------------------------------------------------------
    def batch_put(
        self, ns: Namespace, page_hashes: Sequence[str], pages: Sequence[torch.Tensor]
    ) -> list[bool]:
        check_batch(ns, page_hashes, pages, None)
        layout = ns.layout
        blocks = self.config.blocks_for(layout)
        ops = [
            Op(i, _block_key(ns, h, b), count * layout.layer_bytes, "set", start, count)
            for i, h in enumerate(page_hashes)
            for b, (start, count) in enumerate(blocks)
        ]
        writes = PutCommands(layout, pages, self.config.ttl_s, self._mac_key)
        status = self._batch.execute(ops, len(page_hashes), writes)
        ok = [s == Status.HIT for s in status]
        n_ok = sum(ok)
        self._stats.add(puts=n_ok, put_failures=len(ok) - n_ok, put_bytes=n_ok * layout.page_bytes)
        return ok

    def batch_get_into(
        self,
        ns: Namespace,
        page_hashes: Sequence[str],
        outs: Sequence[torch.Tensor],
        layers: LayerRange | None = None,
    ) -> list[bool]:
        l0, l1 = check_batch(ns, page_hashes, outs, layers)
        layout = ns.layout
        lb = layout.layer_bytes
        blocks = self.config.blocks_for(layout)
        wanted = blocks_for_range(blocks, l0, l1)
        ops = []
        for i, h in enumerate(page_hashes):
            for b, first, count in wanted:
                start, bcount = blocks[b]
                kind = "get" if count == bcount else "range"  # else GETRANGE what is wanted
                ops.append(
                    Op(i, _block_key(ns, h, b), count * lb, kind, start, bcount,
                       first, count, start + first - l0)
                )  # fmt: skip
        reads = GetCommands(layout, outs, self._log, self.url, self._mac_key)
        status = self._batch.execute(ops, len(page_hashes), reads)
        if reads.corrupt_keys and self.config.evict_corrupt:
            self._delete_keys(reads.corrupt_keys)
        ok = [s == Status.HIT for s in status]
        hits = sum(ok)
        self._stats.add(
            gets=len(ok),
            hits=hits,
            misses=len(ok) - hits,
            corrupt=sum(s == Status.CORRUPT for s in status),
            get_bytes=hits * (l1 - l0) * lb,
        )
        return ok

    def batch_exists(self, ns: Namespace, page_hashes: Sequence[str]) -> list[bool]:
        for h in page_hashes:
            check_page_hash(h)
        keys = [self.block_keys(ns, h) for h in page_hashes]
        out = [False] * len(page_hashes)
        try:
            for lo in range(0, len(keys), 512):
                pipe = self._client.pipeline(transaction=False)
                for ks in keys[lo : lo + 512]:
                    pipe.exists(*ks)
                for j, n in enumerate(pipe.execute()):
                    out[lo + j] = n == len(keys[lo + j])
        except REDIS_ERRORS as e:
            self._log.error("Redis tier %s: exists failed: %r", self.url, e)
        return out

    def delete(self, ns: Namespace, page_hashes: Sequence[str]) -> int:
        for h in page_hashes:
            check_page_hash(h)
        try:
            pipe = self._client.pipeline(transaction=False)
            for h in page_hashes:
                # Same slot (hash tag), so one multi-key command works on a cluster too.
                pipe.execute_command("UNLINK", *self.block_keys(ns, h))
            return sum(1 for n in pipe.execute() if n)
        except REDIS_ERRORS as e:
            self._log.error("Redis tier %s: delete failed: %r", self.url, e)
            return 0

    def clear(self, ns: Namespace) -> int:
        """Delete every page of ``ns`` (SCAN + UNLINK on every node); returns keys removed."""
        removed = 0
        try:
            batch: list[str] = []
            for key in self._client.scan_iter(match=f"{ns.prefix}:*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    removed += self._delete_keys(batch)
                    batch = []
            removed += self._delete_keys(batch)
        except REDIS_ERRORS as e:
            self._log.error("Redis tier %s: clear failed: %r", self.url, e)
        return removed

    def _delete_keys(self, keys: Sequence[str | bytes]) -> int:
        if not keys:
            return 0
        try:
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.unlink(k)
            return sum(pipe.execute())
        except REDIS_ERRORS as e:
            # Not counted: cleanup (evicting corrupt records, clear) is not a failed page.
            self._log.error("Redis tier %s: unlink failed: %r", self.url, e, counted=False)
            return 0
