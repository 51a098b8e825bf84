"""tier-bench end to end on a private redis-server (tiny pages: this checks the tool, the
figures in docs/benchmarks.md come from full-size runs)."""

from __future__ import annotations

import json

import pytest

from sglang_cacheflow.bench import tiers as bench
from sglang_cacheflow.testing.redis import RedisServer

pytestmark = pytest.mark.redis


def test_json_report_with_redis_benchmark(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--url", redis_server.url, "--pages", "4", "--shape", "tiny", "--page-tokens",
            "32", "--repeat", "1", "--layer-range", "1:3", "--redis-benchmark",
            "--json"]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "L4-kv-t32-h2-d16-bf16" and report["emulated"] is False
    assert report["direct_io"] is True and report["rounds"] == 1 and report["connections"] == 2
    ops = {r["op"]: r for r in report["results"]}
    assert set(ops) == {"set", "get", "get layers 1:3"}
    assert all(r["gbps"] > 0 and r["page_ms"] > 0 for r in ops.values())
    assert all(r["cpu_us_per_page"] > 0 for r in ops.values())
    assert ops["get layers 1:3"]["bytes_per_page"] * 2 == ops["get"]["bytes_per_page"]
    assert report["redis_benchmark_gbps"]["get"] > 0
    assert report["redis_benchmark_get_hit_fraction"] == [1.0]  # every GET found a value
    assert set(report["share_of_redis_benchmark"]) == {"set", "get"}
    assert set(report["share_of_redis_benchmark_median_round"]) == {"set", "get"}
    # Neither the benchmark's pages nor redis-benchmark's keys are left behind.
    assert redis_server.cli("--scan", "--pattern", "key:*").strip() == ""
    assert "tier-bench" not in redis_server.cli("--scan", "--pattern", "cf1:tier-bench*")


def test_emulated_run_is_labelled(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--pages", "2", "--shape", "tiny", "--page-tokens", "16", "--repeat", "1",
            "--emulate", "1gbps+1ms"]  # fmt: skip
    assert bench.main(argv) == 0  # starts and stops its own redis-server
    out = capsys.readouterr().out
    assert out.startswith("EMULATED link emulated[1 Gbps + 1 ms](redis)")
    assert "(private, started by tier-bench)" in out


def test_bad_layer_range_says_how_to_write_it() -> None:
    with pytest.raises(SystemExit, match="A:B"):
        bench.main(["--shape", "tiny", "--layer-range", "1-3"])
