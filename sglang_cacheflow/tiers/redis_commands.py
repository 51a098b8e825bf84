"""The commands of the Redis tier's puts and gets, on either path of the batch engine
(:mod:`~sglang_cacheflow.tiers.redis_batch`): ``SET`` of each block record, and ``GET`` or
``GETRANGE`` of the blocks a layer range needs, verified (:mod:`~sglang_cacheflow.tiers.page`)
before a byte counts. What is a miss and what is corrupt: docs/tiers.md, "Integrity".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sglang_cacheflow.tiers.page import (
    BlockHeader,
    CorruptRecordError,
    PageLayout,
    copy_bytes_into,
    encode_block,
    verify_header,
    verify_layers,
    writable_bytes,
)
from sglang_cacheflow.tiers.redis_batch import ErrorLog, Op, Scratch, Status
from sglang_cacheflow.tiers.resp import ReplyReader, RespReplyError, pack_command

__all__ = ["GetCommands", "PutCommands"]


class PutCommands:
    """``SET`` of each block record, encoded from its page as the command is built."""

    def __init__(
        self,
        layout: PageLayout,
        pages: Sequence[torch.Tensor],
        ttl_s: float | None,
        mac_key: bytes | None = None,
    ) -> None:
        self._mac_key = mac_key
        self._layout = layout
        self._pages = pages
        self._px = int(ttl_s * 1000) if ttl_s is not None else None

    def _record(self, op: Op) -> memoryview:
        page = self._pages[op.page]
        record = encode_block(
            op.key, self._layout, page, op.block_start, op.block_count, self._mac_key
        )
        return memoryview(record)

    def issue(self, pipe: Any, op: Op) -> None:
        pipe.set(op.key, self._record(op), px=self._px)

    def finish(self, op: Op, reply: list[Any]) -> Status:
        return Status.HIT if reply[0] else Status.ERROR

    def pack(self, op: Op) -> list[bytes | memoryview]:
        if self._px is None:
            return pack_command(b"SET", op.key, self._record(op))
        return pack_command(b"SET", op.key, self._record(op), b"PX", self._px)

    def read(self, reader: ReplyReader, op: Op, scratch: Scratch) -> Status:
        # An error reply (e.g. OOM when maxmemory is reached) raises RespReplyError.
        return Status.HIT if reader.read_status() == b"OK" else Status.ERROR


class GetCommands:
    """``GET`` of a whole block, or two ``GETRANGE`` (header, wanted layers) of part of one,
    the layers into ``outs``. An op is a hit only once the header and the checksums of its
    layers verify; records that fail are logged and collected in :attr:`corrupt_keys`."""

    def __init__(
        self,
        layout: PageLayout,
        outs: Sequence[torch.Tensor],
        log: ErrorLog,
        url: str,
        mac_key: bytes | None = None,
    ) -> None:
        self._mac_key = mac_key
        self._layout = layout
        self._outs = outs
        self._log = log
        self._url = url
        self.corrupt_keys: list[str] = []
        # per page: its destination's bytes (None: strided), made once per call, not per op
        self._views: dict[int, memoryview | None] = {}

    def _corrupt(self, op: Op, reason: object) -> Status:
        self._log.logger.warning("Redis tier %s: corrupt record %s: %s", self._url, op.key, reason)
        self.corrupt_keys.append(op.key)
        return Status.CORRUPT

    def _ranges(self, op: Op) -> tuple[tuple[int, int], tuple[int, int]]:
        """Inclusive byte ranges of a ranged read: the record header, the wanted layers."""
        hlen = BlockHeader.size_for(op.block_count)
        lo = hlen + op.first * self._layout.layer_bytes
        return (0, hlen - 1), (lo, lo + op.count * self._layout.layer_bytes - 1)

    def _out(self, op: Op) -> torch.Tensor:
        return self._outs[op.page][op.dst_offset : op.dst_offset + op.count]

    def _verify(self, op: Op, head: bytes | memoryview, payload: bytes | memoryview) -> Status:
        """HIT when the record header and the checksums of the wanted layers verify."""
        try:
            header = verify_header(
                head, op.key, self._layout, op.block_start, op.block_count, self._mac_key
            )
            verify_layers(header, payload, op.first, op.count, self._mac_key)
        except CorruptRecordError as e:
            return self._corrupt(op, e)
        return Status.HIT

    # -- redis-py pipelines: the values arrive as bytes and are copied into outs ---------
    def issue(self, pipe: Any, op: Op) -> None:
        if op.kind == "get":
            pipe.get(op.key)
        else:
            for lo, hi in self._ranges(op):
                pipe.getrange(op.key, lo, hi)

    def finish(self, op: Op, reply: list[Any]) -> Status:
        data = reply[0]
        if data is None or len(data) == 0:
            return Status.MISSING
        if op.kind == "get":
            hlen = BlockHeader.size_for(op.block_count)
            payload, src, offset = memoryview(data)[hlen:], data, hlen
        else:
            payload, src, offset = reply[1], reply[1], 0
        st = self._verify(op, data, payload)
        if st == Status.HIT:
            copy_bytes_into(self._out(op), src, offset)
        return st

    # -- direct: the header goes to a scratch buffer, the layers straight into outs (or,
    # for a strided destination, into a scratch buffer and then into outs) ---------------
    def pack(self, op: Op) -> list[bytes | memoryview]:
        if op.kind == "get":
            return pack_command(b"GET", op.key)
        return [
            piece
            for lo, hi in self._ranges(op)
            for piece in pack_command(b"GETRANGE", op.key, lo, hi)
        ]

    def _dst(self, op: Op) -> memoryview | None:
        """The bytes of ``op``'s destination when they are one range (None: strided)."""
        if op.page not in self._views:
            self._views[op.page] = writable_bytes(self._outs[op.page])
        view = self._views[op.page]
        if view is None:  # a strided page (a layer-first host pool): one layer may be a range
            return writable_bytes(self._out(op))
        lb = self._layout.layer_bytes
        return view[op.dst_offset * lb : (op.dst_offset + op.count) * lb]

    def read(self, reader: ReplyReader, op: Op, scratch: Scratch) -> Status:
        head = scratch.header(BlockHeader.size_for(op.block_count))
        dst = self._dst(op)
        staged = dst is None
        if dst is None:
            dst = scratch.stage(op.count * self._layout.layer_bytes)
        if op.kind == "get":
            st = self._read_get(reader, op, head, dst)
        else:
            st = self._read_range(reader, op, head, dst)
        if st == Status.HIT:
            st = self._verify(op, head, dst)
        if st == Status.HIT and staged:
            copy_bytes_into(self._out(op), dst, 0)
        return st

    def _read_get(self, reader: ReplyReader, op: Op, head: memoryview, dst: memoryview) -> Status:
        """One ``GET`` reply: the header into ``head``, the layers into ``dst``."""
        n = reader.read_bulk_into((head, dst))
        if n <= 0:
            return Status.MISSING
        if n != head.nbytes + dst.nbytes:
            return self._corrupt(
                op, f"value is {n} bytes, a record of its block has {head.nbytes + dst.nbytes}"
            )
        return Status.HIT

    def _read_range(self, reader: ReplyReader, op: Op, head: memoryview, dst: memoryview) -> Status:
        """The two ``GETRANGE`` replies, both read whatever the first one is."""
        replies: list[int | RespReplyError] = []
        for parts in ((head,), (dst,)):
            try:
                replies.append(reader.read_bulk_into(parts))
            except RespReplyError as e:
                replies.append(e)
        n_head, n_data = replies
        if isinstance(n_head, RespReplyError):
            raise n_head
        if isinstance(n_data, RespReplyError):
            raise n_data
        if n_head <= 0:
            return Status.MISSING
        if n_head != head.nbytes:
            return self._corrupt(
                op, f"record is truncated: {n_head} bytes, header needs {head.nbytes}"
            )
        if n_data != dst.nbytes:
            return self._corrupt(op, f"payload is {max(n_data, 0)} bytes, expected {dst.nbytes}")
        return Status.HIT
