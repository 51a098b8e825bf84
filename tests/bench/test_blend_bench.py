"""`sglang-cacheflow blend-bench` end to end, tiny: SmolLM2 (bf16), real ShareGPT text, a
private redis-server behind an emulated link. Checks what the report says, never timings."""

import json

import pytest

from sglang_cacheflow.cli import main

pytestmark = [pytest.mark.redis, pytest.mark.slow]

TINY = ["--dtypes", "bf16", "--prompts", "2", "--docs", "2", "--doc-tokens", "64",
        "--answer-tokens", "4", "--ratios", "0,0.3,1", "--ttft-prompts", "1", "--ttft-docs", "3",
        "--ttft-doc-tokens", "64", "--ttft-dtype", "bf16", "--link", "1gbps"]  # fmt: skip


def test_blend_bench_reports_quality_and_ttft(smollm2_path, tmp_path):
    assert main(["blend-bench", *TINY, "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "blend.json").read_text())
    rows = {(r["selection"], r["ratio"]): r for r in doc["quality"]}
    methods = ("offline (probe)", "offline (spectral)", "online", "random")
    assert set(rows) == {("plain", 0.0), ("full", 1.0), *((m, 0.3) for m in methods)}
    assert all(r["prompts"] == 2 for r in rows.values())
    full, plain = rows["full", 1.0], rows["plain", 0.0]
    assert full["recomputed_share"] == 1.0 and plain["recomputed_share"] == 0.0
    # full recompute through the reuse path differs from full recompute by bf16 rounding
    # only; plain reuse by the cross-chunk attention it lacks
    assert full["kl"] < plain["kl"] and full["first_kl"] < plain["first_kl"]
    assert plain["beats_plain"] == 0.0 and 0.0 <= rows["random", 0.3]["beats_plain"] <= 1.0
    for m in methods:
        assert 0.3 <= rows[m, 0.3]["recomputed_share"] < 1.0
    ttft = doc["ttft"]
    assert {r["tier"].split(" ")[0] for r in ttft} == {"host", "redis"}
    assert all(r["ratio"] >= 0.15 and r["loaded_mb"] > 0 and r["predicted_s"] > 0 for r in ttft)
    assert (tmp_path / "blend.png").stat().st_size > 0
    assert "| bf16 | plain | 0% |" in (tmp_path / "blend.md").read_text()
