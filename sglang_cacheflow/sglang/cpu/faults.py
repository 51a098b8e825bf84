"""Fault injection for tests: corrupt the KV that HiCache loads back from host.

A test that checks "the KV restored from host gives the same output as the KV
computed on device" needs a negative control: the same check must fail when the
restored KV is wrong. With ``SGLANG_CACHEFLOW_FAULT=zero-host-loads`` in the
server's environment, every host -> device layer load is followed by writing
zeros into the device rows it just filled. With ``SGLANG_CACHEFLOW_FAULT_FILE``
also set, the fault applies only while that file exists, so one server can serve
the positive check and then the negative control. Nothing happens without the
variables.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

FAULT_ENV = "SGLANG_CACHEFLOW_FAULT"
FAULT_FILE_ENV = "SGLANG_CACHEFLOW_FAULT_FILE"
ZERO_HOST_LOADS = "zero-host-loads"
_PATCHED = "__sglang_cacheflow_fault__"


def requested_fault() -> str | None:
    """The fault named in the environment, if any."""
    value = os.environ.get(FAULT_ENV, "").strip()
    return value or None


def _armed() -> bool:
    switch = os.environ.get(FAULT_FILE_ENV)
    return not switch or os.path.exists(switch)


def _zero_loaded_rows(
    load: Callable[..., None],
) -> Callable[..., None]:
    @functools.wraps(load)
    def load_then_zero(
        self: Any,
        device_pool: Any,
        host_indices: Any,
        device_indices: Any,
        layer_id: int,
        io_backend: str,
        **kwargs: Any,
    ) -> None:
        load(self, device_pool, host_indices, device_indices, layer_id, io_backend, **kwargs)
        if not _armed():
            return
        rows = device_indices.reshape(-1).to(device="cpu").long()
        for getter in ("get_key_buffer", "get_value_buffer"):
            buffer = getattr(device_pool, getter)(layer_id)
            buffer.index_fill_(0, rows.to(buffer.device), 0)

    setattr(load_then_zero, _PATCHED, True)
    return load_then_zero


def _patch_host_pool_base(module: ModuleType) -> None:
    cls = module.HostKVCache
    current = cls.load_to_device_per_layer_physical
    if getattr(current, _PATCHED, False):
        return
    cls.load_to_device_per_layer_physical = _zero_loaded_rows(current)
    logger.warning("sglang-cacheflow fault injection: host -> device KV loads are zeroed")


def install_requested_fault() -> None:
    """Install the fault named by ``SGLANG_CACHEFLOW_FAULT``; reject unknown names."""
    fault = requested_fault()
    if fault is None:
        return
    if fault != ZERO_HOST_LOADS:
        raise ValueError(f"unknown {FAULT_ENV} value {fault!r}; known: {ZERO_HOST_LOADS}")
    from sglang_cacheflow.sglang.cpu.imports import when_imported

    when_imported("sglang.srt.mem_cache.pool_host.base", _patch_host_pool_base)
