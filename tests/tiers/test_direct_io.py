"""The Redis tier's direct path (``tiers/resp.py``: replies read straight into the
destination tensors) against real redis-servers: the RESP reader on a raw socket, equality
with the redis-py pipeline path, damaged and missing values in one batch, a stalled server,
password and database selection, TLS, and a Redis Cluster slot that moves."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from sglang_cacheflow.testing.redis import RedisCluster, RedisServer, free_port
from sglang_cacheflow.tiers import PageLayout
from sglang_cacheflow.tiers.redis import RedisTier
from sglang_cacheflow.tiers.resp import (
    ReplyReader,
    RespProtocolError,
    RespReplyError,
    pack_command,
    send_pieces,
)
from tests.tiers.helpers import page_hashes, random_pages, unique_ns

pytestmark = pytest.mark.redis


def assert_same(a: torch.Tensor | None, b: torch.Tensor) -> None:
    assert a is not None
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8), b.contiguous().view(torch.uint8))


def connections_received(tier: RedisTier) -> int:
    """Connections the server has accepted (asked on one of the tier's own connections)."""
    return int(tier.client.info("stats")["total_connections_received"])


# -- the reply reader on a raw socket ------------------------------------------------------


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=10) as s:
        yield s


@pytest.mark.parametrize("buffer_bytes", [16, 64 << 10])
def test_reader_places_values_across_buffer_boundaries(
    raw: socket.socket, buffer_bytes: int
) -> None:
    """Values smaller than, equal to and larger than the reader's buffer, pipelined, with
    nil, status, integer and error replies between them; a 16-byte buffer makes every
    reply line straddle a refill."""
    key = f"resp-test-{os.getpid()}-{buffer_bytes}"
    sizes = [0, 1, 15, 16, 17, 1000, 70_000, 300_000]
    values = [bytes((i * 7 + n) % 256 for i in range(n)) for n in sizes]
    cmds = []
    for i, v in enumerate(values):
        cmds += pack_command(b"SET", f"{key}:{i}", memoryview(v))
    cmds += pack_command(b"INCR", f"{key}:counter")
    cmds += pack_command(b"GET", f"{key}:absent")
    for i in range(len(values)):
        cmds += pack_command(b"GET", f"{key}:{i}")
    cmds += pack_command(b"GETRANGE", f"{key}:7", 100, 199)
    cmds += pack_command(b"LPUSH", f"{key}:0", b"x")  # wrong type: an error reply
    cmds += pack_command(b"GET", f"{key}:6")
    send_pieces(raw, cmds)
    reader = ReplyReader(raw, buffer_bytes=buffer_bytes)
    assert [reader.read_status() for _ in values] == [b"OK"] * len(values)
    assert reader.read_status() == 1
    assert reader.read_bulk_into([memoryview(bytearray(4))]) == -1
    for v in values:
        head, rest = bytearray(min(3, len(v))), bytearray(len(v) - min(3, len(v)))
        assert reader.read_bulk_into([memoryview(head), memoryview(rest)]) == len(v)
        assert bytes(head + rest) == v
    part = bytearray(100)
    assert reader.read_bulk_into([memoryview(part)]) == 100
    assert bytes(part) == values[7][100:200]
    with pytest.raises(RespReplyError, match="WRONGTYPE"):
        reader.read_bulk_into([memoryview(bytearray(1))])
    # A value of another size than expected is consumed whole and the stream stays usable.
    assert reader.read_bulk_into([memoryview(bytearray(5))]) == len(values[6])
    assert reader.buffered == 0


def test_reader_rejects_replies_it_does_not_expect(raw: socket.socket) -> None:
    send_pieces(raw, pack_command(b"CLIENT", b"ID"))
    with pytest.raises(RespProtocolError, match="bulk string"):
        ReplyReader(raw).read_bulk_into([])
    send_pieces(raw, pack_command(b"PING"))
    assert ReplyReader(raw).read_status() == b"PONG"
    send_pieces(raw, pack_command(b"ECHO", b"abc"))
    with pytest.raises(RespProtocolError, match="status or integer"):
        ReplyReader(raw).read_status()


