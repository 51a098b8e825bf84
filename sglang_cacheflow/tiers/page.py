"""Page layout, the stored record format (header and checksums) and its verification.

A *page* is the KV of ``page_tokens`` consecutive tokens for every layer, as one tensor of
shape ``(num_layers, components, page_tokens, kv_heads, head_dim)``: layer-major, so any
layer range is one contiguous slice. ``components`` is 2 (K and V) for MHA/GQA models and
1 for a latent (MLA) cache.

A serialising tier stores a page as one or more *blocks* of consecutive layers. A block is
one record: a header followed by the raw bytes of its layers, layer after layer::

    magic "CFKV" | version | header_len | dtype | components | num_layers | layer_start
    | layer_count | page_tokens | kv_heads | head_dim | layer_bytes | key digest
    | xxh3-64 of each layer's bytes (layer_count x 8 bytes) | xxh3-64 of the header

The key digest (xxh3-64 of the record's own key) catches a record stored under another
key; per-layer checksums let a reader verify any layer sub-range it fetched with a ranged
read without the rest of the block. With a MAC key (from a secret), the layer and header
sums are keyed BLAKE3 truncated to 64 bits instead of xxh3-64: a writer without the secret
cannot make a record that verifies, and a reader with the key refuses records written
without it (and the other way round); the threat model is in docs/tiers.md. Nothing here
is pickled: a record is a struct and the tensor's bytes. :func:`verify_header` and
:func:`verify_layers` raise :class:`CorruptRecordError`, which tiers turn into a counted
miss.
"""

from __future__ import annotations

import ctypes
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
import xxhash

__all__ = [
    "DTYPE_CODES",
    "FORMAT_VERSION",
    "MAGIC",
    "SHAPES",
    "BlockHeader",
    "CorruptRecordError",
    "PageLayout",
    "copy_bytes_into",
    "encode_block",
    "verify_header",
    "verify_layers",
    "writable_bytes",
]

MAGIC = b"CFKV"
FORMAT_VERSION = 1

# Stable on-disk codes; never renumber.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5,
    torch.uint8: 6,
    torch.int8: 7,
}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8e4m3",
    torch.float8_e5m2: "fp8e5m2",
    torch.uint8: "u8",
    torch.int8: "i8",
}
_NAMED_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()} | {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "half": torch.float16,
    "float": torch.float32,
}

# Fixed part of the header: magic, version, header_len, dtype, components, num_layers,
# layer_start, layer_count, page_tokens, kv_heads, head_dim, layer_bytes, key digest.
_FIXED = struct.Struct("<4sHHBBHHHIHHQQ")


class CorruptRecordError(ValueError):
    """A stored record is missing bytes, has a foreign layout or fails its checksum."""


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in DTYPE_CODES:
            raise ValueError(
                f"unsupported KV dtype {value}; use one of "
                f"{', '.join(_DTYPE_NAMES[d] for d in DTYPE_CODES)}"
            )
        return value
    try:
        return _NAMED_DTYPES[value.lower()]
    except KeyError:
        raise ValueError(
            f"unknown KV dtype {value!r}; use one of {', '.join(sorted(_NAMED_DTYPES))}"
        ) from None


