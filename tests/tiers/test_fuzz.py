"""Fuzzing what the tiers parse: stored records and RESP replies (hypothesis).

Whatever bytes a shared Redis hands back (a damaged record, another writer's value, a
garbled stream), the result is a refused record or a broken connection, counted as a miss
or an error: never an exception of another kind, never data accepted that was not written.
"""

from __future__ import annotations

import socket
import threading

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sglang_cacheflow.testing.redis import RedisServer
from sglang_cacheflow.tiers import PageLayout
from sglang_cacheflow.tiers.page import (
    BlockHeader,
    CorruptRecordError,
    encode_block,
    verify_header,
    verify_layers,
)
from sglang_cacheflow.tiers.redis import RedisTier
from sglang_cacheflow.tiers.resp import ReplyReader, RespProtocolError, RespReplyError
from tests.tiers.helpers import page_hashes, random_pages, unique_ns

pytestmark = pytest.mark.redis

LAYOUT = PageLayout(3, 4, 2, 8, torch.float16)
KEY = "fuzz-key"
PAGE = random_pages(LAYOUT, 1, seed=7)[0]
RECORD = bytes(encode_block(KEY, LAYOUT, PAGE, 0, LAYOUT.num_layers))
HLEN = BlockHeader.size_for(LAYOUT.num_layers)


def _decode(data: bytes) -> None:
    """The reader's whole check of a record: header, then every layer's checksum."""
    header = verify_header(data, KEY, LAYOUT, 0, LAYOUT.num_layers)
    verify_layers(header, memoryview(data)[HLEN:], 0, LAYOUT.num_layers)


def test_the_valid_record_decodes() -> None:  # the control: the fuzzed decoder accepts this
    _decode(RECORD)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2 * len(RECORD)))
def test_arbitrary_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(CorruptRecordError):
        _decode(data)


@settings(max_examples=400, deadline=None)
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(RECORD) - 1), st.integers(1, 255)), min_size=1, max_size=8
    ),
    cut=st.integers(0, len(RECORD)),
    tail=st.binary(max_size=16),
)
def test_a_damaged_record_is_never_accepted(
    flips: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    data = bytearray(RECORD)
    for pos, mask in flips:
        data[pos] ^= mask
    data = data[:cut] + tail if cut < len(RECORD) else data + tail
    if bytes(data) == RECORD:
        return  # the flips cancelled out: nothing to refuse
    with pytest.raises(CorruptRecordError):
        _decode(bytes(data))


# RESP-looking input finds more paths than uniform bytes: reply kinds, lengths, terminators
_FRAGMENT = st.one_of(
    st.sampled_from(
        [
            b"+OK",
            b"-ERR x",
            b"-MOVED 1 h:1",
            b":12",
            b":x",
            b"$3",
            b"$-1",
            b"$0",
            b"$99",
            b"$x",
            b"*2",
            b"_",
            b"",
            b"abc",
        ]
    ),
    st.binary(max_size=12),
)
_STREAM = st.lists(
    st.tuples(_FRAGMENT, st.sampled_from([b"\r\n", b"\n", b"", b"\r"])), max_size=12
).map(lambda parts: b"".join(a + b for a, b in parts))


@settings(max_examples=1500, deadline=None)
@example(stream=b":12\n+OK\r\n", reads=["status"])  # an integer reply that is not one
@given(stream=_STREAM, reads=st.lists(st.sampled_from(["status", 0, 3, 5, 70_000]), max_size=6))
def test_reply_reader_on_any_stream_fails_cleanly(stream: bytes, reads: list[object]) -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(stream)
        a.close()  # the server went away after these bytes: the reader never waits forever
        reader = ReplyReader(b, buffer_bytes=64)
        for how in reads:
            try:
                if how == "status":
                    reader.read_status()
                else:
                    reader.read_bulk_into([memoryview(bytearray(int(how)))])  # type: ignore[call-overload]
            except RespReplyError:
                continue  # an error reply, read whole: the stream is still in step
            except (RespProtocolError, ConnectionError):
                break  # out of step or closed: the caller drops the connection
    finally:
        b.close()


@pytest.fixture(scope="module")
def tier_and_server() -> object:
    with RedisServer() as server, RedisTier(server.url, block_bytes=1 << 20) as tier:
        yield tier, server


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=st.one_of(st.binary(max_size=3 * len(RECORD)), st.just(RECORD)))
def test_any_value_under_a_pages_key_is_a_counted_miss(
    tier_and_server: tuple[RedisTier, RedisServer], value: bytes
) -> None:
    tier, _ = tier_and_server
    ns = unique_ns(LAYOUT)
    (page,) = page_hashes(1)
    (key,) = tier.block_keys(ns, page)
    tier.client.set(key, value)  # another writer's value, or a valid record of another key
    before = tier.stats.snapshot()
    assert tier.get(ns, page) is None
    after = tier.stats.snapshot()
    # counted: a page not served is a miss, and a refused record is also counted corrupt
    assert after["misses"] == before["misses"] + 1
    assert after["corrupt"] - before["corrupt"] == (1 if value else 0) or value == b""
    # and the tier still serves what it wrote itself
    assert tier.put(ns, page, PAGE)
    got = tier.get(ns, page)
    assert got is not None and torch.equal(got.view(torch.uint8), PAGE.view(torch.uint8))


def test_the_tier_survives_a_garbled_stream_from_a_fake_server() -> None:
    """A "server" that answers every command with garbage: each read fails as an error,
    nothing is accepted and nothing escapes (the direct path's protocol checks)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2.0)
                try:
                    while request := conn.recv(1 << 16):
                        if b"GET" in request:  # a read: garbage, then hang up
                            conn.sendall(b":not-a-number\r\n$5\r\nab")
                            break
                        # connection set-up (HELLO, CLIENT SETINFO, PING...): one OK each
                        n = request.count(b"\r\n*") + request.startswith(b"*")
                        conn.sendall(b"+PONG\r\n" * n)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with RedisTier(f"redis://127.0.0.1:{port}/0", socket_timeout_s=2.0) as tier:
            ns = unique_ns(LAYOUT)
            assert tier.batch_get(ns, page_hashes(3)) == [None, None, None]
            assert tier.stats.snapshot()["errors"] > 0
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
