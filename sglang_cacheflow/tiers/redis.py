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

Batch calls split their commands over ``streams`` threads (per master on a cluster), each
with its own pooled connection, and send them in groups of about ``pipeline_bytes``; deep
pipelines of large values are slower than short ones (the server buffers every reply before
the client drains them). By default the tier packs its commands and reads the replies itself
(:mod:`~sglang_cacheflow.tiers.resp`), receiving each value straight into the destination
tensor; redis-py pipelines are the fallback (``direct_io=False``, RESP3). Every failure of
a page (missing block, bad record, server error or disconnect) is a miss for that page,
counted in :attr:`RedisTier.stats` and logged; no exception from Redis reaches the caller
after construction.
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
from redis.connection import (
    Connection,
    ConnectionPool,
    PythonRespSerializer,
    SSLConnection,
    UnixDomainSocketConnection,
)
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
    writable_bytes,
)
from sglang_cacheflow.tiers.resp import ReplyReader, RespReplyError, pack_command, send_pieces

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
    bytes of values per pipelined round trip. ``direct_io``: send the tier's GET, GETRANGE
    and SET commands on redis-py's pooled connections and read the replies with
    :mod:`~sglang_cacheflow.tiers.resp`, values straight into the destination tensors (one
    copy); False uses redis-py pipelines (and their reply copies) for everything.
    ``pipeline_depth``: groups of ``pipeline_bytes`` in flight per connection on the direct
    path (sent before the replies of the previous ones are read). ``client_name``: set on
    every connection (``CLIENT SETNAME``), so that ``CLIENT LIST`` tells whose it is.
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
    direct_io: bool = True
    pipeline_depth: int = 1
    client_name: str | None = None

    def __post_init__(self) -> None:
        if self.streams < 1:
            raise ValueError(f"streams must be >= 1, got {self.streams}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive or None, got {self.ttl_s}")
        if self.layers_per_block is not None and self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.pipeline_depth < 1:
            raise ValueError(f"pipeline_depth must be >= 1, got {self.pipeline_depth}")
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


class _Scratch:
    """Per-stream buffers of a direct batch: a record header, a staging area for strided
    destinations, and the shared list of ops a cluster redirected."""

    def __init__(self, redirected: list[_Op], lock: threading.Lock) -> None:
        self.redirected = redirected
        self.lock = lock
        self._header = bytearray()
        self._stage = bytearray()

    def header(self, nbytes: int) -> memoryview:
        if len(self._header) < nbytes:
            self._header = bytearray(nbytes)
        return memoryview(self._header)[:nbytes]

    def stage(self, nbytes: int) -> memoryview:
        if len(self._stage) < nbytes:
            self._stage = bytearray(nbytes)
        return memoryview(self._stage)[:nbytes]


# redis-py connection classes whose ``_sock`` is a plain, TLS or unix stream socket that
# carries RESP2 with nothing else on it (no client-side cache, no RESP3 push messages).
_DIRECT_CLASSES = (Connection, SSLConnection, UnixDomainSocketConnection)


def _direct_capable(pool: ConnectionPool) -> bool:
    kwargs = pool.connection_kwargs
    return (
        pool.connection_class in _DIRECT_CLASSES
        and str(kwargs.get("protocol") or 2) == "2"
        and getattr(pool, "cache", None) is None
        and not kwargs.get("cache")
    )


def _socket_of(conn: Connection) -> Any:
    """The connected socket of a redis-py connection (TCP, TLS or unix)."""
    sock = getattr(conn, "_sock", None)
    if sock is None:
        raise redis.ConnectionError("connection has no socket")
    return sock


def _discard(pool: ConnectionPool, conn: Connection) -> None:
    """Close a connection whose reply stream can no longer be trusted, and hand the closed
    connection object back so the pool does not lose the slot (it reconnects on next use;
    the old socket is never read again)."""
    try:
        conn.disconnect()
    finally:
        pool.release(conn)


