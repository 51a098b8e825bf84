"""Install the CPU pieces into a process that runs SGLang's CPU engine.

What :func:`install` does, once per process:

- registers a ``sgl_kernel`` module (and ``sgl_kernel.kvcacheio``) in
  ``sys.modules`` holding this package's torch implementations. It registers no
  ``torch.ops.sgl_kernel`` op: SGLang takes its Intel AMX paths only when
  ``torch.ops.sgl_kernel.convert_weight_packed`` exists, and every layer must
  take its ``forward_native`` path here;
- binds the ``transfer_kv_*`` functions into SGLang's host pool modules, which
  import them only on CUDA, HIP and XPU;
- registers the plain host allocator for device ``"cpu"``;
- with ``SGLANG_CACHEFLOW_HICACHE_RESERVE_GB`` set, replaces the 10 GiB of host
  RAM SGLang keeps free before sizing a HiCache host pool (a GPU-server rule;
  on a small CPU machine the device pool itself is host RAM);
- registers the ``cacheflow_cpu`` attention backend and its CLI choice;
- lets several ranks share the machine's cores (``--tp 2`` on one NUMA node) with
  collectives on gloo (:mod:`sglang_cacheflow.sglang.cpu.parallel`);
- routes SGLang's spawned subprocesses through :mod:`sglang_cacheflow.sglang.cpu.processes`;
- installs the test fault named by ``SGLANG_CACHEFLOW_FAULT``, if any
  (:mod:`sglang_cacheflow.sglang.cpu.faults`).

:func:`should_install` says whether a process needs any of it: SGLang runs its
CPU engine (``SGLANG_USE_CPU_ENGINE=1`` on an x86-64 or arm64 host) and no real
``sgl_kernel`` is importable.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import platform
import sys
import threading
from types import ModuleType

logger = logging.getLogger(__name__)

STAND_IN_MARKER = "__sglang_cacheflow_cpu__"
"""Attribute set on the ``sgl_kernel`` stand-in module, to tell it from the real one."""

ATTENTION_BACKEND = "cacheflow_cpu"
"""``--attention-backend`` value of the backend in :mod:`sglang_cacheflow.sglang.cpu.attention`."""

HOST_POOL_MODULES: tuple[str, ...] = (
    "sglang.srt.mem_cache.pool_host.mha",
    "sglang.srt.mem_cache.pool_host.mla",
    "sglang.srt.mem_cache.pool_host.unified",
)
"""Modules that import ``transfer_kv_*`` from ``sgl_kernel.kvcacheio`` only off CPU."""

HICACHE_RESERVE_ENV = "SGLANG_CACHEFLOW_HICACHE_RESERVE_GB"
"""Host RAM (GiB) HiCache must leave free; SGLang's own reserve (10 GiB) when unset."""

_lock = threading.Lock()
_installed = False


def cpu_engine_requested() -> bool:
    """What SGLang's ``is_cpu()`` answers, without importing SGLang."""
    if os.environ.get("SGLANG_USE_CPU_ENGINE", "0") != "1":
        return False
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "aarch64", "arm64")


def real_sgl_kernel_available() -> bool:
    """True when a real ``sgl_kernel`` package (not this stand-in) can be imported."""
    module = sys.modules.get("sgl_kernel")
    if module is not None:
        return not getattr(module, STAND_IN_MARKER, False)
    try:
        return importlib.util.find_spec("sgl_kernel") is not None
    except (ImportError, ValueError):
        return False


def should_install() -> bool:
    """SGLang runs its CPU engine and no real ``sgl_kernel`` exists."""
    return cpu_engine_requested() and not real_sgl_kernel_available()


def stand_in_module(name: str, functions: dict[str, object], *, package: bool) -> ModuleType:
    """A module ``name`` holding ``functions``, marked as this project's stand-in."""
    module = ModuleType(name, f"Torch implementations of {name} (sglang-cacheflow).")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []
    module.__file__ = None
    setattr(module, STAND_IN_MARKER, True)
    for key, value in functions.items():
        setattr(module, key, value)
    return module


