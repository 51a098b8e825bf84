"""Benchmark: time to first token of restored turns on a real SGLang server with --enable-cacheflow.

For every emulated L3 link and every policy (``recompute``, ``load``, ``cacheflow``) the same
server build starts once with a fresh Redis, warms up (calibration), and runs ``N``
conversations of ``prefix`` tokens. Between phases ``/flush_cache`` drops device and host
memory, so the conversations' prefixes come back from Redis only (written there by HiCache's
write-through). Phases:

- (a) ``single``: one returning conversation at a time;
- (b) ``together``: all ``N`` conversations return at once.

TTFT is the latency of a one-token generation. Results are emulation results: the Redis tier
is seen through :class:`~sglang_cacheflow.tiers.shaping.ShapedTier` at the given link.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

POLICIES = ("recompute", "load", "cacheflow")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny or a model folder")
    parser.add_argument("--dtype", default="float32", help="SGLang --dtype of the server")
    parser.add_argument(
        "--links",
        default="50mbps+1ms,100mbps+1ms,1gbps+1ms",
        help="emulated L3 links; the defaults put SmolLM2 (fp32, 512 tokens) on either side "
        "of, and at, the link where neither pure mode wins (b)",
    )
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--prefix", type=int, default=512, help="tokens of each conversation")
    parser.add_argument("--new", type=int, default=16, help="new tokens of a returning turn")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each phase")
    parser.add_argument(
        "--hicache-ratio",
        type=float,
        default=4.0,
        help="host pool / device pool; large enough that SGLang's prefetch rate limit lets "
        "all the returning conversations prefetch at once (so 'load' loads everything)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="keep each server's log (decisions) here"
    )


def _model(name: str) -> Path:
    from sglang_cacheflow.models import build_tiny_llama, convert_smollm2

    if name == "tiny":
        return build_tiny_llama()
    if name == "smollm2":
        return convert_smollm2()
    return Path(name)


def _ttft(server: Any, ids: list[int]) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    reply = server.generate(input_ids=ids, max_new_tokens=1, return_logprob=False)
    return time.perf_counter() - start, reply["meta_info"].get("cached_tokens_details") or {}


def _flush(server: Any) -> None:
    """``/flush_cache`` is refused while requests or HiCache transfers are in flight: retry."""
    from sglang_cacheflow.testing.server import SGLangServerError

    deadline = time.monotonic() + 60
    while True:
        try:
            server.flush_cache()
            return
        except SGLangServerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _wait_for_backups(url: str, settle_s: float = 5.0, limit_s: float = 600.0) -> None:
    """HiCache writes through to Redis in the background, at the emulated link's rate (tens
    of seconds on a slow link): wait until the number of stored keys has not changed for
    ``settle_s``, longer than one conversation's backup takes at the default links, so that
    every phase finds the whole prefixes in L3. The ``/flush_cache`` that starts each phase
    also waits for HiCache transfers still in flight."""
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + limit_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        size = int(client.dbsize())
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= settle_s:
            break
        time.sleep(0.25)
    client.close()


def _one(model: Path, link: str, policy: str, args: argparse.Namespace) -> dict[str, Any]:
    from sglang_cacheflow.testing.redis import RedisServer
    from sglang_cacheflow.testing.server import SGLangServer
    from sglang_cacheflow.tiers.shaping import LinkShape

    rng = random.Random(0)
    n, p = args.conversations, args.prefix
    convs = [[rng.randrange(256) for _ in range(p)] for _ in range(n)]
    total = n * (p + args.new) + 1024
    with RedisServer() as redis_server:
        cfg = {
            "redis_url": f"redis://127.0.0.1:{redis_server.port}/0",
            "link": link,
            "chunk_tokens": 16,
            "log_decisions": True,
            # the nominal link rate as the prior; calibration refines it from the page reads
            "prior": {"redis_GBps": LinkShape.parse(link).bandwidth_bytes_per_s / 1e9},
        }
        flags = ["--dtype", args.dtype, "--page-size", "16", "--max-total-tokens", str(total)]
        flags += [
            "--hicache-ratio",
            str(args.hicache_ratio),
            "--enable-cacheflow",
            "--cacheflow-policy",
            policy,
        ]
        flags += ["--cacheflow-config", json.dumps(cfg)]
        server = SGLangServer(model, args=flags, env={"SGLANG_CACHEFLOW_HICACHE_RESERVE_GB": "1"})
        with server:
            # warm-up: forwards of several lengths calibrate the compute cost
            for k in (64, 128, 256, 512, p):
                server.generate(input_ids=[rng.randrange(256) for _ in range(k)], max_new_tokens=1)
            # the conversations' first turns, hit twice so HiCache writes them through to L3
            for ids in convs:
                server.generate(input_ids=ids, max_new_tokens=1)
                server.generate(input_ids=ids, max_new_tokens=1)
            _wait_for_backups(redis_server.url)
            single: list[float] = []
            together: list[float] = []
            details: list[dict[str, Any]] = []
            for r in range(args.repeats):
                _flush(server)
                for ids in convs:
                    tail = [rng.randrange(256) for _ in range(args.new)]
                    t, d = _ttft(server, ids + tail)
                    single.append(t)
                    details.append(d)
                    _flush(server)
                tails = [[rng.randrange(256) for _ in range(args.new)] for _ in convs]
                with ThreadPoolExecutor(n) as pool:
                    out = list(
                        pool.map(
                            lambda x: _ttft(server, x[0] + x[1]), zip(convs, tails, strict=True)
                        )
                    )
                together += [t for t, _ in out]
                details += [d for _, d in out]
                del r
            log = server.log_text()
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        (args.log_dir / f"{link}-{policy}.log").write_text(log)
    return {
        "link": link,
        "policy": policy,
        "single_mean_s": statistics.mean(single),
        "together_mean_s": statistics.mean(together),
        "storage_tokens": sum(int(d.get("storage", 0)) for d in details),
        "decisions": log.count("cacheflow restore rid="),
    }


def run(args: argparse.Namespace) -> int:
    model = _model(args.model)
    links = [x for x in args.links.split(",") if x]
    policies = [x for x in args.policies.split(",") if x]
    rows = []
    for link in links:
        for policy in policies:
            row = _one(model, link, policy, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    n = args.conversations
    print(f"| L3 link | policy | (a) one at a time: mean TTFT | (b) {n} together: mean TTFT |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['link']} | {row['policy']} | {row['single_mean_s'] * 1e3:.0f} ms "
            f"| {row['together_mean_s'] * 1e3:.0f} ms |"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sglang-cacheflow sglang-restore-bench")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
