"""The restore benchmark runs end to end on a tiny model (its targets are checked by the
real run, docs/benchmarks.md, not here)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sglang_cacheflow.bench import restore


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
    # the bandwidth sweep changes what the planner does
    shapes = {r["shape"] for r in rows if r["policy"] == "cacheflow"}
    assert len(shapes) >= 2
    assert {"balanced", "predictions_within_10pct", "targets"} <= set(data["summary"])
    assert (tmp_path / "bench.png").stat().st_size > 10_000
