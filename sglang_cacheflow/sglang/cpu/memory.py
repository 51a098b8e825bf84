"""Byte views of host memory, addressed the way SGLang's KV kernels address it.

The CUDA/Triton kernels this package replaces receive a base address (a tensor's
``data_ptr()`` or an entry of a ``uint64`` pointer table), a row stride and a row
width, all in bytes. These helpers turn such a description into a ``uint8`` tensor
view over the same memory, so the copies themselves are plain torch indexing.
"""

from __future__ import annotations

import ctypes

import torch


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D ``uint8`` view from ``tensor.data_ptr()`` to the end of its storage."""
    if tensor.device.type != "cpu":
        raise ValueError(f"expected a CPU tensor, got one on {tensor.device}")
    whole = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
    return whole[tensor.storage_offset() * tensor.element_size() :]


def address_bytes(address: int, nbytes: int) -> torch.Tensor:
    """A 1-D ``uint8`` view of ``nbytes`` of host memory starting at ``address``.

    The caller vouches that the range is live, as the CUDA kernels' callers do for
    the pointer tables they pass; nothing here can check it.
    """
    if address <= 0:
        raise ValueError(f"invalid host address {address:#x}")
    if nbytes <= 0:
        return torch.empty(0, dtype=torch.uint8)
    buffer = (ctypes.c_uint8 * nbytes).from_address(address)
    return torch.frombuffer(buffer, dtype=torch.uint8)


def row_view(
    buffer: torch.Tensor, *, offset: int, stride: int, width: int, rows: int
) -> torch.Tensor:
    """``rows`` rows of ``width`` bytes, the first at ``offset``, ``stride`` bytes apart.

    ``buffer`` is a 1-D ``uint8`` view (from :func:`tensor_bytes` or
    :func:`address_bytes`); the result aliases it, so writes land in the original
    memory. Raises if the last row would end past the buffer.
    """
    if rows <= 0:
        return buffer.new_empty((0, width))
    end = offset + (rows - 1) * stride + width
    if offset < 0 or end > buffer.numel():
        raise IndexError(f"rows [{offset}, {end}) fall outside a buffer of {buffer.numel()} bytes")
    return buffer.as_strided((rows, width), (stride, 1), buffer.storage_offset() + offset)


def pointer_rows(address: int, *, offset: int, stride: int, width: int, rows: int) -> torch.Tensor:
    """:func:`row_view` over raw memory at ``address``, sized to exactly ``rows`` rows."""
    if rows <= 0:
        return torch.empty((0, width), dtype=torch.uint8)
    extent = offset + (rows - 1) * stride + width
    return row_view(
        address_bytes(address, extent), offset=offset, stride=stride, width=width, rows=rows
    )


def tensor_rows(
    tensor: torch.Tensor, *, offset: int, stride: int, width: int, rows: int
) -> torch.Tensor:
    """:func:`row_view` over the memory of ``tensor`` from its ``data_ptr()`` on."""
    return row_view(tensor_bytes(tensor), offset=offset, stride=stride, width=width, rows=rows)


def pointers(table: torch.Tensor) -> list[int]:
    """The addresses in a ``uint64`` pointer table, as Python ints."""
    if table.dtype not in (torch.uint64, torch.int64):
        raise TypeError(f"pointer tables are uint64, got {table.dtype}")
    return [int(p) & 0xFFFF_FFFF_FFFF_FFFF for p in table.view(torch.int64).tolist()]