@dataclass(frozen=True)
class PageLayout:
    """Shape and dtype of one page: ``(num_layers, components, page_tokens, kv_heads,
    head_dim)`` of ``dtype``."""

    num_layers: int
    page_tokens: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    components: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _dtype(self.dtype))
        for name in ("num_layers", "page_tokens", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"PageLayout.{name} must be a positive int, got {value!r}")
        if self.components not in (1, 2):
            raise ValueError(
                f"PageLayout.components must be 2 (K and V) or 1 (MLA latent), "
                f"got {self.components!r}"
            )
        if self.num_layers > 0xFFFF or self.kv_heads > 0xFFFF or self.head_dim > 0xFFFF:
            raise ValueError(f"PageLayout dimensions exceed the record format: {self}")

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def layer_shape(self) -> tuple[int, int, int, int]:
        return (self.components, self.page_tokens, self.kv_heads, self.head_dim)

    @cached_property
    def layer_bytes(self) -> int:
        """Bytes of one layer of one page (K and V). Cached: a reader asks once per record."""
        c, t, h, d = self.layer_shape
        return c * t * h * d * self.itemsize

    @property
    def page_bytes(self) -> int:
        return self.layer_bytes * self.num_layers

    def shape(self, layers: tuple[int, int] | None = None) -> tuple[int, ...]:
        """Tensor shape of the page, or of layers ``[l0, l1)`` of it."""
        l0, l1 = self.check_layers(layers)
        return (l1 - l0, *self.layer_shape)

    def check_layers(self, layers: tuple[int, int] | None) -> tuple[int, int]:
        """``(l0, l1)`` validated against this layout; ``None`` means all layers."""
        if layers is None:
            return (0, self.num_layers)
        l0, l1 = layers
        if not (0 <= l0 < l1 <= self.num_layers):
            raise ValueError(f"layer range [{l0}, {l1}) is outside [0, {self.num_layers}) or empty")
        return (int(l0), int(l1))

    def check_page(self, page: torch.Tensor, layers: tuple[int, int] | None = None) -> None:
        """Raise a ValueError naming what differs when ``page`` does not fit this layout."""
        want = self.shape(layers)
        if tuple(page.shape) != want or page.dtype != self.dtype:
            raise ValueError(
                f"page tensor is {tuple(page.shape)} {page.dtype}, layout wants {want} "
                f"{self.dtype} (num_layers, components, page_tokens, kv_heads, head_dim)"
            )
        if page.device.type != "cpu":
            raise ValueError(f"pages must be in host memory, got a tensor on {page.device}")

    def empty(self, layers: tuple[int, int] | None = None, *, pin: bool = False) -> torch.Tensor:
        """An uninitialised page (``pin``: in page-locked memory, for copies to a GPU)."""
        return torch.empty(self.shape(layers), dtype=self.dtype, pin_memory=pin)

    @property
    def tag(self) -> str:
        """Short identity used in keys, e.g. ``L32-kv-t256-h8-d128-bf16``."""
        comp = "kv" if self.components == 2 else "c1"
        return (
            f"L{self.num_layers}-{comp}-t{self.page_tokens}-h{self.kv_heads}"
            f"-d{self.head_dim}-{_DTYPE_NAMES[self.dtype]}"
        )

    @classmethod
    def from_shape_name(
        cls,
        name: str,
        page_tokens: int = 256,
        dtype: torch.dtype | str = torch.bfloat16,
        tp_size: int = 1,
    ) -> PageLayout:
        """Layout of a known model (see :data:`SHAPES`), KV heads split over ``tp_size``,
        or an explicit ``"LAYERSxHEADSxDIM"`` such as ``"32x8x128"``."""
        key = name.lower()
        if key in SHAPES:
            layers, heads, dim = SHAPES[key]
        else:
            m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", key)
            if m is None:
                raise ValueError(
                    f"unknown shape {name!r}; use one of {', '.join(sorted(SHAPES))} "
                    f"or LAYERSxKV_HEADSxHEAD_DIM such as 32x8x128"
                )
            layers, heads, dim = (int(g) for g in m.groups())
        if heads % tp_size:
            raise ValueError(f"{heads} KV heads of {name!r} cannot be split over tp={tp_size}")
        return cls(layers, page_tokens, heads // tp_size, dim, _dtype(dtype))


# (layers, KV heads, head dim) of models the benchmarks and tests use.
SHAPES: dict[str, tuple[int, int, int]] = {
    "llama-8b": (32, 8, 128),  # Llama-3.1-8B
    "llama-70b": (80, 8, 128),  # Llama-3.1-70B
    "qwen2-7b": (28, 4, 128),  # Qwen2-7B
    "smollm2-135m": (30, 3, 64),  # SmolLM2-135M
    "tiny": (4, 2, 16),
}


@dataclass(frozen=True)
class BlockHeader:
    """Parsed header of one record (layers ``[layer_start, layer_start + layer_count)``)."""

    dtype: torch.dtype
    components: int
    num_layers: int
    layer_start: int
    layer_count: int
    page_tokens: int
    kv_heads: int
    head_dim: int
    layer_bytes: int
    key_digest: int
    checksums: tuple[int, ...]

    FIXED_SIZE: ClassVar[int] = _FIXED.size

    @staticmethod
    def size_for(layer_count: int) -> int:
        """Header bytes of a record holding ``layer_count`` layers."""
        return _FIXED.size + 8 * layer_count + 8


def key_digest(key: str | bytes) -> int:
    return xxhash.xxh3_64_intdigest(key.encode() if isinstance(key, str) else key)


MAC_CONTEXT = "sglang-cacheflow 2026-11 KV record MAC"
"""BLAKE3 key derivation context: a secret of any length becomes the 32-byte MAC key."""


def mac_key_from_secret(secret: bytes) -> bytes:
    """The 32-byte keyed-BLAKE3 key of a configured secret."""
    import blake3

    return blake3.blake3(secret, derive_key_context=MAC_CONTEXT).digest()


def _sum(data: memoryview | bytes | bytearray, mac_key: bytes | None) -> int:
    """The 64-bit sum a record stores for ``data``: xxh3, or keyed BLAKE3 with a MAC key
    (:func:`mac_key_from_secret`)."""
    if mac_key is None:
        return xxhash.xxh3_64_intdigest(data)
    import blake3

    return int.from_bytes(blake3.blake3(data, key=mac_key).digest(8), "little")


def encode_block(
    key: str | bytes, layout: PageLayout, page: torch.Tensor, layer_start: int, layer_count: int,
    mac_key: bytes | None = None,
) -> bytearray:  # fmt: skip
    """One record for layers ``[layer_start, layer_start + layer_count)`` of ``page``
    (a full page tensor of ``layout``). The tensor's bytes are copied once, straight into
    the record; strided pages (e.g. views of a host pool) are fine."""
    hlen = BlockHeader.size_for(layer_count)
    lb = layout.layer_bytes
    buf = bytearray(hlen + lb * layer_count)
    payload = np.frombuffer(buf, dtype=np.uint8, count=lb * layer_count, offset=hlen)
    src = _as_numpy(page[layer_start : layer_start + layer_count])
    np.copyto(payload.view(src.dtype).reshape(src.shape), src)
    mv = memoryview(buf)
    sums = [_sum(mv[hlen + i * lb : hlen + (i + 1) * lb], mac_key) for i in range(layer_count)]
    _FIXED.pack_into(
        buf, 0, MAGIC, FORMAT_VERSION, hlen, DTYPE_CODES[layout.dtype], layout.components,
        layout.num_layers, layer_start, layer_count, layout.page_tokens, layout.kv_heads,
        layout.head_dim, lb, key_digest(key),
    )  # fmt: skip
    struct.pack_into(f"<{layer_count}Q", buf, _FIXED.size, *sums)
    struct.pack_into("<Q", buf, hlen - 8, _sum(mv[: hlen - 8], mac_key))
    return buf


def verify_header(
    data: bytes | memoryview | None,
    key: str | bytes,
    layout: PageLayout,
    layer_start: int,
    layer_count: int,
    mac_key: bytes | None = None,
) -> BlockHeader:
    """Parse and check the header at the front of ``data`` against what the reader expects
    (layout, block position, key; the MAC with ``mac_key``). Raises
    :class:`CorruptRecordError` with the reason."""
    hlen = BlockHeader.size_for(layer_count)
    if data is None:
        raise CorruptRecordError("record is missing")
    if len(data) < hlen:
        raise CorruptRecordError(f"record is truncated: {len(data)} bytes, header needs {hlen}")
    mv = memoryview(data)
    (magic, version, stored_hlen, code, comps, nl, ls, lc, pt, kh, hd, lb, kd) = _FIXED.unpack_from(
        mv, 0
    )
    if magic != MAGIC:
        raise CorruptRecordError(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise CorruptRecordError(f"format version {version}, this reader knows {FORMAT_VERSION}")
    (stored_sum,) = struct.unpack_from("<Q", mv, hlen - 8)
    if stored_hlen != hlen or stored_sum != _sum(mv[: hlen - 8], mac_key):
        what = "MAC" if mac_key is not None else "checksum"
        raise CorruptRecordError(f"header {what} mismatch")
    expected = (
        DTYPE_CODES[layout.dtype], layout.components, layout.num_layers, layer_start,
        layer_count, layout.page_tokens, layout.kv_heads, layout.head_dim, layout.layer_bytes,
    )  # fmt: skip
    if (code, comps, nl, ls, lc, pt, kh, hd, lb) != expected:
        raise CorruptRecordError(
            f"record layout {(code, comps, nl, ls, lc, pt, kh, hd, lb)} differs from the "
            f"expected {expected}"
        )
    if kd != key_digest(key):
        raise CorruptRecordError("record belongs to another key")
    sums = struct.unpack_from(f"<{layer_count}Q", mv, _FIXED.size)
    return BlockHeader(_CODE_DTYPES[code], comps, nl, ls, lc, pt, kh, hd, lb, kd, tuple(sums))


def verify_layers(
    header: BlockHeader,
    payload: bytes | memoryview | None,
    first: int,
    count: int,
    mac_key: bytes | None = None,
) -> None:
    """Check that ``payload`` holds exactly layers ``[first, first + count)`` of the block
    (indices relative to the block) with their stored checksums (MACs with ``mac_key``)."""
    lb = header.layer_bytes
    if payload is None or len(payload) != lb * count:
        got = 0 if payload is None else len(payload)
        raise CorruptRecordError(f"payload is {got} bytes, expected {lb * count}")
    mv = memoryview(payload)
    for i in range(count):
        if _sum(mv[i * lb : (i + 1) * lb], mac_key) != header.checksums[first + i]:
            what = "MAC" if mac_key is not None else "checksum"
            raise CorruptRecordError(f"{what} mismatch in layer {header.layer_start + first + i}")


def copy_bytes_into(out: torch.Tensor, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Copy ``out.nbytes`` bytes of ``data`` starting at ``offset`` into ``out`` (any
    strides). One memcpy when ``out`` is contiguous."""
    nbytes = out.numel() * out.element_size()
    src = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=offset)
    if out.is_contiguous():
        ctypes.memmove(out.data_ptr(), src.ctypes.data, nbytes)
        return
    dst = _as_numpy(out)
    np.copyto(dst, src.view(dst.dtype).reshape(dst.shape))


def writable_bytes(t: torch.Tensor) -> memoryview | None:
    """The memory of a contiguous CPU tensor as a writable byte ``memoryview`` (a socket can
    ``recv_into`` it), or None when the tensor is strided and has no single byte range."""
    if not t.is_contiguous() or t.device.type != "cpu":
        return None
    return memoryview(_as_numpy(t).reshape(-1).view(np.uint8))


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view (same memory and strides) of a CPU tensor of any dtype, as integers of
    the same width. Copies between such views run in the calling thread: torch's parallel
    copy kernels spin worker threads that compete with a local redis-server for cores."""
    return t.view(_INT_OF_SIZE[t.element_size()]).numpy()


def split_blocks(num_layers: int, layers_per_block: int) -> list[tuple[int, int]]:
    """``(layer_start, layer_count)`` of every block of a page."""
    return [
        (s, min(layers_per_block, num_layers - s)) for s in range(0, num_layers, layers_per_block)
    ]


def blocks_for_range(
    blocks: Sequence[tuple[int, int]], l0: int, l1: int
) -> list[tuple[int, int, int]]:
    """For layers ``[l0, l1)``: ``(block index, first layer in block, layer count)`` of each
    block that holds some of them."""
    out = []
    for b, (start, count) in enumerate(blocks):
        lo, hi = max(l0, start), min(l1, start + count)
        if lo < hi:
            out.append((b, lo - start, hi - lo))
    return out
