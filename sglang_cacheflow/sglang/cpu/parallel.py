"""Several ranks (``--tp``, ``--dp``, ``--pp``) of SGLang's CPU engine on one machine.

SGLang 0.5.23 stops a CPU server with more ranks than NUMA nodes unless
``SGLANG_CPU_OMP_THREADS_BIND`` names each rank's cores, and it only applies that
binding through ``sgl_kernel`` ops this machine lacks. It also builds an NCCL
communicator for every TP group off NPU/XPU, and torch's CUDA build ships libnccl,
so a CPU rank fails with "Expected a cuda device, but got: cpu". Installed into
every process of a CPU server (:mod:`sglang_cacheflow.sglang.cpu.install`), this module:

- gives each rank an equal share of the cores this process may run on when the
  variable is unset and ranks outnumber NUMA nodes (``"0|1"`` for two ranks on two
  cores), says so in the log, and pins the rank's process and torch's thread
  count to its share, which SGLang's own path does only with AMX kernels;
- creates no NCCL communicator for a CPU group: collectives stay on gloo.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"
"""SGLang's per-rank core list: ``"0-15|16-31"``, one ``|``-separated group per rank."""


def split_cores(cores: Sequence[int], ranks: int) -> list[list[int]]:
    """Each rank's cores: contiguous equal shares, the first ranks taking one more
    where they do not divide; with more ranks than cores, ranks share cores in turn."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    cores = sorted(cores)
    if not cores:
        raise ValueError("no cores to bind")
    if ranks > len(cores):
        return [[cores[r % len(cores)]] for r in range(ranks)]
    base, extra = divmod(len(cores), ranks)
    shares, start = [], 0
    for r in range(ranks):
        n = base + (1 if r < extra else 0)
        shares.append(cores[start : start + n])
        start += n
    return shares


def format_cores(cores: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0-2,5"`` (the form ``SGLANG_CPU_OMP_THREADS_BIND`` takes)."""
    parts: list[str] = []
    cores = sorted(cores)
    i = 0
    while i < len(cores):
        j = i
        while j + 1 < len(cores) and cores[j + 1] == cores[j] + 1:
            j += 1
        parts.append(str(cores[i]) if i == j else f"{cores[i]}-{cores[j]}")
        i = j + 1
    return ",".join(parts)


def parse_cores(text: str) -> list[int]:
    """``"0-2,5"`` as ``[0, 1, 2, 5]``; ValueError on anything else."""
    cores: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            cores.extend(range(int(lo), int(hi) + 1))
        else:
            cores.append(int(part))
    return cores


def default_binding(ranks: int, cores: Sequence[int] | None = None) -> str:
    """The ``SGLANG_CPU_OMP_THREADS_BIND`` value giving ``ranks`` ranks equal shares."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    return "|".join(format_cores(share) for share in split_cores(cores, ranks))


def _pin(cores: list[int]) -> None:
    import torch

    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))


def _wrap_binding(module: ModuleType) -> None:
    """Wrap ``numa_utils.init_threads_binding`` (called once per rank process)."""
    original: Callable[..., Any] = module.init_threads_binding
    if getattr(original, "__cacheflow__", False):
        return

    def init_threads_binding(*, numa_index: int, world_size: int) -> Any:
        nodes = len(module.get_cpu_ids_by_node()) or 1
        if not os.environ.get(BIND_ENV) and world_size > nodes:
            os.environ[BIND_ENV] = default_binding(world_size)
            logger.info(
                "sglang-cacheflow: %d ranks on %d NUMA node(s): %s=%s",
                world_size, nodes, BIND_ENV, os.environ[BIND_ENV],
            )  # fmt: skip
        local = original(numa_index=numa_index, world_size=world_size)
        try:
            cores = parse_cores(str(local)) if not isinstance(local, list) else list(local)
            _pin(cores)
        except (ValueError, OSError) as exc:
            logger.warning("sglang-cacheflow: rank %d not pinned to %r: %s", numa_index, local, exc)
        else:
            logger.info("sglang-cacheflow: rank %d on cores %s", numa_index, format_cores(cores))
        return local

    init_threads_binding.__cacheflow__ = True  # type: ignore[attr-defined]
    module.init_threads_binding = init_threads_binding


def _cpu_free_nccl(module: ModuleType) -> None:
    """Make ``pynccl.PyNcclCommunicator(...)`` give no communicator for a CPU group."""
    original = module.PyNcclCommunicator
    if getattr(original, "__cacheflow__", False):
        return

    def communicator(*args: Any, **kwargs: Any) -> Any:
        device = kwargs.get("device", args[1] if len(args) > 1 else None)
        if str(device).startswith("cpu"):
            return None
        return original(*args, **kwargs)

    communicator.__cacheflow__ = True  # type: ignore[attr-defined]
    module.PyNcclCommunicator = communicator


def install(when_imported: Callable[[str, Callable[[ModuleType], None]], None]) -> None:
    """Register both patches to run when SGLang imports their modules."""
    when_imported("sglang.srt.utils.numa_utils", _wrap_binding)
    when_imported("sglang.srt.distributed.device_communicators.pynccl", _cpu_free_nccl)