def registered_stand_in() -> ModuleType | None:
    """The ``sgl_kernel`` stand-in already in ``sys.modules``, if any; raises if the
    module there is the real one."""
    existing = sys.modules.get("sgl_kernel")
    if existing is not None and not getattr(existing, STAND_IN_MARKER, False):
        raise RuntimeError("a real sgl_kernel is already imported")
    return existing


def install_sgl_kernel() -> ModuleType:
    """Register the ``sgl_kernel`` stand-in in ``sys.modules`` and return it."""
    from sglang_cacheflow.sglang.cpu.kernels import KERNEL_FUNCTIONS
    from sglang_cacheflow.sglang.cpu.speculative import SPECULATIVE_FUNCTIONS
    from sglang_cacheflow.sglang.cpu.transfer import KVCACHEIO_FUNCTIONS

    existing = registered_stand_in()
    if existing is not None:
        return existing
    kvcacheio = stand_in_module("sgl_kernel.kvcacheio", KVCACHEIO_FUNCTIONS, package=False)
    root = stand_in_module(
        "sgl_kernel", {**KERNEL_FUNCTIONS, **SPECULATIVE_FUNCTIONS}, package=True
    )
    root.kvcacheio = kvcacheio
    sys.modules["sgl_kernel.kvcacheio"] = kvcacheio
    sys.modules["sgl_kernel"] = root
    return root


def _bind_transfers(module: ModuleType) -> None:
    from sglang_cacheflow.sglang.cpu.transfer import KVCACHEIO_FUNCTIONS

    for name, fn in KVCACHEIO_FUNCTIONS.items():
        if not hasattr(module, name):
            setattr(module, name, fn)


def _register_allocator(module: ModuleType) -> None:
    from sglang_cacheflow.sglang.cpu.allocator import alloc_host_buffer

    module.ALLOC_MEMORY_FUNCS["cpu"] = alloc_host_buffer


def _register_attention_backend(module: ModuleType) -> None:
    from sglang_cacheflow.sglang.cpu.attention import create_cpu_attn_backend

    module.register_attention_backend(ATTENTION_BACKEND)(create_cpu_attn_backend)


def _add_attention_choice(module: ModuleType) -> None:
    if ATTENTION_BACKEND not in module.ATTENTION_BACKEND_CHOICES:
        module.add_attention_backend_choices([ATTENTION_BACKEND])


def _set_hicache_reserve(module: ModuleType) -> None:
    value = os.environ.get(HICACHE_RESERVE_ENV)
    if value:
        module.HICACHE_HOST_MEMORY_RESERVE_BYTES = int(float(value) * 1024**3)


def install() -> bool:
    """Install every CPU piece into this process if :func:`should_install`; idempotent.

    Returns whether the pieces are installed.
    """
    global _installed
    with _lock:
        if _installed:
            return True
        if not should_install():
            return False
        _installed = True
    from sglang_cacheflow.sglang.cpu.imports import when_imported

    install_sgl_kernel()
    for name in HOST_POOL_MODULES:
        when_imported(name, _bind_transfers)
    when_imported("sglang.srt.mem_cache.pool_host.common", _register_allocator)
    if os.environ.get(HICACHE_RESERVE_ENV):
        when_imported("sglang.srt.mem_cache.pool_host.base", _set_hicache_reserve)
    when_imported("sglang.srt.arg_groups.choices", _add_attention_choice)
    when_imported("sglang.srt.layers.attention.attention_registry", _register_attention_backend)

    from sglang_cacheflow.sglang.cpu import parallel

    parallel.install(when_imported)

    from sglang_cacheflow.sglang.cpu.faults import install_requested_fault

    install_requested_fault()

    from sglang_cacheflow.sglang.cpu import processes

    for module_name, _ in processes.TARGETS:
        when_imported(module_name, processes.substitute)
    logger.info("sglang-cacheflow: CPU kernels, HiCache transfers and attention installed")
    return True
