"""The CUDA stand-ins install only where they belong, and then what SGLang's CUDA path
imports resolves, while SGLang's own ``ImportError`` fallbacks still see what is missing.

Each case runs in a fresh interpreter: installing changes ``sys.modules`` and
``sys.meta_path`` for good.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from sglang_cacheflow.sglang.cuda import install


def _run(code: str, **env: str) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_")}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean, "PYTHONWARNINGS": "ignore", **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_nothing_installs_without_cuda() -> None:
    state = _run(
        """
        import json, sys
        from sglang_cacheflow.sglang.cuda.install import install, should_install
        print(json.dumps({"should": should_install(), "installed": install(),
                          "sgl_kernel": "sgl_kernel" in sys.modules}))
        """
    )
    assert state == {"should": False, "installed": False, "sgl_kernel": False}


def test_installed_stand_ins_serve_cuda_imports_and_leave_fallbacks() -> None:
    state = _run(
        """
        import json, os, sys
        from sglang_cacheflow.sglang.cuda.install import install
        assert install(check=lambda: True)
        from sgl_kernel import rmsnorm, silu_and_mul, int8_scaled_mm
        from sgl_kernel.utils import is_arch_support_pdl
        from sgl_kernel.kvcacheio import transfer_kv_direct, transfer_kv_per_layer
        from sgl_kernel.quantization import ggml_dequantize
        try:
            int8_scaled_mm()
            stub = "no error"
        except NotImplementedError as e:
            stub = str(e)
        try:
            import sgl_kernel.scalar_type
            missing = False
        except ImportError:
            missing = True
        from sglang.srt.layers.quantization.utils import get_scalar_types
        print(json.dumps({
            "pdl": is_arch_support_pdl(),
            "rmsnorm": rmsnorm.__module__,
            "direct": transfer_kv_direct.__module__,
            "stub": stub,
            "scalar_type_missing": missing,
            "scalar_types_mock": type(get_scalar_types()[1]).__name__,
            "env": {k: os.environ.get(k) for k in (
                "SGLANG_FORCE_FUSED_OP_BACKEND", "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK")},
            "again": install(check=lambda: False),
        }))
        """
    )
    assert state["pdl"] is False
    assert state["rmsnorm"] == "sglang_cacheflow.sglang.cuda.kernels"
    assert state["direct"] == "sglang_cacheflow.sglang.cpu.transfer"
    assert "sgl_kernel.int8_scaled_mm is not available" in state["stub"]
    assert state["scalar_type_missing"] is True
    assert state["scalar_types_mock"] == "MockScalarTypes"
    assert state["env"] == {
        "SGLANG_FORCE_FUSED_OP_BACKEND": "torch",
        "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",
    }
    assert state["again"] is True  # idempotent


def test_a_value_the_user_set_wins() -> None:
    state = _run(
        """
        import json, os
        from sglang_cacheflow.sglang.cuda.install import install
        install(check=lambda: True)
        print(json.dumps(os.environ["SGLANG_FORCE_FUSED_OP_BACKEND"]))
        """,
        SGLANG_FORCE_FUSED_OP_BACKEND="triton",
    )
    assert state == "triton"


def test_a_real_sgl_kernel_is_never_replaced() -> None:
    state = _run(
        """
        import json, sys, types
        sys.modules["sgl_kernel"] = types.ModuleType("sgl_kernel")
        from sglang_cacheflow.sglang.cuda import install
        try:
            install.install_sgl_kernel()
            print(json.dumps("replaced"))
        except RuntimeError as e:
            print(json.dumps(str(e)))
        """
    )
    assert state == "a real sgl_kernel is already imported"


def test_environment_and_flags_are_ones_sglang_accepts() -> None:
    """Every variable names an SGLang setting, the fused-op backend is one of its kernel
    backends, and SGLang's own parser takes the server flags."""
    import argparse

    from sglang.kernels.spec import KernelBackend
    from sglang.srt.environ import envs
    from sglang.srt.server_args import ServerArgs

    for name in install.ENV_DEFAULTS:
        assert hasattr(envs, name), name
    KernelBackend(install.ENV_DEFAULTS["SGLANG_FORCE_FUSED_OP_BACKEND"])
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "m", *install.SERVER_ARGS])
    assert (args.attention_backend, args.sampling_backend, args.hicache_io_backend) == (
        "triton",
        "pytorch",
        "direct",
    )


@pytest.mark.slow
def test_the_server_path_imports_under_faked_cuda() -> None:
    """What the bundle's probe does: every module of SGLang's server processes imports with
    ``torch.cuda`` faked, the stand-ins in place and nothing compiled from ``sgl_kernel``."""
    from sglang_cacheflow.gpu.bundle import imported_distributions

    dists = {d.lower() for d in imported_distributions()}
    assert {"sglang", "torch", "fastapi", "redis"} <= dists
    assert not any(d.startswith(("sgl-kernel", "sglang-kernel", "flashinfer")) for d in dists)
