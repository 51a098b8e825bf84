"""Page layout and record format: encode, verify, detect every kind of damage."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
from tests.tiers.helpers import random_pages


def decode(key: str, layout: PageLayout, record: bytes, start: int, count: int) -> torch.Tensor:
    header = verify_header(record, key, layout, start, count)
    hlen = BlockHeader.size_for(count)
    verify_layers(header, memoryview(record)[hlen:], 0, count)
    out = torch.empty((count, *layout.layer_shape), dtype=layout.dtype)
    copy_bytes_into(out, record, hlen)
    return out


def test_layout_sizes_and_tag() -> None:
    lay = PageLayout.from_shape_name("llama-8b", page_tokens=256)
    assert lay.layer_bytes == 2 * 256 * 8 * 128 * 2
    assert lay.page_bytes == 32 * 1024 * 1024  # 128 KiB per token, 256 tokens
    assert lay.tag == "L32-kv-t256-h8-d128-bf16"
    assert PageLayout.from_shape_name("llama-8b", tp_size=2).kv_heads == 4
    assert PageLayout.from_shape_name("5x3x7", dtype="fp32").shape() == (5, 2, 256, 3, 7)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_layers": 0}, "num_layers"),
        ({"dtype": "fp64"}, "dtype"),
        ({"components": 3}, "components"),
    ],
)
def test_layout_rejects_bad_input(kwargs: dict, needle: str) -> None:
    base = {"num_layers": 1, "page_tokens": 1, "kv_heads": 1, "head_dim": 1}
    with pytest.raises(ValueError, match=needle):
        PageLayout(**(base | kwargs))


def test_bad_shape_name_and_layer_range_say_what_to_use() -> None:
    with pytest.raises(ValueError, match="llama-8b"):
        PageLayout.from_shape_name("gpt-17")
    with pytest.raises(ValueError, match=r"\[3, 3\)"):
        PageLayout(4, 1, 1, 1).check_layers((3, 3))
    with pytest.raises(ValueError, match="layout wants"):
        PageLayout(4, 1, 1, 1).check_page(torch.zeros(4, 2, 1, 1, 2, dtype=torch.bfloat16))


def test_blocks_cover_ranges() -> None:
    blocks = split_blocks(7, 3)
    assert blocks == [(0, 3), (3, 3), (6, 1)]
    assert blocks_for_range(blocks, 2, 7) == [(0, 2, 1), (1, 0, 3), (2, 0, 1)]
    assert blocks_for_range(blocks, 4, 5) == [(1, 1, 1)]


@settings(max_examples=40, deadline=None)
@given(
    layers=st.integers(1, 6),
    tokens=st.integers(1, 9),
    heads=st.integers(1, 3),
    dim=st.integers(1, 9),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]),
    components=st.sampled_from([1, 2]),
    data=st.data(),
)
def test_record_round_trip_any_layout(
    layers: int, tokens: int, heads: int, dim: int, dtype: torch.dtype, components: int, data
) -> None:
    lay = PageLayout(layers, tokens, heads, dim, dtype, components)
    page = torch.randn(lay.shape()).to(dtype)
    start = data.draw(st.integers(0, layers - 1))
    count = data.draw(st.integers(1, layers - start))
    record = bytes(encode_block("k", lay, page, start, count))
    assert len(record) == BlockHeader.size_for(count) + count * lay.layer_bytes
    got = decode("k", lay, record, start, count)
    want = page[start : start + count].contiguous()
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_strided_source_and_destination(small_layout: PageLayout) -> None:
    """A page seen through a permuted view (as SGLang's host pools are) encodes the same
    bytes, and decodes into a permuted view."""
    page = random_pages(small_layout, 1)[0]
    pool_order = page.permute(1, 0, 2, 3, 4).contiguous()  # (C, L, T, H, D), like layer_first
    view = pool_order.permute(1, 0, 2, 3, 4)
    assert not view.is_contiguous()
    rec_a = encode_block("k", small_layout, page, 0, 7)
    rec_b = encode_block("k", small_layout, view, 0, 7)
    assert rec_a == rec_b
    target = torch.zeros_like(pool_order)
    copy_bytes_into(target.permute(1, 0, 2, 3, 4), bytes(rec_a), BlockHeader.size_for(7))
    assert torch.equal(target, pool_order)


def _record(layout: PageLayout) -> tuple[bytearray, torch.Tensor]:
    page = random_pages(layout, 1)[0]
    return encode_block("key-1", layout, page, 0, layout.num_layers), page


def test_flipped_payload_byte_names_the_layer(small_layout: PageLayout) -> None:
    rec, _ = _record(small_layout)
    hlen = BlockHeader.size_for(7)
    rec[hlen + 4 * small_layout.layer_bytes + 17] ^= 0x01
    header = verify_header(bytes(rec), "key-1", small_layout, 0, 7)
    with pytest.raises(CorruptRecordError, match="layer 4"):
        verify_layers(header, memoryview(rec)[hlen:], 0, 7)
    # The other layers still verify on their own (a ranged read of them is fine).
    verify_layers(header, memoryview(rec)[hlen : hlen + 4 * small_layout.layer_bytes], 0, 4)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda r: r[:10], "truncated"),
        (lambda r: b"XXXX" + r[4:], "magic"),
        (lambda r: r[:6] + struct.pack("<H", 999) + r[8:], "header checksum"),
        (lambda r: r[:30] + bytes([r[30] ^ 1]) + r[31:], "header checksum"),
    ],
)
def test_damaged_header_is_rejected(small_layout: PageLayout, damage, needle: str) -> None:
    rec, _ = _record(small_layout)
    with pytest.raises(CorruptRecordError, match=needle):
        verify_header(damage(bytes(rec)), "key-1", small_layout, 0, 7)


def test_record_under_another_key_or_layout_is_rejected(small_layout: PageLayout) -> None:
    rec, _ = _record(small_layout)
    with pytest.raises(CorruptRecordError, match="another key"):
        verify_header(bytes(rec), "key-2", small_layout, 0, 7)
    other = PageLayout(7, 16, 2, 8, torch.float16)
    with pytest.raises(CorruptRecordError, match="differs"):
        verify_header(bytes(rec), "key-1", other, 0, 7)
    header = verify_header(bytes(rec), "key-1", small_layout, 0, 7)
    with pytest.raises(CorruptRecordError, match="payload is"):
        verify_layers(header, bytes(rec)[BlockHeader.size_for(7) : -1], 0, 7)
