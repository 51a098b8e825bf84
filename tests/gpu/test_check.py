"""The device run, dry on this CPU: ``run.sh``'s checks of its inputs and ``gpu-check``
end to end on SGLang's CPU engine (a forced token split and a forced load all on one server,
restored from Redis = no reuse)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sglang_cacheflow.cli import build_parser
from sglang_cacheflow.gpu import check

RUN_SH = Path(check.__file__).with_name("run.sh")


def _run_sh(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OUT", "BUNDLE")}
    return subprocess.run(
        ["bash", str(RUN_SH)], capture_output=True, text=True, env={**clean, **env}, timeout=60
    )


def test_run_sh_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(RUN_SH)], check=True)


def test_run_sh_needs_out() -> None:
    proc = _run_sh({})
    assert proc.returncode != 0
    assert "set OUT" in proc.stderr


def test_run_sh_stops_at_a_missing_bundle(tmp_path: Path) -> None:
    proc = _run_sh({"OUT": str(tmp_path), "BUNDLE": str(tmp_path / "none")})
    assert proc.returncode == 1
    assert "site.tar.xz" in (tmp_path / "run.log").read_text()


def test_unknown_shapes_are_refused() -> None:
    args = build_parser().parse_args(["gpu-check", "--shapes", "token-split,diagonal"])
    with pytest.raises(SystemExit, match=r"unknown \['diagonal'\]"):
        check.run(args)


@pytest.mark.sglang
@pytest.mark.redis
@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "exact.json"
    argv = ["gpu-check", "--device", "cpu", "--shapes", "token-split,load-all", "--prompts", "2"]
    args = build_parser().parse_args([*argv, "--prefix", "256", "--new", "8", "--out", str(out)])
    assert check.run(args) == 0
    report = json.loads(out.read_text())
    assert report["all_identical"] is True
    token, load_all = report["results"]
    # one server for both shapes, each restore forcing its own
    assert token["startup_s"] == load_all["startup_s"]
    for result in (token, load_all):
        assert result["identical"] == [True, True]
    assert [d.split(" ")[:2] for d in token["decisions"]] == [["token", "split"]] * 2
    assert token["loaded"] > 0 and token["recomputed"] > 0
    assert load_all["decisions"] == ["load all"] * 2, load_all
    assert load_all["loaded"] > 0 and load_all["recomputed"] == 0
