"""`sglang-cacheflow overlap-bench` end to end on the tiny Llama and a private redis-server
(a few tokens: this checks the tool; figures come from full-size runs, docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sglang_cacheflow.cli import main

pytestmark = pytest.mark.redis


def test_report_has_a_row_per_layer_count(tiny_llama_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "overlap.json"
    argv = ["overlap-bench", "--model", str(tiny_llama_path), "--tokens", "16",
            "--page-tokens", "4", "--groups", "2", "--layers", "1,4", "--rounds", "1",
            "--link", "10gbps", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["pages"] == 4 and report["groups"] == 2 and report["read_cpu_ms"] > 0
    assert [r["layers"] for r in report["results"]] == [1, 4]
    for row in report["results"]:
        assert row["alone_ms"] > 0 and row["beside_ms"] > 0
        assert row["delay_ms"] == pytest.approx(row["beside_ms"] - row["alone_ms"])


def test_bad_arguments_say_what_to_change(tiny_llama_path: Path) -> None:
    with pytest.raises(SystemExit, match="--layers"):
        main(["overlap-bench", "--model", str(tiny_llama_path), "--layers", "9"])
    with pytest.raises(SystemExit, match="at least 1"):
        main(["overlap-bench", "--model", str(tiny_llama_path), "--groups", "0"])
    with pytest.raises(SystemExit, match="multiple of --page-tokens"):
        main(["overlap-bench", "--model", str(tiny_llama_path), "--tokens", "10",
              "--page-tokens", "4"])  # fmt: skip