def _parse_hosts(netloc_hosts: str, url: str) -> list[tuple[str, int]]:
    out = []
    for item in netloc_hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = port, "6379"
        try:
            out.append((host.strip("[]"), int(port)))
        except ValueError:
            raise RedisTierError(f"bad host:port {item!r} in Redis URL {redact_url(url)}") from None
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
        cluster = isinstance(self._client, redis.cluster.RedisCluster)
        workers = config.streams * 2
        if cluster:
            # A cluster batch runs ``streams`` connections to each master at once.
            workers = config.streams * max(2, len(self._client.get_primaries()))
        self._executor = (
            ThreadPoolExecutor(workers, thread_name_prefix="cf-redis")
            if config.streams > 1 or cluster
            else None
        )
        self._direct = config.direct_io and _direct_capable(self._any_pool())
        self._closed = False

    def _any_pool(self) -> ConnectionPool:
        if isinstance(self._client, redis.cluster.RedisCluster):
            node = self._client.get_default_node()
            return node.redis_connection.connection_pool  # type: ignore[union-attr]
        return self._client.connection_pool

    @property
    def direct_io(self) -> bool:
        """Whether reads and writes use the one-copy path (see :class:`RedisTierConfig`)."""
        return self._direct

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
            # RESP2 (redis-py 8 defaults to RESP3): the direct path reads RESP2 replies, and
            # a RESP2 connection carries no push messages. ``?protocol=3`` in the URL wins
            # (and turns the direct path off).
            protocol=2,
            # redis-py's Python packer sends large values as they are; hiredis's packer
            # copies each value into the command first (measured: 2 ms per MiB here).
            command_packer=PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode),
        )
        if cfg.client_name:
            common["client_name"] = cfg.client_name
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
            # Per master; opened on demand. Batches use up to the executor's workers.
            max_connections=max(64, self.config.streams * 16),
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
    #
    # A batch is a list of _Op (one Redis value each). It runs over up to ``streams``
    # connections (per master on a cluster), each sending byte-bounded groups of commands
    # and reading their replies before the next group. Two ways to run it:
    #
    # - direct (``_run_direct``, the default): the tier packs its own commands, sends them on
    #   a connection taken from redis-py's pool (connected, authenticated, database
    #   selected) and reads the replies with ``resp.ReplyReader``: values go straight into
    #   the destination tensors. On a cluster the ops are grouped by master (slot map of
    #   redis-py's cluster client) and every master is served at once.
    # - pipelines (``_run``): redis-py pipelines (``ClusterPipeline`` on a cluster), which
    #   follow MOVED/ASK redirections. Used when ``direct_io`` is off or does not apply, and
    #   for the ops of a direct batch that a cluster redirected.

    def _split(self, ops: list[_Op], streams: int) -> list[list[_Op]]:
        """Contiguous chunks of ``ops`` (so of pages), balanced by bytes."""
        if streams <= 1 or len(ops) <= 1:
            return [ops] if ops else []
        total = sum(op.nbytes or 1 for op in ops)
        chunks: list[list[_Op]] = [[] for _ in range(streams)]
        acc = 0
        for op in ops:
            chunks[min(streams - 1, acc * streams // total)].append(op)
            acc += op.nbytes or 1
        return [c for c in chunks if c]

    def _groups(self, chunk: list[_Op]) -> list[list[_Op]]:
        """Consecutive ops of about ``pipeline_bytes`` of values each (at least one op)."""
        groups: list[list[_Op]] = []
        size = 0
        for op in chunk:
            if groups and size + op.nbytes <= self.config.pipeline_bytes:
                groups[-1].append(op)
                size += op.nbytes
            else:
                groups.append([op])
                size = op.nbytes
        return groups

    def _parallel(self, tasks: list[Callable[[], None]]) -> None:
        if len(tasks) == 1 or self._executor is None:
            for task in tasks:
                task()
            return
        for f in [self._executor.submit(task) for task in tasks]:
            f.result()

    def _run(
        self,
        ops: list[_Op],
        status: list[_Status],
        issue: Callable[[Any, _Op], None],
        finish: Callable[[_Op, Any], _Status],
    ) -> None:
        """Run ``ops`` on redis-py pipelines; record the worst status of each page."""
        lock = threading.Lock()

        def mark(page: int, st: _Status) -> None:
            if st != _Status.HIT:
                with lock:
                    status[page] = max(status[page], st)

        def stream(chunk: list[_Op]) -> None:
            for group in self._groups(chunk):
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
        self._parallel([lambda c=c: stream(c) for c in self._split(ops, streams)])

    def _run_direct(
        self,
        ops: list[_Op],
        status: list[_Status],
        pack: Callable[[_Op], list[bytes | memoryview]],
        read: Callable[[ReplyReader, _Op, _Scratch], _Status],
    ) -> list[_Op]:
        """Run ``ops`` on pooled connections with the tier's own RESP reader; record the
        worst status of each page. ``read`` consumes every reply of its op (also after an
        error reply) and raises only when the connection is broken. Returns the ops a
        cluster answered with a redirection (MOVED/ASK), which are not marked."""
        lock = threading.Lock()
        redirected: list[_Op] = []

        def mark(page: int, st: _Status) -> None:
            if st != _Status.HIT:
                with lock:
                    status[page] = max(status[page], st)

        def stream(pool: ConnectionPool, chunk: list[_Op]) -> None:
            groups = self._groups(chunk)
            depth = self.config.pipeline_depth
            scratch = _Scratch(redirected, lock)
            conn: Connection | None = None
            reader: ReplyReader | None = None
            retried = False
            # Groups [r, w) are sent and not read yet; up to ``depth`` of them, so the
            # server prepares the next replies while this thread receives the current ones.
            # ``sent[g]`` is False for a group skipped because all its pages had failed.
            r = w = 0
            sent = [False] * len(groups)
            try:
                while r < len(groups):
                    try:
                        if conn is None:
                            conn = pool.get_connection()
                            reader = ReplyReader(_socket_of(conn))
                            w = r  # (re)send from the first group not read
                        assert reader is not None
                        while w < len(groups) and w - r < depth:
                            group = groups[w]
                            sent[w] = any(status[op.page] == _Status.HIT for op in group)
                            if sent[w]:
                                pieces = [piece for op in group for piece in pack(op)]
                                send_pieces(_socket_of(conn), pieces)
                            w += 1
                        if sent[r]:
                            for op in groups[r]:
                                mark(op.page, read(reader, op, scratch))
                        r += 1
                    except _REDIS_ERRORS as e:
                        # The stream is out of step or gone: close the socket (the pool
                        # opens a new one on next use) and never read from it again.
                        if conn is not None:
                            _discard(pool, conn)
                            conn = None
                        if not retried and not isinstance(e, (TimeoutError, redis.TimeoutError)):
                            retried = True  # once, on a fresh connection (server restart)
                            continue
                        self._log.error(
                            "Redis tier %s: %d commands failed: %r",
                            self.url, sum(len(g) for g in groups[r:]), e,
                        )  # fmt: skip
                        self._stats.add(errors=1)
                        for g in groups[r:]:
                            for op in g:
                                mark(op.page, _Status.ERROR)
                        return
            except BaseException:
                if conn is not None:
                    _discard(pool, conn)
                    conn = None
                raise
            finally:
                if conn is not None:
                    if reader is not None and reader.buffered:
                        _discard(pool, conn)  # bytes nobody asked for: do not reuse
                    else:
                        pool.release(conn)

        tasks: list[Callable[[], None]] = []
        for pool, pool_ops in self._by_pool(ops, status, mark).items():
            for chunk in self._split(pool_ops, self.config.streams):
                tasks.append(lambda pool=pool, chunk=chunk: stream(pool, chunk))
        self._parallel(tasks)
        return redirected

    def _by_pool(
        self, ops: list[_Op], status: list[_Status], mark: Callable[[int, _Status], None]
    ) -> dict[ConnectionPool, list[_Op]]:
        """Ops by the connection pool of the server that holds their key."""
        client = self._client
        if not isinstance(client, redis.cluster.RedisCluster):
            return {client.connection_pool: ops} if ops else {}
        out: dict[ConnectionPool, list[_Op]] = {}
        pools: dict[str, ConnectionPool | None] = {}  # by hash tag: all blocks of a page
        for op in ops:
            tag = op.key[op.key.index("{") : op.key.index("}") + 1]
            if tag not in pools:
                try:
                    node = client.nodes_manager.get_node_from_slot(client.keyslot(tag))
                    pools[tag] = node.redis_connection.connection_pool  # type: ignore[union-attr]
                except _REDIS_ERRORS as e:  # slot not covered: cluster down or resharding
                    self._log.error("Redis tier %s: no node for %s: %r", self.url, op.key, e)
                    self._stats.add(errors=1)
                    pools[tag] = None
            pool = pools[tag]
            if pool is None:
                mark(op.page, _Status.ERROR)
            else:
                out.setdefault(pool, []).append(op)
        return out

    def _execute(
        self,
        ops: list[_Op],
        status: list[_Status],
        issue: Callable[[Any, _Op], None],
        finish: Callable[[_Op, Any], _Status],
        pack: Callable[[_Op], list[bytes | memoryview]],
        read: Callable[[ReplyReader, _Op, _Scratch], _Status],
    ) -> None:
        if not self._direct:
            self._run(ops, status, issue, finish)
            return
        redirected = self._run_direct(ops, status, pack, read)
        if redirected and isinstance(self._client, redis.cluster.RedisCluster):
            # Slots moved: refresh the slot map for the next batch and let redis-py's
            # cluster pipeline (which follows MOVED/ASK) run these ops now.
            try:
                self._client.nodes_manager.initialize()
            except _REDIS_ERRORS as e:
                self._log.error("Redis tier %s: slot map refresh failed: %r", self.url, e)
            self._run(redirected, status, issue, finish)

    def _reply_error(self, e: RespReplyError, op: _Op, scratch: _Scratch) -> _Status:
        """Status of an op the server answered with an error reply."""
        if str(e).startswith(("MOVED ", "ASK ")):
            with scratch.lock:
                scratch.redirected.append(op)
            return _Status.HIT  # not a result: the op runs again through the pipeline path
        self._log.error("Redis tier %s: %s on %s", self.url, e, op.key)
        self._stats.add(errors=1)
        return _Status.ERROR

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

        def record(op: _Op) -> bytearray:
            return encode_block(op.key, layout, pages[op.page], op.block_start, op.block_count)

        def issue(pipe: Any, op: _Op) -> None:
            pipe.set(op.key, memoryview(record(op)), px=px)

        def finish(op: _Op, reply: list[Any]) -> _Status:
            return _Status.HIT if reply[0] else _Status.ERROR

        def pack(op: _Op) -> list[bytes | memoryview]:
            value = memoryview(record(op))
            if px is None:
                return pack_command(b"SET", op.key, value)
            return pack_command(b"SET", op.key, value, b"PX", px)

        def read(reader: ReplyReader, op: _Op, scratch: _Scratch) -> _Status:
            try:
                return _Status.HIT if reader.read_status() == b"OK" else _Status.ERROR
            except RespReplyError as e:  # e.g. OOM when maxmemory is reached
                return self._reply_error(e, op, scratch)

        status = [_Status.HIT] * len(page_hashes)
        self._execute(ops, status, issue, finish, pack, read)
        ok = [s == _Status.HIT for s in status]
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
        corrupt_keys: list[str] = []

        def corrupt(op: _Op, reason: object) -> _Status:
            logger.warning("Redis tier %s: corrupt record %s: %s", self.url, op.key, reason)
            corrupt_keys.append(op.key)
            return _Status.CORRUPT

        # redis-py pipelines: the reply values arrive as bytes and are copied into outs.
        def issue(pipe: Any, op: _Op) -> None:
            if op.kind == "get":
                pipe.get(op.key)
            else:
                hlen = BlockHeader.size_for(op.block_count)
                pipe.getrange(op.key, 0, hlen - 1)
                lo = hlen + op.first * lb
                pipe.getrange(op.key, lo, lo + op.count * lb - 1)

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
                return corrupt(op, e)
            out = outs[op.page]
            copy_bytes_into(out[op.dst_offset : op.dst_offset + op.count], src, offset)
            return _Status.HIT

        # Direct: the header goes to a scratch buffer, the layers straight into outs (or,
        # for a strided destination, into a scratch buffer and then into outs). The bytes
        # count only once the header and every layer checksum verify.
        def pack(op: _Op) -> list[bytes | memoryview]:
            if op.kind == "get":
                return pack_command(b"GET", op.key)
            hlen = BlockHeader.size_for(op.block_count)
            lo = hlen + op.first * lb
            return [
                *pack_command(b"GETRANGE", op.key, 0, hlen - 1),
                *pack_command(b"GETRANGE", op.key, lo, lo + op.count * lb - 1),
            ]

        def read(reader: ReplyReader, op: _Op, scratch: _Scratch) -> _Status:
            hlen = BlockHeader.size_for(op.block_count)
            head = scratch.header(hlen)
            out = outs[op.page][op.dst_offset : op.dst_offset + op.count]
            dst = writable_bytes(out)
            staged = dst is None
            if dst is None:
                dst = scratch.stage(op.count * lb)
            if op.kind == "get":
                try:
                    n = reader.read_bulk_into((head, dst))
                except RespReplyError as e:
                    return self._reply_error(e, op, scratch)
                if n <= 0:
                    return _Status.MISSING
                if n != hlen + dst.nbytes:
                    return corrupt(op, f"value is {n} bytes, a record of its block has "
                                       f"{hlen + dst.nbytes}")  # fmt: skip
            else:
                replies: list[int | RespReplyError] = []
                for parts in ((head,), (dst,)):  # read both replies whatever the first is
                    try:
                        replies.append(reader.read_bulk_into(parts))
                    except RespReplyError as e:
                        replies.append(e)
                n_head, n_data = replies
                if isinstance(n_head, RespReplyError):
                    return self._reply_error(n_head, op, scratch)
                if isinstance(n_data, RespReplyError):
                    return self._reply_error(n_data, op, scratch)
                if n_head <= 0:
                    return _Status.MISSING
                if n_head != hlen:
                    return corrupt(op, f"record is truncated: {n_head} bytes, header needs {hlen}")
                if n_data != dst.nbytes:
                    return corrupt(op, f"payload is {max(n_data, 0)} bytes, expected {dst.nbytes}")
            try:
                header = verify_header(head, op.key, layout, op.block_start, op.block_count)
                verify_layers(header, dst, op.first, op.count)
            except CorruptRecordError as e:
                return corrupt(op, e)
            if staged:
                copy_bytes_into(out, dst, 0)
            return _Status.HIT

        status = [_Status.HIT] * len(page_hashes)
        self._execute(ops, status, issue, finish, pack, read)
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