def test_reader_reports_a_closed_connection(fresh_redis: RedisServer) -> None:
    with socket.create_connection(("127.0.0.1", fresh_redis.port), timeout=10) as s:
        fresh_redis.kill()
        with pytest.raises(ConnectionError):
            ReplyReader(s).read_status()


# -- the tier ------------------------------------------------------------------------------

LAYOUTS = [
    PageLayout(32, 16, 2, 128, torch.bfloat16),
    PageLayout(7, 1, 3, 5, torch.float32),
    PageLayout(5, 8, 1, 72, torch.float16, components=1),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.tag)
@pytest.mark.parametrize("layers_per_block", [1, 3, None])
def test_direct_and_pipeline_paths_agree(
    redis_server: RedisServer, layout: PageLayout, layers_per_block: int | None
) -> None:
    """Pages written by either path read back bit-identical through the other, whole, by
    layer range, and into strided destinations (staged, then copied); the direct tier keeps
    three groups of commands in flight."""
    ns = unique_ns(layout)
    pages = random_pages(layout, 6, seed=layout.num_layers)
    hashes = page_hashes(6)
    opts = dict(layers_per_block=layers_per_block, block_bytes=16 << 10, pipeline_bytes=24 << 10)
    with (
        RedisTier(redis_server.url, direct_io=True, pipeline_depth=3, **opts) as direct,
        RedisTier(redis_server.url, direct_io=False, **opts) as piped,
    ):
        assert direct.direct_io and not piped.direct_io
        assert direct.batch_put(ns, hashes[:3], pages[:3]) == [True] * 3
        assert piped.batch_put(ns, hashes[3:], pages[3:]) == [True] * 3
        n = layout.num_layers
        for rng in [None, (0, 1), (n // 2, n), (1, max(2, n - 1)), (n - 1, n)]:
            l0, l1 = layout.check_layers(rng)
            for reader in (direct, piped):
                for got, want in zip(reader.batch_get(ns, hashes, rng), pages, strict=True):
                    assert_same(got, want[l0:l1])
            # Strided destination: layer and component axes swapped, as SGLang pools are.
            c, t, h, d = layout.layer_shape
            dst = torch.zeros(6, c, l1 - l0, t, h, d, dtype=layout.dtype)
            outs = [dst[i].transpose(0, 1) for i in range(6)]
            assert direct.batch_get_into(ns, hashes, outs, rng) == [True] * 6
            for out, want in zip(outs, pages, strict=True):
                assert_same(out, want[l0:l1])
        assert direct.stats.corrupt == 0 and direct.stats.errors == 0


def test_layers_of_a_layer_first_pool_are_received_in_place(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of a layer-first pool (SGLang's host layout) is strided across layers, but each
    layer of it is one byte range: one-layer records are received straight into it, never
    staged, and come back exact."""
    from sglang_cacheflow.tiers import redis_batch

    staged: list[int] = []
    stage = redis_batch.Scratch.stage

    def counted(self: redis_batch.Scratch, nbytes: int) -> memoryview:
        staged.append(nbytes)
        return stage(self, nbytes)

    monkeypatch.setattr(redis_batch.Scratch, "stage", counted)
    layout = PageLayout(6, 4, 2, 8, torch.float32)
    ns = unique_ns(layout)
    pages = random_pages(layout, 5)
    hashes = page_hashes(5)
    pool = torch.zeros(layout.num_layers, 5, *layout.layer_shape, dtype=layout.dtype)
    outs = [pool[:, i] for i in range(5)]
    assert not outs[0].is_contiguous() and outs[0][2].is_contiguous()
    with RedisTier(redis_server.url, layers_per_block=1) as tier:
        assert tier.direct_io
        assert tier.batch_put(ns, hashes, pages) == [True] * 5
        assert tier.batch_get_into(ns, hashes, outs) == [True] * 5
    for out, want in zip(outs, pages, strict=True):
        assert_same(out, want)
    assert staged == []


def test_bad_values_in_one_batch_are_misses_and_the_connection_stays(
    fresh_redis: RedisServer,
) -> None:
    """Missing, empty, truncated, lengthened, bit-flipped and wrongly typed values between
    good pages of one pipelined batch: each bad page is a counted miss, every good page is
    exact (the reader stayed in step), and no connection was dropped for it."""
    layout = PageLayout(4, 16, 2, 16, torch.bfloat16)  # 2 KiB per layer
    ns = unique_ns(layout)
    pages = random_pages(layout, 12)
    h = page_hashes(12)
    with RedisTier(
        fresh_redis.url, streams=1, layers_per_block=2, evict_corrupt=False,
        pipeline_bytes=8 << 10, pipeline_depth=2,
    ) as t:  # fmt: skip
        assert t.batch_put(ns, h, pages) == [True] * 12
        r = t.client
        keys = [t.block_keys(ns, x) for x in h]
        r.delete(keys[1][1])  # missing block: GET answers nil
        r.set(keys[3][0], b"")  # empty value
        r.set(keys[5][1], r.get(keys[5][1])[:-1])  # truncated by one byte
        r.set(keys[7][0], r.get(keys[7][0]) + b"tail")  # longer than a record
        flipped = bytearray(r.get(keys[9][1]))
        flipped[-1] ^= 1
        r.set(keys[9][1], bytes(flipped))  # last byte of the last layer
        r.delete(keys[11][0])
        r.rpush(keys[11][0], b"x")  # another type: WRONGTYPE error reply
        before = connections_received(t)
        # (layers, missing, corrupt, error reply). Blocks are layers 0-1 and 2-3; a ranged
        # read that takes part of a block verifies the header and its layers only, so a
        # value with extra bytes after them, or damage in other layers, does not matter.
        cases = [
            (None, {1, 3}, {5, 7, 9}, {11}),  # whole blocks: GET
            ((0, 2), {3}, {7}, {11}),
            ((2, 4), {1}, {5, 9}, set()),
            ((1, 3), {1, 3}, set(), {11}),  # part of each block: GETRANGE
            ((0, 1), {3}, set(), {11}),
            ((3, 4), {1}, {5, 9}, set()),
        ]
        for rng, missing, corrupt, error in cases:
            s0 = t.stats.snapshot()
            got = t.batch_get(ns, h, rng)
            l0, l1 = layout.check_layers(rng)
            bad = missing | corrupt | error
            assert {i for i, g in enumerate(got) if g is None} == bad, rng
            for i, g in enumerate(got):
                if i not in bad:
                    assert_same(g, pages[i][l0:l1])
            s1 = t.stats.snapshot()
            assert s1["errors"] - s0["errors"] == len(error), rng
            assert s1["corrupt"] - s0["corrupt"] == len(corrupt), rng
            assert s1["misses"] - s0["misses"] == len(bad), rng
        assert connections_received(t) == before


def test_stalled_server_times_out_and_late_replies_are_never_read(
    fresh_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that stops answering: the batch ends in misses after the socket timeout,
    with an error logged; its connections are closed, so the replies the server sends when
    it resumes are never taken for the next batch's."""
    layout = PageLayout(4, 64, 2, 64, torch.bfloat16)  # 32 KiB per layer
    ns = unique_ns(layout)
    pages = random_pages(layout, 8)
    h = page_hashes(8)
    with RedisTier(fresh_redis.url, streams=2, socket_timeout_s=0.5) as t:
        assert t.batch_put(ns, h[:4], pages[:4]) == [True] * 4
        before = connections_received(t)
        caplog.set_level(logging.ERROR, logger="sglang_cacheflow.tiers.redis")
        assert fresh_redis.pid is not None
        os.kill(fresh_redis.pid, signal.SIGSTOP)
        try:
            assert t.batch_get(ns, h[:4]) == [None] * 4
        finally:
            os.kill(fresh_redis.pid, signal.SIGCONT)
        assert t.stats.errors >= 1
        assert any("failed" in rec.getMessage() for rec in caplog.records)
        pool = t.client.connection_pool
        assert all(c._sock is None for c in pool._connections)
        # Other pages, same hashes in another order: each gets its own bytes.
        order = [3, 2, 1, 0]
        for got, i in zip(t.batch_get(ns, [h[i] for i in order]), order, strict=True):
            assert_same(got, pages[i])
        assert connections_received(t) > before


def test_password_database_and_unix_socket() -> None:
    """Connections come from redis-py's pool, authenticated and on the URL's database."""
    layout = PageLayout(6, 8, 2, 16, torch.float16)
    pages = random_pages(layout, 3)
    h = page_hashes(3)
    ns = unique_ns(layout)
    with RedisServer(unix_socket=True, password="s3cret:/@") as s:
        pw = "s3cret%3A%2F%40"
        with RedisTier(f"redis://:{pw}@127.0.0.1:{s.port}/5", layers_per_block=4) as tcp:
            assert tcp.direct_io
            assert tcp.batch_put(ns, h, pages) == [True] * 3
            assert tcp.client.dbsize() == 6
        with RedisTier(f"unix://:{pw}@{s.socket_path}?db=5", layers_per_block=4) as unix:
            assert unix.direct_io
            for got, want in zip(unix.batch_get(ns, h, (2, 6)), pages, strict=True):
                assert_same(got, want[2:6])
        with RedisTier(f"redis://:{pw}@127.0.0.1:{s.port}/0", layers_per_block=4) as db0:
            assert db0.batch_get(ns, h) == [None] * 3
            assert db0.stats.errors == 0 and db0.stats.corrupt == 0


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[RedisServer, int]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    tls_port = free_port()
    server = RedisServer(
        extra_args=("--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                    "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                    "--tls-auth-clients", "no"),
    )  # fmt: skip
    try:
        try:
            server.start()
        except Exception as e:  # a redis-server built without TLS
            pytest.skip(f"redis-server without TLS: {e}")
        yield server, tls_port
    finally:
        server.cleanup()


def test_tls(tls_server: tuple[RedisServer, int]) -> None:
    server, tls_port = tls_server
    layout = PageLayout(8, 64, 2, 64, torch.bfloat16)  # 32 KiB per layer: many TLS records
    ns = unique_ns(layout)
    pages = random_pages(layout, 4)
    h = page_hashes(4)
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=none"
    with RedisTier(url, layers_per_block=3) as t:
        assert t.direct_io
        assert t.batch_put(ns, h, pages) == [True] * 4
        for rng in [None, (1, 7)]:
            l0, l1 = layout.check_layers(rng)
            for got, want in zip(t.batch_get(ns, h, rng), pages, strict=True):
                assert_same(got, want[l0:l1])
    # It really went over TLS: the plain port holds the same keys.
    assert int(server.cli("dbsize")) == 4 * 3


def _migrate(cluster: RedisCluster, keys: list[str], slot: int) -> tuple[RedisServer, str]:
    """Begin moving ``slot`` to another master, step by step as ``redis-cli --cluster
    reshard`` does, and move ``keys`` (of that slot) there; the slot stays migrating.
    Returns the source and the target's node id."""
    src = next(s for s in cluster.servers if int(s.cli("cluster", "countkeysinslot", str(slot))))
    dst = next(s for s in cluster.servers if s is not src)
    src_id, dst_id = src.cli("cluster", "myid").strip(), dst.cli("cluster", "myid").strip()
    dst.cli("cluster", "setslot", str(slot), "importing", src_id)
    src.cli("cluster", "setslot", str(slot), "migrating", dst_id)
    src.cli("migrate", "127.0.0.1", str(dst.port), "", "0", "5000", "keys", *keys)
    return src, dst_id


def _end_migration(cluster: RedisCluster, slot: int, dst_id: str) -> None:
    for s in cluster.servers:
        s.cli("cluster", "setslot", str(slot), "node", dst_id)


def test_cluster_slot_moved_under_the_tier(redis_cluster: RedisCluster) -> None:
    """Move the slot of a page to another master behind the tier's back: the direct path
    gets MOVED, reads the page through redis-py's cluster pipeline (which follows it),
    and refreshes the slot map so the next batch goes to the new owner directly."""
    layout = PageLayout(4, 16, 2, 16, torch.bfloat16)
    ns = unique_ns(layout)
    pages = random_pages(layout, 6)
    h = page_hashes(6)
    with RedisTier(redis_cluster.url, layers_per_block=2) as t:
        assert t.is_cluster and t.direct_io
        assert t.batch_put(ns, h, pages) == [True] * 6
        keys = t.block_keys(ns, h[0])
        slot = t.client.keyslot(keys[0])
        _, dst_id = _migrate(redis_cluster, keys, slot)
        _end_migration(redis_cluster, slot, dst_id)
        dst = next(s for s in redis_cluster.servers if s.cli("cluster", "myid").strip() == dst_id)
        for got, want in zip(t.batch_get(ns, h), pages, strict=True):
            assert_same(got, want)
        assert t.stats.errors == 0
        deadline = time.monotonic() + 10
        while t.client.nodes_manager.get_node_from_slot(slot).port != dst.port:
            assert time.monotonic() < deadline, "slot map not refreshed"
            time.sleep(0.05)
        for got, want in zip(t.batch_get(ns, h, (2, 4)), pages, strict=True):
            assert_same(got, want[2:4])
        t.delete(ns, h)


def test_cluster_slot_migrating_under_the_tier_answers_ask(redis_cluster: RedisCluster) -> None:
    """A slot in migration (a reshard under way): the page whose keys have moved gets a
    real ASK on the direct path and is read through redis-py's cluster pipeline, which
    follows it; once the slot is reassigned, the new owner serves it."""
    layout = PageLayout(4, 16, 2, 16, torch.bfloat16)
    ns = unique_ns(layout)
    pages = random_pages(layout, 6)
    h = page_hashes(6)
    with RedisTier(redis_cluster.url, layers_per_block=2) as t:
        assert t.batch_put(ns, h, pages) == [True] * 6
        keys = t.block_keys(ns, h[0])
        slot = t.client.keyslot(keys[0])
        src, dst_id = _migrate(redis_cluster, keys, slot)
        # a real ASK: the source no longer has the key and sends the client to the target
        with pytest.raises(redis.exceptions.AskError):
            redis.Redis(port=src.port).get(keys[0])
        for got, want in zip(t.batch_get(ns, h), pages, strict=True):
            assert_same(got, want)
        assert t.stats.errors == 0 and t.stats.misses == 0
        _end_migration(redis_cluster, slot, dst_id)
        for got, want in zip(t.batch_get(ns, h, (2, 4)), pages, strict=True):
            assert_same(got, want[2:4])
        t.delete(ns, h)


def test_resp3_url_falls_back_to_pipelines(redis_server: RedisServer) -> None:
    """A URL that asks for RESP3 gets redis-py's pipelines (the reader speaks RESP2)."""
    layout = PageLayout(4, 8, 2, 16, torch.bfloat16)
    ns = unique_ns(layout)
    pages = random_pages(layout, 2)
    h = page_hashes(2)
    with RedisTier(f"{redis_server.url}?protocol=3", layers_per_block=3) as t:
        assert not t.direct_io
        assert t.client.connection_pool.connection_kwargs["protocol"] == 3
        assert t.batch_put(ns, h, pages) == [True, True]
        for got, want in zip(t.batch_get(ns, h, (1, 4)), pages, strict=True):
            assert_same(got, want[1:4])
