"""Run a function on a module right after it is imported (or now, if it already is).

The CPU pieces bind names into SGLang modules (the host pools' transfer
functions, the host allocator table, the attention registry). Importing those
modules eagerly from the plugin would slow down every SGLang process, including
the ones that never use them, so the binding waits for the module's own import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

Patch = Callable[[ModuleType], None]

_lock = threading.Lock()


class _PatchingLoader(importlib.abc.Loader):
    """Delegates to the real loader, then applies the patches to the new module."""

    def __init__(self, loader: Any, patches: list[Patch]) -> None:
        self._loader = loader
        self._patches = patches

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        for patch in self._patches:
            patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` entry that only intercepts the module names it was given."""

    def __init__(self) -> None:
        self.pending: dict[str, list[Patch]] = {}

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        with _lock:
            patches = self.pending.pop(fullname, None)
        if patches is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, patches)
                return spec
        with _lock:  # not found: keep the patches for a later attempt
            self.pending.setdefault(fullname, []).extend(patches)
        return None


_finder = _PatchOnImport()


def when_imported(module_name: str, patch: Patch) -> None:
    """Call ``patch(module)`` once ``module_name`` is imported; now if it already is."""
    module = sys.modules.get(module_name)
    if module is not None:
        patch(module)
        return
    with _lock:
        _finder.pending.setdefault(module_name, []).append(patch)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def pending() -> set[str]:
    """Names of the modules that still have patches waiting for their import."""
    with _lock:
        return set(_finder.pending)
