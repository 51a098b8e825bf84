"""``sglang-cacheflow bench``: TTFT of returning turns on a real SGLang server, per policy and
emulated L3 bandwidth, for one workload. Writes a table, ``bench.json`` and PNG plots."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sglang_cacheflow.bench import workloads as wl
from sglang_cacheflow.bench.sglang.serving import (
    Run,
    ServerSpec,
    check_answers,
    report,
    run_against,
    run_one,
)
from sglang_cacheflow.tiers.names import HOST_TIER, L3_TIER

DEFAULT_POLICIES = ("recompute", "load", "cacheflow")
"""Policies run unless ``--policies`` names others (see ``planner.POLICIES``)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=wl.WORKLOADS, default="sharegpt")
    parser.add_argument(
        "--url", help="replay against this running server (as it is configured) instead"
    )
    parser.add_argument(
        "--model", type=Path, help="model folder (default: SmolLM2-135M-Instruct, converted once)"
    )
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help="comma-separated")
    parser.add_argument(
        "--l3-gbps",
        default="10",
        help="emulated Redis link bandwidths in Gbit/s, comma-separated; 'none' for the raw "
        "link; 'auto': the link balanced against the recompute measured here (the recompute "
        "policy runs first, then the others over a link on which loading a returning turn's "
        "KV takes as long as recomputing it did)",
    )
    parser.add_argument("--redis-url", help="use this Redis (default: a private redis-server)")
    parser.add_argument("--no-redis", action="store_true", help="host tier only")
    parser.add_argument("--sessions", type=int, default=8, help="conversations, agents, ...")
    parser.add_argument("--turns", type=int, default=3, help="turns (steps, questions) each")
    parser.add_argument("--requests", type=int, default=40, help="trace rows (mooncake)")
    parser.add_argument("--max-prompt-tokens", type=int, default=1536)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    parser.add_argument(
        "--request-rate",
        type=float,
        default=0.0,
        help="requests/s within a round (Poisson); 0 sends a round at once",
    )
    parser.add_argument("--trace-token-scale", type=int, default=16, help="divide lengths by")
    parser.add_argument("--trace-time-scale", type=float, default=0.002, help="replay s/trace s")
    parser.add_argument("--max-total-tokens", type=int, default=4096, help="device KV pool")
    parser.add_argument("--hicache-ratio", type=float, default=2.0, help="host pool / device")
    parser.add_argument("--chunk-tokens", type=int, default=64)
    parser.add_argument(
        "--page-size",
        type=int,
        default=None,
        help="SGLang --page-size of the servers (default SGLang's, one token: one L3 record "
        "per token); --chunk-tokens must be a multiple of it",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="SGLang --dtype of the servers (float32 makes the answer check a check of the "
        "restores: no bf16 rounding differences between a decode and a recompute)",
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench"))


def parse_gbps(text: str) -> list[float | None]:
    out: list[float | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(None if part in ("none", "raw") else float(part))
    return out


def balanced_gbps(run: Run, model: Path, dtype: str | None) -> float:
    """The link (Gbit/s) over which the KV a ``recompute`` run recomputed for its returning
    turns loads in the time those turns took to their first token."""
    from sglang_cacheflow.bench.sglang.restore import kv_bytes_per_token

    turns = [r for r in run.results if r.returning and not r.error and r.ttft_s > 0]
    if not turns:
        raise SystemExit("error: --l3-gbps auto: the recompute run had no returning turn")
    tokens = sum(r.prompt_tokens - r.cached_tokens for r in turns)
    seconds = sum(r.ttft_s for r in turns)
    return tokens * kv_bytes_per_token(model, dtype or "bfloat16") * 8 / seconds / 1e9


def build_sessions(args: argparse.Namespace, model: Path) -> tuple[list[wl.Session], str]:
    """The workload's sessions and a line that says how it was scaled."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    vocab = (16, min(int(getattr(tok, "vocab_size", 32000)), 1 << 20) - 1)
    if args.workload == "sharegpt":
        s = wl.sharegpt_sessions(
            tok, args.sessions, args.turns, args.max_prompt_tokens, args.max_new_tokens
        )
        return s, f"{len(s)} ShareGPT conversations, up to {args.turns} turns"
    if args.workload == "agent":
        step = max(16, args.max_prompt_tokens // (2 * args.turns))
        s = wl.agent_sessions(args.sessions, args.turns, step, step, vocab, args.max_new_tokens)
        return s, f"{args.sessions} agents, {args.turns} steps of {step} tool-output tokens"
    if args.workload == "long-doc":
        s = wl.long_doc_sessions(
            args.sessions * args.turns, args.max_prompt_tokens - 64, 32, vocab, args.max_new_tokens
        )
        return (
            s,
            f"one {args.max_prompt_tokens - 64}-token document, {len(s[0].turns) - 1} questions",
        )
    name = args.workload.removeprefix("mooncake-")
    scale = wl.TraceScale(args.trace_token_scale, args.trace_time_scale)
    path = wl.traces_dir() / f"mooncake_{name}.jsonl"
    if not path.exists():
        raise SystemExit(
            f"error: trace {path} not found; it ships in ../shared/traces beside the "
            "repository, or set SGLANG_CACHEFLOW_TRACES to its folder"
        )
    s = wl.mooncake_sessions(path, args.requests, scale, vocab, args.max_new_tokens)
    return s, f"{args.requests} rows of {path.name}, scaled: {scale.describe()}"


@contextlib.contextmanager
def redis_for(args: argparse.Namespace) -> Iterator[str | None]:
    """The Redis URL of the runs: given, private, or none."""
    if args.no_redis:
        yield None
        return
    if args.redis_url:
        yield args.redis_url
        return
    from sglang_cacheflow.testing.redis import (
        RedisServer,
        RedisUnavailableError,
        server_description,
    )

    try:
        server = RedisServer(maxmemory="4gb")
        server.start()
    except RedisUnavailableError as e:
        print(f"note: no Redis-compatible server ({e}); running with the host tier only")
        yield None
        return
    print(f"L3: a private {server_description()} on port {server.port}")
    try:
        yield server.url
    finally:
        server.stop()


def shapes_text(restores: dict[str, float]) -> str:
    """``token split 5, load all 2``: restores by shape, from :func:`scrape_restores`."""
    shapes = {k[6:]: int(v) for k, v in restores.items() if k.startswith("shape:") and v}
    return ", ".join(f"{k} {v}" for k, v in sorted(shapes.items())) or "-"


def loaded_by_tier(restores: dict[str, float]) -> str:
    """``1948 / 73``: tokens loaded from host memory and from Redis, from /metrics."""
    return " / ".join(f"{restores.get(f'load:{t}', 0.0):.0f}" for t in (HOST_TIER, L3_TIER))


def summary_table(runs: Sequence[Run], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=140)
    t = Table(title=title)
    columns = (
        "policy", "L3 link (emulated)", "returning turns", "mean TTFT ms", "p90 TTFT ms",
        "loaded tok (host / Redis)", "recomputed tok", "restore shapes",
        "predicted within 10% / 25%", "answers = ref", "wall s",
    )  # fmt: skip
    for col in columns:
        t.add_column(col, justify="left" if col == "policy" else "right")
    for r in runs:
        s = r.summary()
        link = "raw" if r.bandwidth_gbps is None else f"{r.bandwidth_gbps:g} Gbit/s"
        mean = s["mean_ttft_returning_s"]
        p90 = s["p90_ttft_returning_s"]
        match = s["answers_match"]
        t.add_row(
            r.policy,
            link,
            str(s["returning_turns"]),
            "-" if mean is None else f"{mean * 1e3:.0f}",
            "-" if p90 is None else f"{p90 * 1e3:.0f}",
            f"{s['tokens_loaded']:.0f} ({loaded_by_tier(r.restores)})",
            f"{s['tokens_recomputed']:.0f}",
            shapes_text(r.restores),
            " / ".join(
                "-" if x is None else f"{x:.0%}"
                for x in (s["predicted_within_10pct"], s["predicted_within_25pct"])
            ),
            "-" if match is None else f"{match:.0%}",
            f"{s['wall_s']:.0f}",
        )
    console.print(t)


def write_outputs(runs: Sequence[Run], meta: dict[str, Any], out: Path) -> list[Path]:
    from sglang_cacheflow.bench import plots

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json"]
    paths[0].write_text(json.dumps(report(runs, meta), indent=1))
    title = meta.get("workload", "")
    by_policy: dict[str, list[float]] = {}
    for r in runs:
        key = (
            r.policy
            if len({x.bandwidth_gbps for x in runs}) == 1
            else (
                f"{r.policy} @ {r.bandwidth_gbps:g} Gbit/s" if r.bandwidth_gbps else f"{r.policy}"
            )
        )
        by_policy[key] = r.returning_ttfts()
    paths.append(
        plots.ttft_cdf(by_policy, out / "ttft_cdf.png", f"TTFT of returning turns: {title}")
    )
    series: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        ttfts = r.returning_ttfts()
        if r.bandwidth_gbps is not None and ttfts:
            series.setdefault(r.policy, []).append((r.bandwidth_gbps, statistics.fmean(ttfts)))
    if any(len(v) > 1 for v in series.values()):
        paths.append(
            plots.ttft_vs_bandwidth(
                series, out / "ttft_vs_bandwidth.png", f"{title}: TTFT vs L3 link"
            )
        )
    return paths


def run(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from sglang_cacheflow.models import convert_smollm2

    model = args.model or convert_smollm2()  # the tokenizer, also for --url
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    auto = args.l3_gbps.strip().lower() == "auto"
    if auto:  # the recompute run measures the balance point: it runs first
        policies = ["recompute", *(p for p in policies if p != "recompute")]
    bandwidths: list[float | None] = [None] if auto else parse_gbps(args.l3_gbps)
    sessions, described = build_sessions(args, model)
    total = sum(len(s.turns) for s in sessions)
    extra: tuple[str, ...] = ("--dtype", args.dtype) if getattr(args, "dtype", None) else ()
    if getattr(args, "page_size", None):
        extra += ("--page-size", str(args.page_size))
    spec = ServerSpec(
        model, args.max_total_tokens, args.hicache_ratio, args.chunk_tokens, args=extra
    )
    by_arrival = args.workload.startswith("mooncake")
    runs: list[Run] = []
    print(f"workload: {args.workload}: {described}")
    if args.url:
        with Progress() as progress:
            task = progress.add_task(f"replay against {args.url}", total=total)
            runs.append(
                run_against(
                    args.url.rstrip("/"),
                    sessions,
                    args.concurrency,
                    by_arrival,
                    lambda _r: progress.advance(task),
                    args.request_rate,
                )
            )
        return _finish(
            args,
            runs,
            {
                "workload": args.workload,
                "described": described,
                "url": args.url,
                "concurrency": args.concurrency,
                "request_rate": args.request_rate,
            },
        )
    with redis_for(args) as redis_url, Progress() as progress:
        for gbps in bandwidths if redis_url else [None]:
            for policy in policies:
                if auto and redis_url and runs and gbps is None:  # recompute has run
                    gbps = round(balanced_gbps(runs[0], model, getattr(args, "dtype", None)), 3)
                    runs[0].bandwidth_gbps = bandwidths[0] = gbps
                    print(f"balanced L3 link: {gbps:g} Gbit/s, from the recompute run")
                link = "none" if gbps is None else f"{gbps:g} Gbit/s (emulated)"
                task = progress.add_task(f"{policy:>9}, L3 {link}", total=total)
                runs.append(
                    run_one(
                        spec,
                        policy,
                        sessions,
                        redis_url,
                        gbps,
                        args.concurrency,
                        by_arrival,
                        lambda _r, task=task: progress.advance(task),
                        args.request_rate,
                    )
                )
    check_answers(runs)
    meta = {
        "workload": args.workload,
        "described": described,
        "model": str(model),
        "policies": policies,
        "l3_gbps": bandwidths,
        "redis": bool(redis_url),
        "server": {
            "max_total_tokens": args.max_total_tokens,
            "hicache_ratio": args.hicache_ratio,
            "chunk_tokens": args.chunk_tokens,
            "page_size": getattr(args, "page_size", None) or 1,
        },
        "concurrency": args.concurrency,
        "request_rate": args.request_rate,
    }
    return _finish(args, runs, meta)


def _finish(args: argparse.Namespace, runs: list[Run], meta: dict[str, Any]) -> int:
    summary_table(runs, f"{args.workload}: {meta['described']}")
    for p in write_outputs(runs, meta, args.out):
        print(f"wrote {p}")
    failed = sum(r.summary()["failed_requests"] for r in runs)
    if failed:
        print(f"error: {failed} requests failed; first: {next(e for r in runs for e in r.errors)}")
        return 1
    return 0
