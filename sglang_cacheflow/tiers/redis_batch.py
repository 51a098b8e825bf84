"""The Redis tier's batch engine: the ops of a batch call (:class:`Op`, one Redis value
each) split over ``streams`` connections (per master on a cluster) and sent in groups of
about ``pipeline_bytes``, on redis-py pipelines or on the direct path (the tier's own RESP
commands and reply reader, :mod:`~sglang_cacheflow.tiers.resp`), each page ending with the
worst :class:`Status` of its ops. What each op sends and does with its replies is a
:class:`Commands` (:mod:`~sglang_cacheflow.tiers.redis_commands`). How and why:
docs/tiers.md, "Direct path".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from functools import partial
from typing import Any, Protocol

import redis
from redis.connection import (
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

from sglang_cacheflow.tiers.base import TierStats
from sglang_cacheflow.tiers.redis_config import RedisTierConfig
from sglang_cacheflow.tiers.redis_connect import (
    REDIS_ERRORS,
    Client,
    default_pool,
    is_cluster,
    slot_pool,
)
from sglang_cacheflow.tiers.resp import ReplyReader, RespReplyError, send_pieces

__all__ = ["BatchEngine", "Commands", "ErrorLog", "Op", "Scratch", "Status"]


class Status(IntEnum):
    """Outcome of an op; a page's is the worst of its ops'."""

    HIT = 0
    MISSING = 1
    CORRUPT = 2
    ERROR = 3


@dataclass
class Op:
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


class ErrorLog:
    """The tier's error lines, at most one per ``interval_s`` (the rest are counted in the
    next line), each a failure counted in ``stats.errors`` unless ``counted=False``."""

    def __init__(self, logger: logging.Logger, stats: TierStats, interval_s: float = 1.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._stats = stats
        self._last = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()

    def error(self, msg: str, *args: object, counted: bool = True) -> None:
        if counted:
            self._stats.add(errors=1)
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval_s:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        if suppressed:
            msg += f" ({suppressed} similar errors suppressed)"
        self.logger.error(msg, *args)


class Scratch:
    """Per-stream buffers of a direct batch: a record header, and a staging area for
    strided destinations."""

    def __init__(self) -> None:
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


class Commands(Protocol):
    """The commands of one batch call's ops, on either path."""

    def issue(self, pipe: Any, op: Op) -> None:
        """Queue the op's commands on a redis-py pipeline."""

    def finish(self, op: Op, reply: list[Any]) -> Status:
        """Status from the op's pipeline replies (one per command, none an error)."""

    def pack(self, op: Op) -> list[bytes | memoryview]:
        """The op's commands as RESP pieces (direct path)."""

    def read(self, reader: ReplyReader, op: Op, scratch: Scratch) -> Status:
        """Consume every reply of the op, then raise :class:`RespReplyError` for the first
        error reply among them, if any; any other exception means the stream is broken."""


class _Outcome:
    """The worst status of each page of a batch, shared by its streams, and the ops a
    cluster redirected (MOVED/ASK) on the direct path, which are not marked."""

    def __init__(self, pages: int) -> None:
        self.status = [Status.HIT] * pages
        self.redirected: list[Op] = []
        self.lost_server = False  # a stream's server went away (down, failing over)
        self._lock = threading.Lock()

    def mark(self, page: int, st: Status) -> None:
        if st != Status.HIT:
            with self._lock:
                self.status[page] = max(self.status[page], st)

    def pending(self, group: list[Op]) -> bool:
        """Whether some page of ``group`` has not failed yet (else it is not sent)."""
        return any(self.status[op.page] == Status.HIT for op in group)

    def redirect(self, op: Op) -> None:
        with self._lock:
            self.redirected.append(op)


# redis-py connection classes whose ``_sock`` is a plain, TLS or unix stream socket that
# carries RESP2 with nothing else on it (no client-side cache, no RESP3 push messages).
_DIRECT_CLASSES = (
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    SentinelManagedConnection,  # the master's connection, found through the sentinels
    SentinelManagedSSLConnection,
)


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


def _group_replies(group: list[Op], replies: list[Any]) -> list[list[Any]]:
    """Regroup flat pipeline replies per op (a ranged read sends two commands)."""
    out, i = [], 0
    for op in group:
        n = 2 if op.kind == "range" else 1
        out.append(replies[i : i + n])
        i += n
    return out


