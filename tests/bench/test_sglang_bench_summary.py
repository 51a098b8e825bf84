"""sglang-bench's arithmetic: the balanced link, T*, the gains over the better pure mode, and
the prediction accuracy it reads from ``/metrics``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sglang_cacheflow.bench.sglang.restore import _average, balanced_link, schedule, summarize
from sglang_cacheflow.bench.sglang.serving import (
    ServerSpec,
    link_prior,
    parse_restores,
    predicted_within,
)
from sglang_cacheflow.sglang.metrics import RATIO_BUCKETS


def test_the_balanced_link_loads_a_prefix_in_the_measured_recompute_time() -> None:
    # 512 tokens of 46080 bytes (SmolLM2, fp32) recomputed in 0.9 s: 8 * 23.6 MB / 0.9 s
    bits = balanced_link(512, 46080, 0.9)
    assert bits == pytest.approx(512 * 46080 * 8 / 0.9)
    assert 512 * 46080 * 8 / bits == pytest.approx(0.9)


def _row(link: str, policy: str, single: float, together: float) -> dict:
    return {"link": link, "policy": policy, "single_mean_s": single, "together_mean_s": together}


def test_summary_gains_and_t_star() -> None:
    rows = [
        _row("200mbps", "recompute", 1.0, 8.0),
        _row("200mbps", "load", 1.0, 6.0),
        _row("200mbps", "cake", 0.6, 5.0),
        _row("200mbps", "cacheflow", 0.55, 3.0),
        _row("800mbps", "recompute", 1.0, 8.0),  # no load row: no summary for this link
    ]
    (e,) = summarize(rows)
    assert e["link"] == "200mbps"
    assert e["t_star_single_s"] == pytest.approx(0.5)
    assert e["cacheflow_single_over_t_star"] == pytest.approx(1.1)
    assert e["cake_single_speedup"] == pytest.approx(1 / 0.6)
    assert e["cacheflow_together_speedup"] == pytest.approx(2.0)


def test_abba_runs_are_averaged_per_policy() -> None:
    a = {**_row("l", "cake", 0.6, 5.0), "shapes": {"token split": 3, "load all": 1}}
    b = {**_row("l", "cake", 0.8, 7.0), "shapes": {"token split": 4}}
    a["predicted_within_10pct"] = {"single": 1.0, "all": 0.5}
    b["predicted_within_10pct"] = {"single": 0.5, "all": None}
    avg = _average([a, b])
    assert avg["single_mean_s"] == pytest.approx(0.7) and avg["together_mean_s"] == 6.0
    assert avg["servers"] == 2 and len(avg["runs"]) == 2
    assert avg["shapes"] == {"token split": 7, "load all": 1}  # every server's restores
    assert avg["predicted_within_10pct"] == {"single": 0.75, "all": 0.5}


def test_recompute_brackets_the_abba_order() -> None:
    # after the first recompute server (which finds the balanced link): the other policies
    # forward then backward at the middle link, then recompute again
    others, links = ["load", "cake", "cacheflow"], ["0.5x", "1x", "2x"]
    plan = schedule(others, links, "abba-balanced", recompute=True)
    assert plan == [
        *[("0.5x", p) for p in others],
        *[("1x", p) for p in others + others[::-1]],
        ("1x", "recompute"),
        *[("2x", p) for p in others],
    ]
    # abba everywhere: recompute closes the last link; not compared: no second server
    plan = schedule(others, links[:2], "abba", recompute=True)
    assert [p for _, p in plan].count("recompute") == 1 and plan[-1] == ("1x", "recompute")
    assert ("1x", "recompute") not in schedule(others, links, "abba-balanced", recompute=False)
    assert schedule(others, links, "once", recompute=True) == [
        (link, p) for link in links for p in others
    ]


def test_prediction_accuracy_from_the_error_ratio_histogram() -> None:
    # the histogram the server exports, in a registry of the test's own
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    registry = CollectorRegistry()
    ratio = Histogram(
        "sglang:cacheflow_restore_error_ratio", "measured / predicted",
        buckets=RATIO_BUCKETS, registry=registry,
    )  # fmt: skip
    for r in (1.05, 0.95, 1.2, 0.7, 2.0):  # measured / predicted of five restores
        ratio.observe(r)
    first = parse_restores(generate_latest(registry).decode())
    assert predicted_within({}, first, 0.10) == pytest.approx(2 / 5)
    assert predicted_within({}, first, 0.25) == pytest.approx(3 / 5)
    for r in (1.0, 1.5):  # between two scrapes: only these count
        ratio.observe(r)
    second = parse_restores(generate_latest(registry).decode())
    assert predicted_within(first, second, 0.10) == pytest.approx(1 / 2)
    assert predicted_within(second, second, 0.10) is None  # nothing measured in between
    with pytest.raises(ValueError, match="no bucket"):
        predicted_within({}, first, 0.3)


def test_a_server_behind_an_emulated_link_starts_from_its_nominal_rate() -> None:
    # 0.193 Gbit/s: 24.1 MB/s, the first restores' plans before any page read is measured
    assert link_prior("0.193gbps+0.2ms") == {"redis_GBps": pytest.approx(0.193 / 8)}
    spec = ServerSpec(Path("model"))
    args = spec.launch_args("cacheflow", "redis://127.0.0.1:1/0", "0.193gbps+0.2ms")
    config = json.loads(args[args.index("--cacheflow-config") + 1])
    assert config["prior"] == link_prior("0.193gbps+0.2ms")
    args = spec.launch_args("cacheflow", "redis://127.0.0.1:1/0", None)  # the raw link
    assert "prior" not in json.loads(args[args.index("--cacheflow-config") + 1])
