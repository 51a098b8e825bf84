"""sglang-bench's arithmetic: the balanced link, T*, the gains over the better pure mode, and
what it reads from the decision log."""

from __future__ import annotations

import pytest

from sglang_cacheflow.bench.sglang.restore import (
    _average,
    _shapes,
    _within,
    balanced_link,
    summarize,
)


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
    a = {**_row("l", "cake", 0.6, 5.0), "shapes": {}}
    b = {**_row("l", "cake", 0.8, 7.0), "shapes": {}}
    avg = _average([a, b])
    assert avg["single_mean_s"] == pytest.approx(0.7) and avg["together_mean_s"] == 6.0
    assert avg["servers"] == 2 and len(avg["runs"]) == 2


def test_decision_log_reading() -> None:
    log = (
        "rid=a ... (token split 240+240, #1 of 2 in round); predicted 10.00 ms\n"
        "rid=b ... (layer split 15/30, #2 of 2 in round); predicted 20.00 ms\n"
        "rid=a done: measured 10.50 ms, predicted 10.00 ms (token split 240+240)\n"
        "rid=b done: measured 30.00 ms, predicted 20.00 ms (layer split 15/30)\n"
    )
    assert _shapes(log) == {"token split": 1, "layer split": 1}
    assert _within(log, 0.10) == 0.5
    assert _within("", 0.10) is None
