"""Entry points of SGLang's subprocesses that install the CPU pieces before SGLang loads.

SGLang starts its scheduler, detokenizer and data-parallel controller with
multiprocessing's *spawn* method. A spawned child unpickles its target function
first, which imports the target's module, and on the CPU engine that import
chain reaches ``from sgl_kernel import ...`` before the function can call
``load_plugins()``. So in the launching process the plugin replaces those
targets with the functions below: they live in this module, so unpickling them
imports this module first, which installs the CPU pieces (or, on CUDA without
``sgl_kernel``, :mod:`sglang_cacheflow.sglang.cuda`); then they call SGLang's own function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from sglang_cacheflow.sglang.cpu.install import install
from sglang_cacheflow.sglang.cuda.install import install as install_cuda

# (module, function) of every spawn target this module stands in for.
TARGETS: tuple[tuple[str, str], ...] = (
    ("sglang.srt.managers.scheduler", "run_scheduler_process"),
    ("sglang.srt.managers.detokenizer_manager", "run_detokenizer_process"),
    ("sglang.srt.managers.data_parallel_controller", "run_data_parallel_controller_process"),
)

_originals: dict[tuple[str, str], Callable[..., Any]] = {}


def _call(module_name: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    original = _originals.get((module_name, name))
    if original is None:
        original = getattr(importlib.import_module(module_name), name)
        if getattr(original, "__module__", None) == __name__:
            original = _originals[(module_name, name)]
    return original(*args, **kwargs)


def run_scheduler_process(*args: Any, **kwargs: Any) -> Any:
    """SGLang's ``run_scheduler_process``, after installing the CPU pieces."""
    return _call(*TARGETS[0], args, kwargs)


def run_detokenizer_process(*args: Any, **kwargs: Any) -> Any:
    """SGLang's ``run_detokenizer_process``, after installing the CPU pieces."""
    return _call(*TARGETS[1], args, kwargs)


def run_data_parallel_controller_process(*args: Any, **kwargs: Any) -> Any:
    """SGLang's ``run_data_parallel_controller_process``, after installing the CPU pieces."""
    return _call(*TARGETS[2], args, kwargs)


_STAND_INS: dict[str, Callable[..., Any]] = {
    "run_scheduler_process": run_scheduler_process,
    "run_detokenizer_process": run_detokenizer_process,
    "run_data_parallel_controller_process": run_data_parallel_controller_process,
}


def substitute(module: ModuleType) -> None:
    """Replace the spawn target defined in ``module`` with its stand-in here."""
    for module_name, name in TARGETS:
        if module.__name__ != module_name:
            continue
        current = getattr(module, name, None)
        stand_in = _STAND_INS[name]
        if current is None or current is stand_in:
            return
        _originals[(module_name, name)] = current
        setattr(module, name, stand_in)


# Last, so that install() finds TARGETS and substitute when it imports this module.
install()
install_cuda()
