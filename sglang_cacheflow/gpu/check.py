"""``sglang-cacheflow gpu-check``: restores on SGLang with ``--enable-cacheflow`` on a GPU, exact.

One server starts on the GPU with a private Redis-compatible server as L3, and the forced
shapes run on it in turn (the token split and the layer split by default: one returning
request loads half of its prefix from Redis while it recomputes the other half), each on
prompts of its own whose returning requests force the shape on themselves (their
``custom_params``). Every prompt runs once (nothing cached: the reply without reuse), again
so that HiCache writes it through to Redis, then ``/flush_cache`` drops device and host
memory and the prompt runs a third time, restored from Redis. In fp32 the greedy ids must
be identical; the decision log says which shape each restore took. A shape that fails
(the server with it) is reported and the next one gets a fresh server. The model is the
random :data:`~sglang_cacheflow.models.GPU_LLAMA_CONFIG` Llama, built where it runs.

``run.sh`` beside this module runs it on the device machine with the benches.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from sglang_cacheflow.sglang.config import FORCED_SHAPES, forcing_params

__all__ = ["add_arguments", "run"]

DEFAULT_SHAPES = ("token-split", "layer-split")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes",
        default=",".join(DEFAULT_SHAPES),
        help=f"forced shapes to run, of {', '.join(FORCED_SHAPES)}",
    )
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prefix", type=int, default=1024, help="tokens of each prompt")
    parser.add_argument("--new", type=int, default=16, help="greedy tokens compared")
    parser.add_argument("--link", default="10gbps+0.2ms", help="emulated L3 link")
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: the same check on SGLang's CPU engine with the tiny Llama (a dry run)",
    )
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: built)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")


def _server(model: Path, l3: Any, args: argparse.Namespace) -> Any:
    """A started CacheFlow server for the check, its decisions logged."""
    from sglang_cacheflow.sglang.cuda.install import cuda_server_args
    from sglang_cacheflow.testing.server import SGLangServer

    cfg = {"redis_url": l3.url, "link": args.link, "chunk_tokens": 16, "log_decisions": True}
    total = args.prompts * (args.prefix + args.new) * 2 + 1024
    flags = ["--dtype", "float32", "--page-size", "16", "--max-total-tokens", str(total)]
    flags += ["--hicache-ratio", "2", "--enable-metrics", "--enable-cacheflow"]
    flags += ["--cacheflow-config", json.dumps(cfg)]
    cpu = args.device == "cpu"
    if not cpu:
        flags += [*cuda_server_args(), "--disable-cuda-graph"]
    return SGLangServer(model, args=flags, cpu=cpu, sleep_on_idle=cpu).start()


def _one_shape(
    server: Any, l3: Any, name: str, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    from sglang_cacheflow.sglang.decision import logged_decisions
    from sglang_cacheflow.testing.redis import wait_for_backups

    force = forcing_params(*FORCED_SHAPES[name])
    rng = random.Random(seed)  # prompts no other shape sends
    prompts = [[rng.randrange(256) for _ in range(args.prefix)] for _ in range(args.prompts)]
    offset = len(server.log_text())
    first = [server.generate(input_ids=p, max_new_tokens=args.new) for p in prompts]
    for p in prompts:  # HiCache writes a prefix through to L3 from its second hit
        server.generate(input_ids=p, max_new_tokens=1)
    keys = wait_for_backups(l3.url, settle_s=3.0, limit_s=60)
    server.flush_cache(wait_s=60)
    restored = []
    for p in prompts:
        started = time.perf_counter()
        reply = server.generate(input_ids=p, max_new_tokens=args.new, **force)
        restored.append((time.perf_counter() - started, reply))
    log = server.log_text()[offset:]
    decisions = logged_decisions(log, "redis")
    same = [a["output_ids"] == b["output_ids"] for a, (_, b) in zip(first, restored, strict=True)]
    return {
        "shape": name,
        "startup_s": server.startup_seconds,
        "redis_keys": keys,
        "identical": same,
        "cached_tokens": [r["meta_info"].get("cached_tokens") for _, r in restored],
        "latency_s": [t for t, _ in restored],
        "decisions": [d.shape for d in decisions],
        "loaded": sum(d.loaded for d in decisions),
        "recomputed": sum(d.recomputed for d in decisions),
        "fallback_lines": log.count("fallback"),
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from sglang_cacheflow.models import build_gpu_llama, build_tiny_llama
    from sglang_cacheflow.testing.redis import RedisServer

    names = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(names) - set(FORCED_SHAPES))
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {sorted(FORCED_SHAPES)}")
    out: dict[str, Any] = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "prefix": args.prefix,
        "new": args.new,
        "link": args.link,
        "results": [],
    }
    model = args.model or (build_tiny_llama() if args.device == "cpu" else build_gpu_llama())
    server = None
    with RedisServer() as l3:
        try:
            for seed, name in enumerate(names):
                try:
                    server = server or _server(model, l3, args)
                    result = _one_shape(server, l3, name, seed, args)
                except Exception as exc:  # the next shape still runs; the error is the result
                    result = {"shape": name, "error": f"{type(exc).__name__}: {exc}"[-4000:]}
                    if server is not None:
                        server.stop()  # the next shape gets a fresh one
                    server = None
                out["results"].append(result)
                print(json.dumps(result), flush=True)
                if args.out is not None:
                    args.out.write_text(json.dumps(out, indent=2) + "\n")
        finally:
            if server is not None:
                server.stop()
    ok = all(r.get("identical") and all(r["identical"]) for r in out["results"])
    out["all_identical"] = ok
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="sglang-cacheflow gpu-check", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
