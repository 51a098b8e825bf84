"""Planner speed and quality: how long planning a big round takes, how close plans come to
the fluid bound. Run with ``sglang-cacheflow planner-bench`` (``make bench-planner``)."""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from sglang_cacheflow.planner import (
    POLICIES,
    ComputeCost,
    CostModel,
    ModelShape,
    Request,
    Span,
    TierCost,
    fluid_bound,
    plan,
    validate,
)


def llama8b_cost(attention: float = 2e-9) -> CostModel:
    """Llama-3.1-8B shape, an H100-like prefill rate, host over PCIe and Redis over 20 Gbps."""
    return CostModel(
        ModelShape(num_layers=32, num_kv_heads=8, head_dim=128, dtype_bytes=2),
        ComputeCost(tokens_per_s=20000, attention_s_per_token_pair=attention),
        {"host": TierCost.from_gbps(25, 0.05), "redis": TierCost.from_gbps(2.5, 0.5)},
    )


def speed_round(n: int, tokens: int, seed: int) -> list[Request]:
    """``n`` requests of ``tokens`` evicted tokens each: a third in Redis, a third on host,
    a third split host-then-Redis; up to 2K tokens still on device."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        spans = (
            (Span("redis", tokens),)
            if kind == 0
            else (Span("host", tokens),)
            if kind == 1
            else (Span("host", tokens // 2), Span("redis", tokens - tokens // 2))
        )
        out.append(Request(f"r{i}", rng.randrange(0, 2048), spans, rng.randrange(16, 512)))
    return out


def mixed_round(n: int, rng: random.Random) -> list[Request]:
    """A random round of mixed lengths and tiers, for plan quality."""
    out = []
    for i in range(n):
        tiers = rng.choice([("redis",), ("host",), ("host", "redis")])
        spans = tuple(Span(t, rng.choice([512, 1024, 4096, 8192, 16384, 32768])) for t in tiers)
        out.append(Request(f"r{i}", rng.choice([0, 256, 2048]), spans, rng.randrange(16, 512)))
    return out


def run_bench(requests: int, tokens: int, chunk: int, repeats: int, trials: int) -> dict[str, Any]:
    cost = llama8b_cost()
    speed: dict[str, Any] = {}
    for policy in POLICIES:
        times = []
        for r in range(repeats):
            reqs = speed_round(requests, tokens, seed=r)
            t0 = time.perf_counter()
            plan(reqs, cost, policy, chunk_tokens=chunk)
            times.append((time.perf_counter() - t0) * 1e3)
        speed[policy] = {
            "median_ms": statistics.median(times),
            "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))],
        }
    rng = random.Random(1)
    quality: dict[str, list[float]] = {p: [] for p in POLICIES}
    makespan_ratio: list[float] = []
    for _ in range(trials):
        reqs = mixed_round(8, rng)
        bound = fluid_bound(reqs, cost)
        for policy in POLICIES:
            p = plan(reqs, cost, policy, chunk_tokens=chunk)
            validate(p, reqs, cost.shape.num_layers)
            quality[policy].append(p.mean_ttft_s / bound.mean_ttft_s)
            if policy == "cacheflow":
                makespan_ratio.append(p.makespan_s / bound.makespan_s)
    return {
        "machine": {"python": platform.python_version(), "processor": platform.processor()},
        "speed": {
            "requests": requests,
            "tokens_per_request": tokens,
            "chunk_tokens": chunk,
            "repeats": repeats,
            "policies": speed,
        },
        "quality": {
            "rounds": trials,
            "requests_per_round": 8,
            "mean_ttft_over_bound": {
                p: {"mean": statistics.fmean(v), "max": max(v)} for p, v in quality.items()
            },
            "cacheflow_makespan_over_bound": {
                "mean": statistics.fmean(makespan_ratio),
                "max": max(makespan_ratio),
            },
        },
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32768, help="evicted tokens per request")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=51)
    parser.add_argument("--trials", type=int, default=200, help="random 8-request rounds")
    parser.add_argument("--json", type=Path, help="also write the results here")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    res = run_bench(args.requests, args.tokens, args.chunk_tokens, args.repeats, args.trials)
    console = Console()
    s = res["speed"]
    t = Table(
        title=f"Planning {s['requests']} requests x {s['tokens_per_request']} tokens, "
        f"chunks of {s['chunk_tokens']} ({s['repeats']} runs)"
    )
    t.add_column("policy")
    t.add_column("median ms", justify="right")
    t.add_column("p90 ms", justify="right")
    for p, v in s["policies"].items():
        t.add_row(p, f"{v['median_ms']:.2f}", f"{v['p90_ms']:.2f}")
    console.print(t)
    q = res["quality"]
    t = Table(title=f"Mean TTFT / fluid bound over {q['rounds']} random rounds of 8 requests")
    t.add_column("policy")
    t.add_column("mean", justify="right")
    t.add_column("worst", justify="right")
    for p, v in q["mean_ttft_over_bound"].items():
        t.add_row(p, f"{v['mean']:.3f}", f"{v['max']:.3f}")
    console.print(t)
    m = q["cacheflow_makespan_over_bound"]
    console.print(f"cacheflow makespan / bound: mean {m['mean']:.3f}, worst {m['max']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0
