"""Minimal RESP2 client side: pack commands, read replies with bulk values placed straight
into caller memory.

redis-py (with hiredis) copies a bulk reply about three times before a caller sees it: from
the socket into its read buffer, into hiredis's reader, and into a new ``bytes`` object. The
Redis tier then copies that into the destination tensor. :class:`ReplyReader` instead reads
the ``$<len>\\r\\n`` line from a small buffer and ``recv_into`` the value's bytes directly
into the memory the caller names (the destination tensor, for KV pages): the kernel's copy
out of the socket is the only one.

The replies this module understands are the ones the tier's commands produce (RESP2)::

    $<len>\\r\\n<len bytes>\\r\\n    bulk string (GET, GETRANGE)
    $-1\\r\\n                       nil (GET of a missing key)
    +OK\\r\\n                       simple string (SET)
    :<n>\\r\\n                      integer
    -ERR message\\r\\n              error reply for that command (stream stays in sync)

Anything else raises :class:`RespProtocolError`: the stream can no longer be trusted, and the
connection must be closed, not reused. A closed socket raises :class:`ConnectionError`, a
timeout ``TimeoutError`` (from the socket). The socket is whatever the caller connected: TCP,
a unix socket or a TLS socket (``ssl.SSLSocket.recv_into`` returns decrypted bytes).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable, Sequence

__all__ = [
    "ReplyReader",
    "RespProtocolError",
    "RespReplyError",
    "pack_command",
    "send_pieces",
]

_CRLF = b"\r\n"
# Pieces up to this size are joined into one send; larger ones (values) go as they are.
_JOIN_BELOW = 16 << 10
# Longest reply line accepted (error messages); a longer one means the stream is garbage.
_MAX_LINE = 1 << 20


class RespReplyError(Exception):
    """The server answered one command with an error reply (``-ERR ...``, ``-MOVED ...``).
    The connection is still usable: the reply was consumed whole."""


class RespProtocolError(ConnectionError):
    """A reply that is not RESP2 as expected: the connection must be discarded."""


def pack_command(*args: bytes | str | int | memoryview) -> list[bytes | memoryview]:
    """One command as RESP2 pieces: small arguments joined, each ``memoryview`` argument
    kept as its own piece so a large value is sent without being copied."""
    pieces: list[bytes | memoryview] = []
    head = bytearray(b"*%d\r\n" % len(args))
    for arg in args:
        if isinstance(arg, memoryview):
            head += b"$%d\r\n" % arg.nbytes
            pieces.append(bytes(head))
            pieces.append(arg)
            head = bytearray(_CRLF)
            continue
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = arg
        head += b"$%d\r\n%s\r\n" % (len(data), data)
    pieces.append(bytes(head))
    return pieces


def send_pieces(sock: socket.socket | ssl.SSLSocket, pieces: Iterable[bytes | memoryview]) -> None:
    """Send command pieces in order: runs of small pieces as one ``sendall``, large pieces
    (values) straight from their memory."""
    pending: list[bytes | memoryview] = []
    size = 0
    for piece in pieces:
        n = piece.nbytes if isinstance(piece, memoryview) else len(piece)
        if n >= _JOIN_BELOW:
            if pending:
                sock.sendall(b"".join(pending))
                pending, size = [], 0
            sock.sendall(piece)
            continue
        pending.append(piece)
        size += n
        if size >= _JOIN_BELOW:
            sock.sendall(b"".join(pending))
            pending, size = [], 0
    if pending:
        sock.sendall(b"".join(pending))


class ReplyReader:
    """Reads RESP2 replies from one socket.

    Reply lines and short values go through a small buffer; a value of at least the
    buffer's size is received straight into the caller's memory. Bytes already buffered
    (the start of a value that arrived with its ``$<len>`` line) are copied from the buffer
    first; that is at most one buffer's worth per reply.
    """

    def __init__(self, sock: socket.socket | ssl.SSLSocket, buffer_bytes: int = 64 << 10) -> None:
        self._sock = sock
        self._buf = bytearray(buffer_bytes)
        self._view = memoryview(self._buf)
        self._pos = 0  # first unread byte in _buf
        self._end = 0  # end of the bytes received into _buf

    @property
    def buffered(self) -> int:
        """Bytes received but not consumed yet (0 between complete batches of replies)."""
        return self._end - self._pos

    # -- low level -----------------------------------------------------------------------
    def _recv(self, into: memoryview) -> int:
        n = self._sock.recv_into(into)
        if n == 0:
            raise ConnectionError("the server closed the connection")
        return n

    def _fill(self) -> None:
        """Receive more bytes into the buffer, moving unread bytes to its front first."""
        if self._pos == self._end:
            self._pos = self._end = 0
        elif self._end == len(self._buf):
            if self._pos == 0:  # one reply line fills the buffer: grow it, within reason
                if len(self._buf) >= _MAX_LINE:
                    raise RespProtocolError(f"reply line longer than {_MAX_LINE} bytes")
                self._buf = self._buf + bytes(len(self._buf))
                self._view = memoryview(self._buf)
            rest = self._end - self._pos
            self._view[:rest] = self._view[self._pos : self._end]
            self._pos, self._end = 0, rest
        self._end += self._recv(self._view[self._end :])

    def _line(self) -> bytes:
        """The next ``\\r\\n``-terminated line, without the terminator."""
        while True:
            i = self._buf.find(_CRLF, self._pos, self._end)
            if i >= 0:
                line = bytes(self._view[self._pos : i])
                self._pos = i + 2
                return line
            self._fill()

    def _read_into(self, dst: memoryview) -> None:
        """Exactly ``len(dst)`` bytes of the stream into ``dst``."""
        n = dst.nbytes
        got = min(n, self._end - self._pos)
        if got:
            dst[:got] = self._view[self._pos : self._pos + got]
            self._pos += got
        while got < n:
            if n - got >= len(self._buf):
                got += self._recv(dst[got:])  # large remainder: no intermediate buffer
            else:
                self._fill()
                take = min(n - got, self._end - self._pos)
                dst[got : got + take] = self._view[self._pos : self._pos + take]
                self._pos += take
                got += take

    def _skip(self, n: int) -> None:
        """Consume and drop ``n`` bytes of the stream."""
        while n > 0:
            if self._pos == self._end:
                self._fill()
            take = min(n, self._end - self._pos)
            self._pos += take
            n -= take

    def _header(self) -> tuple[bytes, bytes]:
        line = self._line()
        if not line:
            raise RespProtocolError("empty reply line")
        kind, rest = line[:1], line[1:]
        if kind == b"-":
            raise RespReplyError(rest.decode("utf-8", "replace"))
        return kind, rest

    # -- replies -------------------------------------------------------------------------
    def read_bulk_into(self, parts: Sequence[memoryview]) -> int:
        """Read one bulk-string reply. When its length equals the total size of ``parts``,
        its bytes fill ``parts`` in order (e.g. a record header buffer, then the destination
        tensor); otherwise the value is read and dropped and ``parts`` hold garbage. Returns
        the value's length, -1 for nil. Raises :class:`RespReplyError` for an error reply."""
        kind, rest = self._header()
        if kind == b"_":  # RESP3 null, should a RESP3 connection get here
            return -1
        if kind != b"$":
            raise RespProtocolError(f"expected a bulk string, got {(kind + rest)[:64]!r}")
        try:
            n = int(rest)
        except ValueError:
            raise RespProtocolError(f"bad bulk length {rest[:32]!r}") from None
        if n < 0:
            return -1
        if n == sum(p.nbytes for p in parts):
            for p in parts:
                self._read_into(p)
        else:
            self._skip(n)
        self._expect_crlf()
        return n

    def read_status(self) -> bytes | int:
        """Read one simple-string (``+OK``: ``b"OK"``) or integer reply. Raises
        :class:`RespReplyError` for an error reply."""
        kind, rest = self._header()
        if kind == b"+":
            return rest
        if kind == b":":
            try:
                return int(rest)
            except ValueError:  # found by tests/tiers/test_fuzz.py
                raise RespProtocolError(f"bad integer reply {rest[:32]!r}") from None
        raise RespProtocolError(f"expected a status or integer reply, got {(kind + rest)[:64]!r}")

    def _expect_crlf(self) -> None:
        while self._end - self._pos < 2:
            self._fill()
        if self._view[self._pos : self._pos + 2] != _CRLF:
            raise RespProtocolError("bulk string not terminated by CRLF")
        self._pos += 2
