"""`sglang-cacheflow bench` on every workload, a few requests each, against a real server.

Checks the JSON's content (every turn answered, returning turns reuse their prefix, restore
counters read from /metrics), never timings.
"""

import json
from pathlib import Path

import pytest

from sglang_cacheflow.bench.workloads import WORKLOADS
from sglang_cacheflow.cli import main

pytestmark = [pytest.mark.sglang, pytest.mark.redis]

SMALL = ["--sessions", "2", "--turns", "2", "--requests", "6", "--max-prompt-tokens", "384",
         "--max-new-tokens", "2", "--concurrency", "2", "--request-rate", "20"]  # fmt: skip


@pytest.fixture(scope="module")
def cacheflow_server(sglang_servers, smollm2_path, redis_server):
    config = {"redis_url": redis_server.url, "link": "1gbps+0.2ms", "chunk_tokens": 64}
    return sglang_servers(
        smollm2_path,
        "--max-total-tokens", "4096", "--enable-metrics", "--enable-cacheflow",
        "--cacheflow-config", json.dumps(config),
        env={"SGLANG_CACHEFLOW_HICACHE_RESERVE_GB": "1"},
    )  # fmt: skip


def check_doc(path: Path, policies: list[str]) -> dict:
    doc = json.loads((path / "bench.json").read_text())
    assert [r["policy"] for r in doc["runs"]] == policies
    for run in doc["runs"]:
        reqs = run["requests"]
        assert reqs and all(not r["error"] for r in reqs)
        assert all(r["ttft_s"] > 0 and len(r["output_ids"]) >= 1 for r in reqs)
        returning = [r for r in reqs if r["returning"]]
        assert returning and run["summary"]["returning_turns"] == len(returning)
        assert run["summary"]["mean_ttft_returning_s"] > 0
    assert (path / "ttft_cdf.png").stat().st_size > 0
    return doc


@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_workload_against_a_running_server(cacheflow_server, workload, tmp_path):
    out = tmp_path / workload
    args = ["bench", "--url", cacheflow_server.base_url, "--workload", workload, *SMALL]
    if workload == "mooncake-synthetic":  # its first shared prefix comes back at row 49
        args += ["--requests", "52", "--trace-token-scale", "256"]
    assert main([*args, "--model", str(cacheflow_server.model_path), "--out", str(out)]) == 0
    doc = check_doc(out, ["as configured"])
    reqs = doc["runs"][0]["requests"]
    if workload in ("sharegpt", "agent", "long-doc"):
        # a returning turn extends its session's earlier prompt: the server finds that prefix
        assert all(r["cached_tokens"] > 0 for r in reqs if r["returning"])
    assert doc["meta"]["workload"] == workload


def test_launching_mode_reads_restore_counters(smollm2_path, redis_server, tmp_path):
    # one server launched by the bench itself, with a device pool too small for the chats
    args = [
        "bench", "--workload", "agent", "--policies", "cacheflow", "--l3-gbps", "1",
        "--redis-url", redis_server.url, "--max-total-tokens", "640", "--hicache-ratio", "1",
        "--model", str(smollm2_path), "--out", str(tmp_path),
    ]  # fmt: skip
    small = [a for a in SMALL]
    small[small.index("--sessions") + 1] = "8"  # 8 agents x 192 tokens: more than the pool
    assert main([*args, *small]) == 0
    doc = check_doc(tmp_path, ["cacheflow"])
    run = doc["runs"][0]
    assert run["bandwidth_gbps"] == 1.0
    s = run["summary"]
    # the agents' contexts were evicted and came back: something was restored
    assert s["tokens_loaded"] + s["tokens_recomputed"] > 0
    # and /metrics' measured-over-predicted histogram says how many the plan timed right
    within10, within25 = s["predicted_within_10pct"], s["predicted_within_25pct"]
    assert within10 is not None and 0.0 <= within10 <= within25 <= 1.0, s
    assert s["server_start_s"] > 0


def test_sglang_bench_restores_from_redis(tiny_llama_path, tmp_path):
    # two policies, one link, two conversations: the rows and the decision logs are written
    out, logs = tmp_path / "rows.json", tmp_path / "logs"
    args = ["sglang-bench", "--model", str(tiny_llama_path), "--links", "1gbps+1ms",
            "--policies", "load,cake", "--order", "once", "--conversations", "2",
            "--prefix", "256", "--new", "4", "--repeats", "1", "--out", str(out),
            "--log-dir", str(logs), "--config", '{"stream_groups": 1}']  # fmt: skip
    assert main(args) == 0
    load, cake = json.loads(out.read_text())["rows"]
    assert (load["link"], load["policy"], cake["policy"]) == ("1gbps+1ms", "load", "cake")
    assert load["single_mean_s"] > 0 and load["together_mean_s"] > 0
    # every returning turn (2 one at a time, 2 together) was planned, from /metrics, and loaded
    assert load["decisions"] >= 4
    assert load["storage_tokens"] > 0
    assert set(load["shapes"]) == {"load all"}
    # Cake's order: returning turns recomputed their front while their back was read
    assert cake["shapes"].get("token split", 0) >= 1, cake["shapes"]
    # --config reached the servers: one layer group, so the splits spliced unstreamed
    cake_log = (logs / "1gbps+1ms-cake.log").read_text()
    assert "at the splice" in cake_log and "in the extend" not in cake_log
    for row in (load, cake):
        for key in ("predicted_within_10pct", "predicted_within_25pct"):
            assert 0.0 <= row[key]["all"] <= 1.0, row
        assert row["predicted_within_25pct"]["all"] >= row["predicted_within_10pct"]["all"]
