"""The restore benchmark runs end to end on a tiny model (its targets are checked by the
real run, docs/benchmarks.md, not here)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from sglang_cacheflow.bench import restore

SHAPE = re.compile(r"recompute all|load all|(token split|load front) \d+\+\d+|layer split \d+/\d+")


def test_restore_bench_smoke(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    restore.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--smoke", "--out", str(out), "--threads", "1"])
    assert restore.run(args) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    points = {(r["context"], r["factor"]) for r in rows}
    assert points == {(c, f) for c in (96, 192) for f in (0.5, 1.0, 2.0)}
    for point in points:
        policies = {r["policy"] for r in rows if (r["context"], r["factor"]) == point}
        assert policies == set(restore.POLICIES)
    for r in rows:
        assert r["ttft_s"] > 0 and r["predicted_ttft_s"] > 0
        assert r["t_star_s"] <= min(r["tc_s"], r["tio_s"])
        assert r["logprob_diff"] <= 1e-4  # every benchmarked restore is also exact
    # every row names a shape the planner makes (which one a tiny model's timings pick is
    # not fixed: how the link moves the choice is tests/planner's, on a fixed cost model)
    for r in rows:
        assert SHAPE.fullmatch(r["shape"]), r["shape"]
    assert {"balanced", "predictions_within_10pct", "targets"} <= set(data["summary"])
    assert (tmp_path / "bench.png").stat().st_size > 10_000
