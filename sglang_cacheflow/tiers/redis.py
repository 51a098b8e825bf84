"""Redis tier (single server or Redis Cluster) on redis-py with hiredis.

Key schema (``ns`` is the :class:`~sglang_cacheflow.tiers.base.Namespace`)::

    {ns.prefix}:{<page hash>}:<block>
    e.g. cf1:Llama-3.1-8B:L32-kv-t256-h8-d128-bf16:tp0of1:{9f2c...}:3

A page is stored as blocks of ``layers_per_block`` consecutive layers, one record
(:mod:`~sglang_cacheflow.tiers.page`) per key. Block size defaults to about 1 MiB
(``block_bytes``), the size at which this Redis moves data fastest (docs/tiers.md has the
measurements); a layer range reads only the blocks it overlaps, with ``GETRANGE`` for the
part of a block it needs. The braces are a Redis Cluster hash tag: every block of a page
lives on one node (one multi-key ``EXISTS`` or ``DEL`` per page), and pages spread over the
nodes.

Batch calls split their commands over ``streams`` threads, each with its own pooled
connection, and send them in pipelines of about ``pipeline_bytes``; deep pipelines of large
values are slower than short ones (the server buffers every reply before the client drains
them). Every failure of a page (missing block, bad record, server error or disconnect) is a
miss for that page, counted in :attr:`RedisTier.stats` and logged; no exception from Redis
reaches the caller after construction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.cluster
import torch
from redis._parsers import Encoder
from redis.backoff import ExponentialBackoff
from redis.connection import PythonRespSerializer
from redis.retry import Retry

from sglang_cacheflow.tiers.base import (
    KVTier,
    LayerRange,
    Namespace,
    TierStats,
    check_batch,
    check_page_hash,
)
from sglang_cacheflow.tiers.page import (
    BlockHeader,
    CorruptRecordError,
    PageLayout,
    blocks_for_range,
    copy_bytes_into,
    encode_block,
    split_blocks,
    verify_header,
    verify_layers,
)

__all__ = ["RedisTier", "RedisTierConfig", "RedisTierError", "redact_url"]

logger = logging.getLogger(__name__)

_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
# What a call into redis-py may raise when a server or the cluster misbehaves.
_REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)


class RedisTierError(RuntimeError):
    """The Redis tier cannot start: bad URL or options, or the server is unreachable."""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and error messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if "@" not in parts.netloc:
        return url
    userinfo, hosts = parts.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    masked = f"{user}:***@{hosts}" if ":" in userinfo else f"***@{hosts}"
    return parts._replace(netloc=masked).geturl()


@dataclass(frozen=True)
class RedisTierConfig:
    """Options of :class:`RedisTier`.

    ``url``: ``redis://[[user]:password@]host:port/db``, ``rediss://...`` (TLS, query
    options as redis-py reads them, e.g. ``?ssl_cert_reqs=none``), ``unix://[:password@]
    /path/to.sock?db=0``, or ``redis+cluster://host:port[,host:port...]`` (also
    ``rediss+cluster://``) for Redis Cluster; ``cluster=True`` (or ``?cluster=true``) makes
    a ``redis://`` URL a cluster URL. ``streams``: threads (and connections) a batch call
    uses. ``ttl_s``: expiry of written pages (None: keep until Redis evicts them).
    ``block_bytes``/``layers_per_block``: record size (layers per key). ``pipeline_bytes``:
    bytes of values per pipelined round trip.
    """

    url: str
    cluster: bool | None = None
    streams: int = 2
    ttl_s: float | None = None
    block_bytes: int = 1 << 20
    layers_per_block: int | None = None
    pipeline_bytes: int = 1 << 20
    socket_timeout_s: float = 10.0
    connect_timeout_s: float = 2.0
    socket_read_size: int = 1 << 16
    evict_corrupt: bool = True

    def __post_init__(self) -> None:
        if self.streams < 1:
            raise ValueError(f"streams must be >= 1, got {self.streams}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive or None, got {self.ttl_s}")
        if self.layers_per_block is not None and self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.block_bytes < 1 or self.pipeline_bytes < 1:
            raise ValueError("block_bytes and pipeline_bytes must be positive")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> RedisTierConfig:
        """From a JSON-like mapping (e.g. SGLang's extra config); unknown keys are ignored
        so the mapping may carry other components' options."""
        names = set(cls.__dataclass_fields__)
        if "url" not in options:
            raise ValueError('Redis tier options need "url", e.g. "redis://127.0.0.1:6379/0"')
        return cls(**{k: v for k, v in options.items() if k in names})

    def layers_per_block_for(self, layout: PageLayout) -> int:
        if self.layers_per_block is not None:
            return min(self.layers_per_block, layout.num_layers)
        return max(1, min(layout.num_layers, self.block_bytes // layout.layer_bytes))


class _Status(IntEnum):
    HIT = 0
    MISSING = 1
    CORRUPT = 2
    ERROR = 3


@dataclass
class _Op:
    """One command of a batch: which page it serves, its key, and how to finish it."""

    page: int
    key: str
    nbytes: int
    kind: str  # "get", "range", "set"
    block_start: int = 0  # first layer of the block in the page
    block_count: int = 0  # layers in the block
    first: int = 0  # first wanted layer, relative to the block
    count: int = 0  # wanted layers
    dst_offset: int = 0  # layer offset in the output tensor


class _LogLimiter:
    """At most one error line per ``interval_s``; the rest are counted in the next line."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()

    def error(self, msg: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval_s:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        if suppressed:
            msg += f" ({suppressed} similar errors suppressed)"
        logger.error(msg, *args)


def _parse_hosts(netloc_hosts: str, url: str) -> list[tuple[str, int]]:
    out = []
    for item in netloc_hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = port, "6379"
        try:
            out.append((host.strip("[]"), int(port)))
        except ValueError:
            raise RedisTierError(
                f"bad host:port {item!r} in Redis URL {redact_url(url)}"
            ) from None
    return out


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
        self._log = _LogLimiter()
        self._client = self._connect()
        self._executor = (
            ThreadPoolExecutor(config.streams * 2, thread_name_prefix="cf-redis")
            if config.streams > 1
            else None
        )
        self._closed = False

    # -- connection ----------------------------------------------------------------------
    def _connect(self) -> redis.Redis | redis.cluster.RedisCluster:
        cfg = self.config
        try:
            parts = urlsplit(cfg.url)
        except ValueError as e:
            raise RedisTierError(f"cannot parse Redis URL {self.url}: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            raise RedisTierError(
                f"Redis URL {self.url} has scheme {scheme!r}; use one of "
                f"{', '.join(s + '://' for s in _SCHEMES)}"
            )
        query = parse_qs(parts.query)
        cluster = cfg.cluster
        if cluster is None:
            flag = query.pop("cluster", ["false"])[-1].lower()
            cluster = scheme.endswith("+cluster") or flag in ("1", "true", "yes")
        common: dict[str, Any] = dict(
            socket_timeout=cfg.socket_timeout_s,
            socket_connect_timeout=cfg.connect_timeout_s,
            socket_read_size=cfg.socket_read_size,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
            # redis-py's Python packer sends large values as they are; hiredis's packer
            # copies each value into the command first (measured: 2 ms per MiB here).
            command_packer=PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode),
        )
        try:
            if cluster:
                client = self._cluster_client(parts, query, common)
            else:
                pool = redis.BlockingConnectionPool.from_url(
                    _strip_query_key(cfg.url, "cluster"),
                    max_connections=cfg.streams * 2 + 4,
                    timeout=cfg.socket_timeout_s,
                    **common,
                )
                client = redis.Redis(connection_pool=pool)
            client.ping()
        except RedisTierError:
            raise
        except (*_REDIS_ERRORS, ValueError, TypeError) as e:
            raise RedisTierError(f"cannot reach Redis at {self.url}: {e}") from None
        return client

    def _cluster_client(
        self, parts: Any, query: dict[str, list[str]], common: dict[str, Any]
    ) -> redis.cluster.RedisCluster:
        if parts.scheme.lower() == "unix":
            raise RedisTierError(f"Redis Cluster cannot be reached over a unix socket: {self.url}")
        netloc = parts.netloc
        username = password = None
        if "@" in netloc:
            userinfo, netloc = netloc.rsplit("@", 1)
            user, _, pw = userinfo.partition(":")
            username, password = unquote(user) or None, unquote(pw) or None
        if not netloc:
            raise RedisTierError(f"Redis Cluster URL {self.url} names no host")
        db = parts.path.strip("/")
        if db not in ("", "0"):
            raise RedisTierError(f"Redis Cluster has only database 0; {self.url} asks for {db}")
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in _parse_hosts(netloc, self.config.url)]
        kwargs: dict[str, Any] = dict(
            startup_nodes=nodes,
            username=username,
            password=password,
            ssl=parts.scheme.lower().startswith("rediss"),
            max_connections=self.config.streams * 2 + 4,
            **common,
        )
        if "ssl_cert_reqs" in query:
            kwargs["ssl_cert_reqs"] = query["ssl_cert_reqs"][-1]
        return redis.cluster.RedisCluster(**kwargs)

    @property
    def is_cluster(self) -> bool:
        return isinstance(self._client, redis.cluster.RedisCluster)

    @property
    def stats(self) -> TierStats:
        return self._stats

    @property
    def client(self) -> redis.Redis | redis.cluster.RedisCluster:
        """The redis-py client (for tools and tests; tier data goes through the methods)."""
        return self._client

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._client.close()

    # -- keys ----------------------------------------------------------------------------
    def block_keys(self, ns: Namespace, page_hash: str) -> list[str]:
        """Keys of every block of a page."""
        n = len(split_blocks(ns.layout.num_layers, self.config.layers_per_block_for(ns.layout)))
        return [f"{ns.prefix}:{{{page_hash}}}:{b}" for b in range(n)]

    # -- execution -----------------------------------------------------------------------
    def _run(
        self,
        ops: list[_Op],
        status: list[_Status],
        issue: Callable[[Any, _Op], None],
        finish: Callable[[_Op, Any], _Status],
    ) -> None:
        """Send ``ops`` over up to ``streams`` threads in byte-bounded pipelines; record the
        worst status of each page."""
        lock = threading.Lock()

        def mark(page: int, st: _Status) -> None:
            if st != _Status.HIT:
                with lock:
                    status[page] = max(status[page], st)

        def stream(chunk: list[_Op]) -> None:
            i = 0
            while i < len(chunk):
                group = [chunk[i]]
                size = chunk[i].nbytes
                i += 1
                while i < len(chunk) and size + chunk[i].nbytes <= self.config.pipeline_bytes:
                    size += chunk[i].nbytes
                    group.append(chunk[i])
                    i += 1
                if all(status[op.page] != _Status.HIT for op in group):
                    continue  # every page of this group already failed
                try:
                    pipe = self._client.pipeline(transaction=False)
                    for op in group:
                        issue(pipe, op)
                    replies = pipe.execute(raise_on_error=False)
                except _REDIS_ERRORS as e:
                    self._log.error(
                        "Redis tier %s: %d commands failed: %r", self.url, len(group), e
                    )
                    self._stats.add(errors=1)
                    for op in group:
                        mark(op.page, _Status.ERROR)
                    continue
                replies = _group_replies(group, replies)
                for op, reply in zip(group, replies, strict=True):
                    if any(isinstance(r, Exception) for r in reply):
                        exc = next(r for r in reply if isinstance(r, Exception))
                        self._log.error("Redis tier %s: %s on %s", self.url, exc, op.key)
                        self._stats.add(errors=1)
                        mark(op.page, _Status.ERROR)
                        continue
                    mark(op.page, finish(op, reply))

        streams = self.config.streams if self._executor is not None else 1
        if streams == 1 or len(ops) <= 1:
            stream(ops)
            return
        # Contiguous chunks of pages per stream, balanced by bytes.
        total = sum(op.nbytes for op in ops) or len(ops)
        chunks: list[list[_Op]] = [[] for _ in range(streams)]
        acc = 0
        for op in ops:
            idx = min(streams - 1, acc * streams // total)
            chunks[idx].append(op)
            acc += op.nbytes or 1
        futures = [self._executor.submit(stream, c) for c in chunks if c]  # type: ignore[union-attr]
        for f in futures:
            f.result()

    # -- KVTier --------------------------------------------------------------------------
    def batch_put(
        self, ns: Namespace, page_hashes: Sequence[str], pages: Sequence[torch.Tensor]
    ) -> list[bool]:
        check_batch(ns, page_hashes, pages, None)
        layout = ns.layout
        blocks = split_blocks(layout.num_layers, self.config.layers_per_block_for(layout))
        ops = [
            _Op(i, f"{ns.prefix}:{{{h}}}:{b}", count * layout.layer_bytes, "set", start, count)
            for i, h in enumerate(page_hashes)
            for b, (start, count) in enumerate(blocks)
        ]
        px = int(self.config.ttl_s * 1000) if self.config.ttl_s is not None else None

        def issue(pipe: Any, op: _Op) -> None:
            record = encode_block(op.key, layout, pages[op.page], op.block_start, op.block_count)
            pipe.set(op.key, memoryview(record), px=px)

        def finish(op: _Op, reply: list[Any]) -> _Status:
            return _Status.HIT if reply[0] else _Status.ERROR

        status = [_Status.HIT] * len(page_hashes)
        self._run(ops, status, issue, finish)
        ok = [s == _Status.HIT for s in status]
        n_ok = sum(ok)
        self._stats.add(
            puts=n_ok, put_failures=len(ok) - n_ok, put_bytes=n_ok * layout.page_bytes
        )
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
        blocks = split_blocks(layout.num_layers, self.config.layers_per_block_for(layout))
        wanted = blocks_for_range(blocks, l0, l1)
        ops = []
        for i, h in enumerate(page_hashes):
            for b, first, count in wanted:
                start, bcount = blocks[b]
                kind = "get" if count == bcount else "range"
                ops.append(
                    _Op(i, f"{ns.prefix}:{{{h}}}:{b}", count * lb, kind, start, bcount,
                        first, count, start + first - l0)
                )  # fmt: skip

        def issue(pipe: Any, op: _Op) -> None:
            if op.kind == "get":
                pipe.get(op.key)
            else:
                hlen = BlockHeader.size_for(op.block_count)
                pipe.getrange(op.key, 0, hlen - 1)
                lo = hlen + op.first * lb
                pipe.getrange(op.key, lo, lo + op.count * lb - 1)

        corrupt_keys: list[str] = []

        def finish(op: _Op, reply: list[Any]) -> _Status:
            data = reply[0]
            if data is None or len(data) == 0:
                return _Status.MISSING
            try:
                header = verify_header(data, op.key, layout, op.block_start, op.block_count)
                hlen = BlockHeader.size_for(op.block_count)
                if op.kind == "get":
                    payload = memoryview(data)[hlen:]
                    src, offset = data, hlen
                else:
                    payload = reply[1]
                    src, offset = reply[1], 0
                verify_layers(header, payload, op.first, op.count)
            except CorruptRecordError as e:
                logger.warning("Redis tier %s: corrupt record %s: %s", self.url, op.key, e)
                corrupt_keys.append(op.key)
                return _Status.CORRUPT
            out = outs[op.page]
            copy_bytes_into(out[op.dst_offset : op.dst_offset + op.count], src, offset)
            return _Status.HIT

        status = [_Status.HIT] * len(page_hashes)
        self._run(ops, status, issue, finish)
        if corrupt_keys and self.config.evict_corrupt:
            self._delete_keys(corrupt_keys)
        ok = [s == _Status.HIT for s in status]
        hits = sum(ok)
        self._stats.add(
            gets=len(ok),
            hits=hits,
            misses=len(ok) - hits,
            corrupt=sum(s == _Status.CORRUPT for s in status),
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
        except _REDIS_ERRORS as e:
            self._log.error("Redis tier %s: exists failed: %r", self.url, e)
            self._stats.add(errors=1)
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
        except _REDIS_ERRORS as e:
            self._log.error("Redis tier %s: delete failed: %r", self.url, e)
            self._stats.add(errors=1)
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
        except _REDIS_ERRORS as e:
            self._log.error("Redis tier %s: clear failed: %r", self.url, e)
            self._stats.add(errors=1)
        return removed

    def _delete_keys(self, keys: Sequence[str | bytes]) -> int:
        if not keys:
            return 0
        try:
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.unlink(k)
            return sum(pipe.execute())
        except _REDIS_ERRORS as e:
            self._log.error("Redis tier %s: unlink failed: %r", self.url, e)
            return 0


def _group_replies(group: list[_Op], replies: list[Any]) -> list[list[Any]]:
    """Regroup flat pipeline replies per op (a ranged read sends two commands)."""
    out, i = [], 0
    for op in group:
        n = 2 if op.kind == "range" else 1
        out.append(replies[i : i + n])
        i += n
    return out


def _strip_query_key(url: str, key: str) -> str:
    parts = urlsplit(url)
    if not parts.query:
        return url
    kept = "&".join(p for p in parts.query.split("&") if not p.startswith(key + "="))
    return parts._replace(query=kept).geturl()
