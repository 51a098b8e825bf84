"""Scenario files and the `plan` command."""

import json
from pathlib import Path

import pytest

from sglang_cacheflow.cli import main
from sglang_cacheflow.planner.scenario import ScenarioError, load_scenario, parse_scenario

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "scenarios").glob("*.json"))
BASE = {
    "model": {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "dtype_bytes": 2, "tp": 1},
    "compute": {"tokens_per_s": 20000, "attention_s_per_token_pair": 0.0},
    "tiers": {"redis": {"bandwidth_GBps": 2.5, "latency_ms": 0.5}},
    "chunk_tokens": 256,
    "requests": [{"id": "a", "device_tokens": 0, "spans": [["redis", 8192]], "new_tokens": 128}],
}


def test_examples_exist_and_load():
    assert len(EXAMPLES) >= 3
    for path in EXAMPLES:
        assert load_scenario(path).requests


def test_plan_json_has_the_documented_schema(capsys):
    assert main(["plan", str(EXAMPLES[0]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"policies", "bound"}
    assert set(out["policies"]) == {"recompute", "load", "cake", "cacheflow"}
    for p in out["policies"].values():
        assert {"requests", "mean_ttft_s", "makespan_s", "planner_time_ms"} <= set(p)
        for r in p["requests"].values():
            assert r["predicted_ttft_s"] > 0
            for s in r["steps"]:
                assert s["action"] in ("recompute", "load", "prefill")
                assert s["finish_s"] >= s["start_s"]
    assert out["policies"]["cacheflow"]["mean_ttft_s"] <= out["policies"]["load"]["mean_ttft_s"]
    assert out["bound"]["mean_ttft_s"] <= out["policies"]["cacheflow"]["mean_ttft_s"]


def test_plan_table_names_every_policy(capsys):
    assert main(["plan", str(EXAMPLES[0]), "--policy", "cacheflow"]) == 0
    out = capsys.readouterr().out
    assert (
        "cacheflow" in out and "fluid bound" in out and "recompute" not in out.split("summary")[1]
    )


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"model": {"num_layers": 32}}, "num_kv_heads"),
        ({"tiers": {"redis": {"latency_ms": 1}}}, "bandwidth_GBps"),
        ({"requests": [{"id": "a", "spans": [["ssd", 10]]}]}, "'ssd' is not in 'tiers'"),
        ({"requests": []}, "non-empty"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"compute": {"tokens_per_s": -1}}, "tokens_per_s must be > 0"),
    ],
)
def test_bad_scenarios_say_what_to_change(patch, match):
    with pytest.raises(ScenarioError, match=match):
        parse_scenario({**BASE, **patch})


def test_plan_command_reports_a_missing_file(capsys, tmp_path):
    assert main(["plan", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
