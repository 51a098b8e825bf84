"""The ``sglang-cacheflow`` command: one subcommand per job, each module imported on use."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# subcommand -> (module with add_arguments(parser) and run(args) -> int, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "sglang_cacheflow.bench.sglang.demo",
        "the main job: returning chats on SGLang, per policy",
    ),
    "bench": (
        "sglang_cacheflow.bench.sglang.returning_turns",
        "TTFT of returning turns on a real SGLang server",
    ),
    "plan": ("sglang_cacheflow.cli", "print each policy's restore plan for a scenario file"),
    "planner-bench": ("sglang_cacheflow.bench.planner", "planner speed and plan quality"),
    "tier-bench": ("sglang_cacheflow.bench.tiers", "KV tier throughput and latency"),
    "overlap-bench": (
        "sglang_cacheflow.bench.overlap",
        "what a tier read costs a forward that runs beside it (alone vs beside, per layer count)",
    ),
    "restore-bench": (
        "sglang_cacheflow.bench.restore",
        "restore time per policy on the reference runtime (context x emulated bandwidth)",
    ),
    "blend-bench": (
        "sglang_cacheflow.bench.blend",
        "chunk reuse beyond prefixes (CacheBlend, CacheTune): quality and TTFT vs ratio",
    ),
    "sglang-bench": (
        "sglang_cacheflow.bench.sglang.restore",
        "TTFT of restored turns in SGLang: policies x emulated L3 bandwidth, alone and batched",
    ),
    "sglang-blend-bench": (
        "sglang_cacheflow.bench.sglang.blend",
        "chunk reuse in SGLang: TTFT and answers of blended RAG prompts vs a plain prefill",
    ),
    "patch-sglang": (
        "sglang_cacheflow.sglang.patch",
        "give the installed SGLang 0.5.23 a native --enable-cacheflow (--check, --revert)",
    ),
    "gpu-bundle": (
        "sglang_cacheflow.gpu.bundle",
        "build the folder a lent GPU machine needs (wheels, trimmed SGLang), at most 64 MiB",
    ),
    "gpu-check": (
        "sglang_cacheflow.gpu.check",
        "on a GPU: restores in SGLang (forced splits, from Redis) against no reuse",
    ),
    "prepare-model": ("sglang_cacheflow.cli", "build or convert a local model folder"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the subcommands implemented in this module."""
    if parser.prog.endswith(" plan"):
        parser.add_argument("scenario", type=Path, help="scenario JSON (see README)")
        parser.add_argument("--policy", default="all", help="recompute|load|cake|cacheflow|all")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
    else:  # prepare-model
        parser.add_argument(
            "model",
            choices=("smollm2", "smollm2-fp32", "tiny-llama", "small-llama"),
            help="which model",
        )
        parser.add_argument("--out", type=Path, help="folder (default: the local model cache)")


def run(args: argparse.Namespace) -> int:
    return _plan(args) if args.command == "plan" else _prepare_model(args)


def _prepare_model(args: argparse.Namespace) -> int:
    from sglang_cacheflow.models import build_small_llama, build_tiny_llama, convert_smollm2

    if args.model == "tiny-llama":
        path = build_tiny_llama(args.out)
    elif args.model == "small-llama":
        path = build_small_llama(args.out)
    else:
        dtype = "float32" if args.model.endswith("fp32") else "bfloat16"
        path = convert_smollm2(args.out, dtype=dtype)
    print(path)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from sglang_cacheflow.planner import POLICIES, fluid_bound, plan, validate
    from sglang_cacheflow.planner.scenario import ScenarioError, load_scenario

    try:
        sc = load_scenario(args.scenario)
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.policy != "all" and args.policy not in POLICIES:
        print(f"error: --policy must be one of {', '.join(POLICIES)} or all", file=sys.stderr)
        return 2
    policies = POLICIES if args.policy == "all" else (args.policy,)
    plans = {}
    for p in policies:
        plans[p] = plan(sc.requests, sc.cost, p, chunk_tokens=sc.chunk_tokens)
        validate(plans[p], sc.requests, sc.cost.shape.num_layers)
    bound = fluid_bound(sc.requests, sc.cost)
    if args.json:
        out = {"policies": {p: pl.to_dict() for p, pl in plans.items()}, "bound": bound.to_dict()}
        print(json.dumps(out, indent=2))
        return 0
    from sglang_cacheflow.bench.report import print_plans

    print_plans(plans, sc.requests, bound, sc.cost.shape.num_layers, title=str(args.scenario))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sglang-cacheflow", description="Fast KV cache restoration for SGLang."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
