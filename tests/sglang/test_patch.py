"""patch-sglang: applies to SGLang 0.5.23, idempotent, reverts, refuses other versions; after it
the flags are native (in ``--help``, resolved by SGLang's own pipeline).

The patch is applied to an overlay of the installed SGLang (symlinks, with the two patched
files' package copied), never to the installed package itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_cacheflow.planner import POLICIES
from sglang_cacheflow.sglang import patch as sp
from sglang_cacheflow.testing.server import CPU_ENV


def _overlay(tmp: Path) -> Path:
    src = sp.sglang_root() / "sglang"

    def build(s: Path, d: Path, copy: list[str]) -> None:
        d.mkdir(parents=True)
        for e in s.iterdir():
            if e.name == "__pycache__":
                continue
            if copy and e.name == copy[0]:
                if len(copy) == 1:
                    shutil.copytree(e, d / e.name, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    build(e, d / e.name, copy[1:])
            else:
                os.symlink(e, d / e.name)

    build(src, tmp / "sglang", ["srt", "arg_groups"])
    return tmp


def _run(*argv: str) -> int:
    return sp.main(list(argv))


def test_apply_check_revert_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _overlay(tmp_path)
    memory = root / "sglang/srt/arg_groups/fields/memory.py"
    original = memory.read_text()
    assert _run("--sglang-root", str(root), "--check") == 1
    assert _run("--sglang-root", str(root)) == 0
    patched = memory.read_text()
    assert "enable_cacheflow" in patched and patched != original
    assert _run("--sglang-root", str(root)) == 0
    assert "already applied" in capsys.readouterr().out
    assert memory.read_text() == patched
    assert _run("--sglang-root", str(root), "--check") == 0
    assert _run("--sglang-root", str(root), "--revert") == 0
    assert memory.read_text() == original
    assert _run("--sglang-root", str(root), "--revert") == 0
    assert "nothing to revert" in capsys.readouterr().out
    # a hand-edited tree is refused, untouched
    memory.write_text(original.replace("radix_cache_backend", "radix_cache_backnd"))
    assert _run("--sglang-root", str(root)) == 2
    assert "matches neither" in capsys.readouterr().err


def test_other_sglang_version_is_refused() -> None:
    assert sp.check_version("0.5.23") == "0.5.23"
    with pytest.raises(sp.PatchError, match=r"this patch is for SGLang 0\.5\.23 only"):
        sp.check_version("0.5.22")


@pytest.mark.slow
def test_native_flags_in_help_and_resolved(tmp_path: Path, tiny_llama_path: Path) -> None:
    root = _overlay(tmp_path)
    assert _run("--sglang-root", str(root)) == 0
    env = {**os.environ, **CPU_ENV, "PYTHONPATH": str(root)}
    help_text = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--help"],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    # the patch spells the policy names out (SGLang's flags cannot import this package):
    # they must be the planner's
    listed = re.search(r"--cacheflow-policy \{([a-z,]+)\}", help_text)
    assert listed is not None and set(listed.group(1).split(",")) == set(POLICIES)
    assert "--enable-cacheflow" in help_text and "--cacheflow-config" in help_text
    script = f"""
import json
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.arg_groups.overrides import resolving_view
from sglang.srt.server_args import prepare_server_args
sa = prepare_server_args(["--model-path", {str(tiny_llama_path)!r}, "--device", "cpu",
    "--page-size", "16", "--max-total-tokens", "512", "--enable-cacheflow",
    "--cacheflow-policy", "load", "--cacheflow-config",
    json.dumps({{"redis_url": "redis://127.0.0.1:1/0", "chunk_tokens": 32}})])
sa.resolve_once()
v = resolving_view(sa)
print(json.dumps({{k: getattr(v, k) for k in ("cacheflow_policy", "enable_hierarchical_cache",
    "radix_cache_backend", "hicache_storage_backend", "hicache_storage_backend_extra_config")}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    resolved = json.loads(out.stdout.strip().splitlines()[-1])
    assert resolved["cacheflow_policy"] == "load"
    assert resolved["enable_hierarchical_cache"] is True
    assert resolved["radix_cache_backend"] == "cacheflow"
    assert resolved["hicache_storage_backend"] == "dynamic"
    extra = json.loads(resolved["hicache_storage_backend_extra_config"])
    assert extra["class_name"] == "CacheFlowRedisStorage" and extra["prefetch_threshold"] == 32
