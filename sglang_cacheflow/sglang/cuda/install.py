"""Install the ``sgl_kernel`` stand-ins into a process that runs SGLang on CUDA.

What :func:`install` does, once per process, when :func:`should_install`:

- registers a ``sgl_kernel`` package in ``sys.modules`` holding the torch bodies
  of :mod:`.kernels`; every other name in it or in the submodules of
  :data:`SUBMODULES` imports as a stand-in that raises
  :class:`NotImplementedError` naming itself when called;
- ``sgl_kernel.kvcacheio`` holds the ``direct`` HiCache transfers (tensor copies,
  any device) of :mod:`sglang_cacheflow.sglang.cpu.transfer`; the pointer-based
  ``kernel`` ones are stand-ins, hence ``--hicache-io-backend direct``;
- sets, unless already set, ``SGLANG_FORCE_FUSED_OP_BACKEND=torch`` (layers take
  their ``forward_native`` path instead of compiled kernels),
  ``SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python`` and
  ``SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1`` (start-up asks for the
  ``sglang-kernel`` distribution otherwise);
- without ``cutlass``, keeps Llama's MLP off the CuTe DSL dual GEMM;
- routes SGLang's spawned subprocesses through
  :mod:`sglang_cacheflow.sglang.cpu.processes`, which install this first.

:func:`should_install`: not SGLang's CPU engine, a CUDA device is visible, and no
real ``sgl_kernel`` is importable. On a GPU install with ``sgl_kernel`` nothing
is touched.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from sglang_cacheflow.sglang.cpu.install import (
    STAND_IN_MARKER,
    cpu_engine_requested,
    real_sgl_kernel_available,
    registered_stand_in,
    stand_in_module,
)

logger = logging.getLogger(__name__)

ENV_DEFAULTS: dict[str, str] = {
    "SGLANG_FORCE_FUSED_OP_BACKEND": "torch",
    "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python",
    "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",
}
"""Environment this setup needs; a value the user set wins."""

SERVER_ARGS: tuple[str, ...] = (
    "--attention-backend",
    "triton",
    "--sampling-backend",
    "pytorch",
    "--hicache-io-backend",
    "direct",
)
"""``launch_server`` flags that keep SGLang off the kernels this setup lacks."""

SUBMODULES: tuple[str, ...] = ("kvcacheio", "utils", "quantization")
"""``sgl_kernel`` submodules SGLang's CUDA path imports unguarded; any other submodule is
missing (``ImportError``), so that SGLang's own ``try``/``except ImportError`` fallbacks
(``sgl_kernel.scalar_type`` among them) take over."""

DIRECT_TRANSFERS: tuple[str, ...] = (
    "transfer_kv_direct",
    "transfer_kv_per_layer_direct_pf_lf",
    "transfer_kv_all_layer_direct_lf_pf",
)
"""``sgl_kernel.kvcacheio`` functions that copy tensor slices and so run on any device."""

_lock = threading.Lock()
_installed = False


def cuda_available() -> bool:
    """A CUDA device is visible to torch (imports torch: SGLang does so anyway)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None and torch.cuda.is_available()


def should_install() -> bool:
    """SGLang runs on CUDA (not its CPU engine) and no real ``sgl_kernel`` exists."""
    return not cpu_engine_requested() and not real_sgl_kernel_available() and cuda_available()


def cuda_server_args() -> list[str]:
    """:data:`SERVER_ARGS` where the stand-ins will serve (no real ``sgl_kernel``), else none."""
    return [] if real_sgl_kernel_available() else list(SERVER_ARGS)


def _stand_in(name: str, functions: dict[str, Any], *, package: bool) -> ModuleType:
    from sglang_cacheflow.sglang.cuda.kernels import unavailable

    module = stand_in_module(name, functions, package=package)

    prefix = name.removeprefix("sgl_kernel").lstrip(".")

    def __getattr__(attr: str) -> Any:  # PEP 562: the module's missing names
        if attr.startswith("__"):
            raise AttributeError(attr)
        return unavailable(f"{prefix}.{attr}" if prefix else attr)

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


def _submodule_functions(name: str) -> dict[str, Any]:
    from sglang_cacheflow.sglang.cuda.kernels import UTILS_FUNCTIONS

    if name == "sgl_kernel.utils":
        return dict(UTILS_FUNCTIONS)
    if name == "sgl_kernel.kvcacheio":
        from sglang_cacheflow.sglang.cpu.transfer import KVCACHEIO_FUNCTIONS

        return {key: KVCACHEIO_FUNCTIONS[key] for key in DIRECT_TRANSFERS}
    return {}


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the ``sgl_kernel`` submodules of :data:`SUBMODULES` as stand-in modules."""

    @classmethod
    def find_spec(
        cls, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        root = sys.modules.get("sgl_kernel")
        if fullname.removeprefix("sgl_kernel.") not in SUBMODULES:
            return None
        if not getattr(root, STAND_IN_MARKER, False):
            return None
        return importlib.machinery.ModuleSpec(fullname, cls, is_package=False)

    @classmethod
    def create_module(cls, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return _stand_in(spec.name, _submodule_functions(spec.name), package=False)

    @classmethod
    def exec_module(cls, module: ModuleType) -> None:
        parent, _, child = module.__name__.rpartition(".")
        setattr(sys.modules[parent], child, module)


def install_sgl_kernel() -> ModuleType:
    """Register the ``sgl_kernel`` stand-in package in ``sys.modules`` and return it."""
    from sglang_cacheflow.sglang.cuda.kernels import KERNEL_FUNCTIONS

    existing = registered_stand_in()
    if existing is not None:
        return existing
    root = _stand_in("sgl_kernel", dict(KERNEL_FUNCTIONS), package=True)
    sys.modules["sgl_kernel"] = root
    if _StandInFinder not in sys.meta_path:
        sys.meta_path.insert(0, _StandInFinder)
    return root


def _without_cutedsl_dual_gemm(module: ModuleType) -> None:
    """Llama's MLP asks for a CuTe DSL dual GEMM on CUDA, which needs ``cutlass``: none."""
    module.DualGemm._select_mode = lambda self, gate_up_proj, hidden_size: None


def install(*, check: Callable[[], bool] = should_install) -> bool:
    """Install the stand-ins into this process if ``check()``; idempotent.

    Returns whether they are installed.
    """
    global _installed
    with _lock:
        if _installed:
            return True
        if not check():
            return False
        _installed = True
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    install_sgl_kernel()
    from sglang_cacheflow.sglang.cpu import processes
    from sglang_cacheflow.sglang.cpu.imports import when_imported

    if importlib.util.find_spec("cutlass") is None:
        when_imported("sglang.srt.layers.dual_gemm", _without_cutedsl_dual_gemm)

    for module_name, _ in processes.TARGETS:
        when_imported(module_name, processes.substitute)
    logger.info("sglang-cacheflow: torch stand-ins of sgl_kernel installed for CUDA")
    return True
