"""The plugin entry point installs the CPU pieces only where they belong.

Each case runs in a fresh interpreter, because installing changes
``sys.modules`` and ``sys.meta_path`` for good.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

PROBE = textwrap.dedent(
    """
    import json, sys
    from importlib.metadata import entry_points

    (plugin,) = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "cacheflow"]
    plugin.load()()
    from sglang_cacheflow.sglang.cpu import imports, install

    state = {
        "sgl_kernel": "sgl_kernel" in sys.modules,
        "installed": install._installed,
        "cpu_patches": sorted(
            m for m in imports.pending() if m in install.HOST_POOL_MODULES
            or m.endswith(("pool_host.common", "attention_registry", "choices"))
        ),
        "scheduler_imported": "sglang.srt.managers.scheduler" in sys.modules,
    }
    if "--deep" in sys.argv:
        import pickle
        import torch
        from sglang.srt.layers.attention import attention_registry
        from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
        from sglang.srt.managers import scheduler
        from sglang.srt.mem_cache.pool_host import common, mha
        from sglang.srt.utils.common import _is_intel_amx_backend_available
        import sgl_kernel

        state.update(
            amx=_is_intel_amx_backend_available(),
            convert_weight_packed=hasattr(torch.ops.sgl_kernel, "convert_weight_packed"),
            transfer_module=mha.transfer_kv_per_layer_pf_lf.__module__,
            allocator=common.ALLOC_MEMORY_FUNCS["cpu"].__module__,
            backend="cacheflow_cpu" in attention_registry.ATTENTION_BACKENDS,
            choice="cacheflow_cpu" in ATTENTION_BACKEND_CHOICES,
            spawn_target=pickle.loads(pickle.dumps(scheduler.run_scheduler_process)).__module__,
            kernel_module=sgl_kernel.copy_all_layer_kv_cache_cpu.__module__,
            pending_but_imported=sorted(m for m in imports.pending() if m in sys.modules),
        )
    print("STATE=" + json.dumps(state))
    """
)


def _probe(env: dict[str, str], *args: str, tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    full_env = {k: v for k, v in os.environ.items() if k != "SGLANG_USE_CPU_ENGINE"}
    full_env.update(env)
    done = subprocess.run(
        [sys.executable, str(script), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("STATE=")]
    return json.loads(line.removeprefix("STATE="))


NOTHING = {"sgl_kernel": False, "installed": False, "cpu_patches": [], "scheduler_imported": False}


def test_no_effect_without_the_cpu_engine(tmp_path: Path) -> None:
    assert _probe({}, tmp_path=tmp_path) == NOTHING


def test_no_effect_when_a_real_sgl_kernel_exists(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "sgl_kernel"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("REAL = True\n")
    env = {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(tmp_path / "site")}
    assert _probe(env, tmp_path=tmp_path) == NOTHING  # found, not imported, not replaced


@pytest.mark.slow
def test_cpu_engine_gets_every_piece(tmp_path: Path) -> None:
    state = _probe({"SGLANG_USE_CPU_ENGINE": "1"}, "--deep", tmp_path=tmp_path)
    assert state["sgl_kernel"] is True and state["installed"] is True
    assert state["cpu_patches"]  # waiting for their modules before the imports
    assert state["pending_but_imported"] == []  # applied by each import
    assert state["amx"] is False and state["convert_weight_packed"] is False
    assert state["transfer_module"] == "sglang_cacheflow.sglang.cpu.transfer"
    assert state["allocator"] == "sglang_cacheflow.sglang.cpu.allocator"
    assert state["backend"] is True and state["choice"] is True
    assert state["spawn_target"] == "sglang_cacheflow.sglang.cpu.processes"
    assert state["kernel_module"] == "sglang_cacheflow.sglang.cpu.kernels"
