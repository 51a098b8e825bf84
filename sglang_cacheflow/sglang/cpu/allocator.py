"""Host KV buffers for HiCache when the "device" is the CPU itself.

SGLang picks the host pool's allocation function by device type from
``ALLOC_MEMORY_FUNCS`` (``srt/mem_cache/pool_host/common.py``); the default,
``alloc_with_host_register``, pins the buffer through ``cudaHostRegister``, which
fails without an NVIDIA driver. On CPU there is nothing to pin for: the device
pool and the host pool are both ordinary memory, so this allocates through the
pool's storage allocator (mmap, shared memory, ...) and stops there.
"""

from __future__ import annotations

from typing import Any

import torch


def alloc_host_buffer(
    dims: tuple[int, ...],
    dtype: torch.dtype,
    device: str,
    pin_memory: bool,
    allocator: Any,
    registration_granularity_bytes: int | None = None,
) -> torch.Tensor:
    """Allocate a host KV buffer of shape ``dims``; ``pin_memory`` has no meaning on CPU.

    ``allocator`` is the pool's ``HostTensorAllocator`` (or ``None``, as for the
    pin-memory allocators SGLang registers for NPU and XPU).
    """
    if str(device) != "cpu":
        raise ValueError(f"HiCache host buffers live in CPU memory, got device {device!r}")
    if allocator is None:
        return torch.empty(dims, dtype=dtype, device="cpu")
    return allocator.allocate(dims, dtype=dtype, device="cpu")