class BatchEngine:
    """Runs batches of ops for one tier's client. Two paths:

    - direct (:meth:`_run_direct`, the default): ops grouped by the pool of the server that
      holds their key (redis-py's slot map on a cluster, every master served at once); each
      stream takes a connection from that pool (connected, authenticated, database
      selected), sends the packed commands itself and reads the replies with
      :class:`~sglang_cacheflow.tiers.resp.ReplyReader`, values straight into the
      destination tensors.
    - pipelines (:meth:`_run_pipelined`): redis-py pipelines (``ClusterPipeline`` on a
      cluster), which follow MOVED/ASK. Used when ``direct_io`` is off or does not apply,
      and for the ops of a direct batch that a cluster redirected.
    """

    def __init__(self, client: Client, config: RedisTierConfig, log: ErrorLog, url: str) -> None:
        self._client = client
        self._config = config
        self._log = log
        self._url = url
        workers = config.streams * 2
        if is_cluster(client):
            # A cluster batch runs ``streams`` connections to each master at once.
            workers = config.streams * max(2, len(client.get_primaries()))
        self._executor = (
            ThreadPoolExecutor(workers, thread_name_prefix="cf-redis")
            if config.streams > 1 or is_cluster(client)
            else None
        )
        self.direct = config.direct_io and _direct_capable(default_pool(client))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def execute(self, ops: list[Op], pages: int, commands: Commands) -> list[Status]:
        """Run ``ops`` (of pages ``0..pages-1``); the worst status of each page."""
        outcome = _Outcome(pages)
        if not self.direct:
            self._run_pipelined(ops, outcome, commands)
            return outcome.status
        self._run_direct(ops, outcome, commands)
        if is_cluster(self._client) and (outcome.redirected or outcome.lost_server):
            # Slots moved, or a master went away (a replica takes its slots over): refresh
            # the slot map for the next batch. Redirected ops run now through redis-py's
            # cluster pipeline (which follows MOVED/ASK); a lost server's pages stay misses.
            try:
                self._client.nodes_manager.initialize()
            except REDIS_ERRORS as e:
                self._log.error(
                    "Redis tier %s: slot map refresh failed: %r", self._url, e, counted=False
                )
            if outcome.redirected:
                self._run_pipelined(outcome.redirected, outcome, commands)
        return outcome.status

    # -- splitting -----------------------------------------------------------------------
    def _split(self, ops: list[Op], streams: int) -> list[list[Op]]:
        """Contiguous chunks of ``ops`` (so of pages), balanced by bytes."""
        if streams <= 1 or len(ops) <= 1:
            return [ops] if ops else []
        total = sum(op.nbytes or 1 for op in ops)
        chunks: list[list[Op]] = [[] for _ in range(streams)]
        acc = 0
        for op in ops:
            chunks[min(streams - 1, acc * streams // total)].append(op)
            acc += op.nbytes or 1
        return [c for c in chunks if c]

    def _groups(self, chunk: list[Op]) -> list[list[Op]]:
        """Consecutive ops of about ``pipeline_bytes`` of values each (at least one op)."""
        groups: list[list[Op]] = []
        size = 0
        for op in chunk:
            if groups and size + op.nbytes <= self._config.pipeline_bytes:
                groups[-1].append(op)
                size += op.nbytes
            else:
                groups.append([op])
                size = op.nbytes
        return groups

    def _by_pool(self, ops: list[Op], outcome: _Outcome) -> dict[ConnectionPool, list[Op]]:
        """Ops by the connection pool of the server that holds their key."""
        client = self._client
        if not is_cluster(client):
            return {client.connection_pool: ops} if ops else {}
        out: dict[ConnectionPool, list[Op]] = {}
        pools: dict[str, ConnectionPool | None] = {}  # by hash tag: all blocks of a page
        for op in ops:
            tag = op.key[op.key.index("{") : op.key.index("}") + 1]
            if tag not in pools:
                try:
                    pools[tag] = slot_pool(client, tag)
                except REDIS_ERRORS as e:  # slot not covered: cluster down or resharding
                    self._log.error("Redis tier %s: no node for %s: %r", self._url, op.key, e)
                    pools[tag] = None
            pool = pools[tag]
            if pool is None:
                outcome.mark(op.page, Status.ERROR)
            else:
                out.setdefault(pool, []).append(op)
        return out

    def _parallel(self, tasks: list[Callable[[], None]]) -> None:
        if len(tasks) == 1 or self._executor is None:
            for task in tasks:
                task()
            return
        for f in [self._executor.submit(task) for task in tasks]:
            f.result()

    # -- redis-py pipelines --------------------------------------------------------------
    def _run_pipelined(self, ops: list[Op], outcome: _Outcome, commands: Commands) -> None:
        streams = self._config.streams if self._executor is not None else 1
        self._parallel(
            [
                partial(self._stream_pipelined, c, outcome, commands)
                for c in self._split(ops, streams)
            ]
        )

    def _stream_pipelined(self, chunk: list[Op], outcome: _Outcome, commands: Commands) -> None:
        for group in self._groups(chunk):
            if not outcome.pending(group):
                continue
            try:
                pipe = self._client.pipeline(transaction=False)
                for op in group:
                    commands.issue(pipe, op)
                replies = pipe.execute(raise_on_error=False)
            except REDIS_ERRORS as e:
                self._log.error("Redis tier %s: %d commands failed: %r", self._url, len(group), e)
                for op in group:
                    outcome.mark(op.page, Status.ERROR)
                continue
            for op, reply in zip(group, _group_replies(group, replies), strict=True):
                exc = next((r for r in reply if isinstance(r, Exception)), None)
                if exc is not None:
                    self._log.error("Redis tier %s: %s on %s", self._url, exc, op.key)
                    outcome.mark(op.page, Status.ERROR)
                else:
                    outcome.mark(op.page, commands.finish(op, reply))

    # -- direct path ---------------------------------------------------------------------
    def _run_direct(self, ops: list[Op], outcome: _Outcome, commands: Commands) -> None:
        self._parallel(
            [
                partial(self._stream_direct, pool, chunk, outcome, commands)
                for pool, pool_ops in self._by_pool(ops, outcome).items()
                for chunk in self._split(pool_ops, self._config.streams)
            ]
        )

    def _stream_direct(
        self, pool: ConnectionPool, chunk: list[Op], outcome: _Outcome, commands: Commands
    ) -> None:
        """Send ``chunk`` on one connection of ``pool``, ``pipeline_depth`` groups ahead of
        the replies read; after a broken stream, retry once on a fresh connection."""
        groups = self._groups(chunk)
        depth = self._config.pipeline_depth
        scratch = Scratch()
        conn: Connection | None = None
        reader: ReplyReader | None = None
        retried = False
        # Groups [r, w) are sent and not read yet; up to ``depth`` of them, so the server
        # prepares the next replies while this thread receives the current ones. ``sent[g]``
        # is False for a group skipped because all its pages had failed.
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
                        sent[w] = outcome.pending(groups[w])
                        if sent[w]:
                            pieces = [piece for op in groups[w] for piece in commands.pack(op)]
                            send_pieces(_socket_of(conn), pieces)
                        w += 1
                    if sent[r]:
                        for op in groups[r]:
                            st = self._read(reader, op, scratch, outcome, commands)
                            outcome.mark(op.page, st)
                    r += 1
                except REDIS_ERRORS as e:
                    # The stream is out of step or gone: close the socket (the pool opens a
                    # new one on next use) and never read from it again.
                    if conn is not None:
                        _discard(pool, conn)
                        conn = None
                    if not retried and not isinstance(e, (TimeoutError, redis.TimeoutError)):
                        retried = True  # once, on a fresh connection (server restart)
                        continue
                    outcome.lost_server = True
                    self._log.error(
                        "Redis tier %s: %d commands failed: %r",
                        self._url, sum(len(g) for g in groups[r:]), e,
                    )  # fmt: skip
                    for g in groups[r:]:
                        for op in g:
                            outcome.mark(op.page, Status.ERROR)
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

    def _read(
        self, reader: ReplyReader, op: Op, scratch: Scratch, outcome: _Outcome, commands: Commands
    ) -> Status:
        """Status of ``op`` from its replies on the direct path."""
        try:
            return commands.read(reader, op, scratch)
        except RespReplyError as e:
            if str(e).startswith(("MOVED ", "ASK ")):
                outcome.redirect(op)
                return Status.HIT  # not a result: the op runs again through the pipelines
            self._log.error("Redis tier %s: %s on %s", self._url, e, op.key)
            return Status.ERROR
