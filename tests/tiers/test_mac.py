"""Authenticated records: with a secret (``mac_key_env``) the sums are keyed BLAKE3.

A writer without the secret can store a record whose xxh3 checksums are all correct; a
reader holding the secret refuses it and counts it. The control: without the secret the
same planted record is read as good KV, which is what the MAC is for.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from sglang_cacheflow.testing.redis import RedisServer
from sglang_cacheflow.tiers import PageLayout
from sglang_cacheflow.tiers.page import (
    BlockHeader,
    CorruptRecordError,
    encode_block,
    mac_key_from_secret,
    verify_header,
    verify_layers,
)
from sglang_cacheflow.tiers.redis import RedisTier, RedisTierError
from tests.tiers.helpers import page_hashes, random_pages, unique_ns

pytestmark = pytest.mark.redis

LAYOUT = PageLayout(4, 8, 2, 16, torch.bfloat16)
SECRET = b"0123456789abcdef0123456789abcdef"
MAC_KEY = mac_key_from_secret(SECRET)
ENV = "CACHEFLOW_TEST_KV_SECRET"


def _check(record: bytes, key: str, mac_key: bytes | None, first: int = 0, count: int = 4) -> None:
    header = verify_header(record, key, LAYOUT, 0, 4, mac_key)
    lo = BlockHeader.size_for(4) + first * LAYOUT.layer_bytes
    verify_layers(header, record[lo : lo + count * LAYOUT.layer_bytes], first, count, mac_key)


def test_keyed_records_verify_only_with_their_key() -> None:
    page = random_pages(LAYOUT, 1)[0]
    keyed = bytes(encode_block("k", LAYOUT, page, 0, 4, MAC_KEY))
    plain = bytes(encode_block("k", LAYOUT, page, 0, 4))
    _check(keyed, "k", MAC_KEY)
    _check(keyed, "k", MAC_KEY, first=1, count=2)  # a ranged read checks its layers' MACs
    _check(plain, "k", None)
    with pytest.raises(CorruptRecordError, match="header MAC mismatch"):
        _check(plain, "k", MAC_KEY)  # valid checksums, no MAC: forged for a keyed reader
    with pytest.raises(CorruptRecordError, match="header checksum mismatch"):
        _check(keyed, "k", None)
    with pytest.raises(CorruptRecordError, match="MAC mismatch"):
        _check(keyed, "k", mac_key_from_secret(b"another secret of 32 bytes......"))
    # a layer replaced by someone who rewrote the header's checksums with xxh3 is refused too
    forged = bytearray(keyed)
    forged[BlockHeader.size_for(4)] ^= 1
    with pytest.raises(CorruptRecordError, match="MAC mismatch in layer 0"):
        _check(bytes(forged), "k", MAC_KEY)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def test_a_planted_record_is_refused_and_counted(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, SECRET.decode())
    ns = unique_ns(LAYOUT)
    (page,) = page_hashes(1)
    good, evil = random_pages(LAYOUT, 2, seed=3)
    with RedisTier(server.url, mac_key_env=ENV) as keyed, RedisTier(server.url) as writer:
        assert keyed.put(ns, page, good)
        assert torch.equal(keyed.get(ns, page).view(torch.uint8), good.view(torch.uint8))
        assert writer.get(ns, page) is None  # no secret: a keyed record is not read either
        assert writer.put(ns, page, evil)  # a writer without the secret plants its KV
        before = keyed.stats.snapshot()["corrupt"]
        assert keyed.get(ns, page) is None
        assert keyed.stats.snapshot()["corrupt"] == before + 1


def test_control_without_a_secret_the_planted_record_is_used(server: RedisServer) -> None:
    ns = unique_ns(LAYOUT)
    (page,) = page_hashes(1)
    good, evil = random_pages(LAYOUT, 2, seed=3)
    with RedisTier(server.url) as reader, RedisTier(server.url) as writer:
        assert reader.put(ns, page, good) and writer.put(ns, page, evil)
        got = reader.get(ns, page)
        assert got is not None and torch.equal(got.view(torch.uint8), evil.view(torch.uint8))


def test_a_missing_or_short_secret_is_a_clear_error(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(RedisTierError, match=f"{ENV}, which is not set"):
        RedisTier(server.url, mac_key_env=ENV)
    monkeypatch.setenv(ENV, "short")
    with pytest.raises(RedisTierError, match="holds 5 bytes; a secret needs at least 16"):
        RedisTier(server.url, mac_key_env=ENV)
