"""Benchmark: time to first token of restored turns on a real SGLang server with --enable-cacheflow.

For every emulated L3 link and every policy (``recompute``, ``load``, ``cake``, ``cacheflow``)
the same server build starts once with a fresh Redis, warms up (calibration: prefills of
several lengths, each backup landed before the next forward, second turns after cached
prefixes, then one restore from Redis), and runs ``N`` conversations of ``prefix`` tokens.
Between phases ``/flush_cache`` drops device and host memory, so the conversations' prefixes
come back from Redis only (written there by HiCache's write-through). Phases:

- (a) ``single``: one returning conversation at a time;
- (b) ``together``: all ``N`` conversations return at once.

``--links auto`` (the default) finds the links by measurement: the ``recompute`` policy runs
first (it reads nothing from L3, so its TTFT does not depend on the link and its row serves
every link), and the *balanced* link is the one over which a prefix's KV takes as long to
load as the measured recompute took; the bench then runs 0.5x, 1x and 2x of it. ``--order
abba`` runs the other policies forward then backward at each link (load, cake, cacheflow,
cacheflow, cake, load), then ``recompute`` once more, and averages each policy's servers:
recompute, load, cake, cacheflow, cacheflow, cake, load, recompute. That separates
server-to-server noise (start-up, memory placement, the machine's speed drifting within a
run) from the policies' cost; ``abba-balanced`` (the default) does so at the middle link
only.

TTFT is the latency of a one-token generation. T* = Tc*Tio/(Tc+Tio) is computed from the
measured one-at-a-time means of ``recompute`` (Tc) and ``load`` (Tio). Each row also reports
how often the restore time the planner predicted was within 10% of the measured one.
Results are emulation results: the Redis tier is seen through
:class:`~sglang_cacheflow.tiers.shaping.ShapedTier` at the given link.
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

from sglang_cacheflow.bench.sglang.serving import link_prior, predicted_within, scrape_restores
from sglang_cacheflow.planner import POLICIES

__all__ = ["add_arguments", "run"]

PAGE_TOKENS = 16  # the servers' --page-size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2",
        help="smollm2, tiny, small (a random 16-layer Llama whose 4 KV heads divide among 2 "
        "ranks, for --tp 2), gpu (a random Llama of Llama-3.2-1B's layers) or a model folder",
    )
    parser.add_argument("--dtype", default="float32", help="SGLang --dtype of the server")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: SGLang on the GPU (with sgl_kernel's torch stand-ins where it is missing)",
    )
    parser.add_argument(
        "--links",
        default="auto",
        help="emulated L3 links, e.g. 50mbps+1ms,1gbps+1ms; 'auto': 0.5x, 1x and 2x of the "
        "link balanced against the recompute time measured here",
    )
    parser.add_argument(
        "--link-factors",
        default="0.5,1,2",
        help="with --links auto: the multiples of the balanced link to run",
    )
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--order",
        choices=("once", "abba", "abba-balanced"),
        default="abba-balanced",
        help="abba: run the policies other than recompute forward then backward at each link, "
        "and recompute again after the last; abba-balanced: so at the balanced link of "
        "--links auto, once at the others",
    )
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
    parser.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel ranks of each server; each rank reads its own KV heads over its "
        "own emulated link, so the balanced link is per rank",
    )
    parser.add_argument(
        "--config",
        type=_json_object,
        default={},
        help="more --cacheflow-config keys for every server, e.g. '{\"stream_groups\": 3}'",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="keep each server's log (decisions) here"
    )


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"not JSON ({e}): write e.g. '{{\"stream_groups\": 3}}'"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"want a JSON object of config keys, got {text!r}")
    return value


def _model(name: str) -> Path:
    from sglang_cacheflow.models import (
        build_gpu_llama,
        build_small_llama,
        build_tiny_llama,
        convert_smollm2,
    )

    if name == "gpu":
        return build_gpu_llama()
    if name == "tiny":
        return build_tiny_llama()
    if name == "small":
        return build_small_llama()
    if name == "smollm2":
        return convert_smollm2()
    return Path(name)


def _ttft(server: Any, ids: list[int]) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    reply = server.generate(input_ids=ids, max_new_tokens=1, return_logprob=False)
    return time.perf_counter() - start, reply["meta_info"].get("cached_tokens_details") or {}


def _one(model: Path, link: str, policy: str, args: argparse.Namespace) -> dict[str, Any]:
    from sglang_cacheflow.sglang.cuda.install import cuda_server_args
    from sglang_cacheflow.testing.redis import RedisServer, wait_for_backups
    from sglang_cacheflow.testing.server import SGLangServer

    rng = random.Random(0)
    n, p = args.conversations, args.prefix
    convs = [[rng.randrange(256) for _ in range(p)] for _ in range(n)]
    total = n * (p + args.new) + 1024
    with RedisServer() as redis_server:
        cfg = {
            "redis_url": f"redis://127.0.0.1:{redis_server.port}/0",
            "link": link,
            "chunk_tokens": PAGE_TOKENS,
            "log_decisions": True,
            "prior": link_prior(link),
            **args.config,
        }
        flags = ["--dtype", args.dtype, "--page-size", str(PAGE_TOKENS)]
        flags += ["--max-total-tokens", str(total), "--tp", str(args.tp)]
        flags += [
            "--hicache-ratio",
            str(args.hicache_ratio),
            "--enable-cacheflow",
            "--cacheflow-policy",
            policy,
        ]
        flags += ["--enable-metrics", "--cacheflow-config", json.dumps(cfg)]
        cpu = args.device == "cpu"
        if not cpu:
            flags += [*cuda_server_args(), "--disable-cuda-graph"]
        server = SGLangServer(
            model,
            args=flags,
            env={"SGLANG_CACHEFLOW_HICACHE_RESERVE_GB": "1"},
            cpu=cpu,
            sleep_on_idle=cpu,
        )
        with server:
            # warm-up: forwards of several lengths calibrate the compute cost
            for k in (64, 128, 256, 512, p):
                server.generate(input_ids=[rng.randrange(256) for _ in range(k)], max_new_tokens=1)
            # the conversations' first turns, hit twice so HiCache writes them through to L3,
            # each backup landed before the next forward: the measured phases run beside no
            # backup (their pages are in Redis), and a forward beside one runs 10-60% slower
            # (docs/benchmarks.md); warm-up prefills that all ran beside one were fitted with
            # that slowdown as an attention term
            stored = wait_for_backups(redis_server.url, settle_s=1.0)
            for ids in convs:
                server.generate(input_ids=ids, max_new_tokens=1)
                server.generate(input_ids=ids, max_new_tokens=1)
                stored = wait_for_backups(
                    redis_server.url, settle_s=1.0, limit_s=60, at_least=stored + p // PAGE_TOKENS
                )
            # second turns (new tokens after a cached prefix, as returning turns are): with
            # the prefills above they tell the attention term from the per-token one (the
            # latest conversations: still in device memory)
            for i, k in enumerate((64, 128, 256) * 2):
                ids = convs[-1 - i % n] + [rng.randrange(256) for _ in range(k)]
                server.generate(input_ids=ids, max_new_tokens=1)
            # warm-up of the restore path, before anything is counted: a fresh server's first
            # restore also calibrates what a restore costs beyond its forwards and transfers
            server.flush_cache(wait_s=60)
            warm = convs[0] + [rng.randrange(256) for _ in range(args.new)]
            server.generate(input_ids=warm, max_new_tokens=1)
            single: list[float] = []
            together: list[float] = []
            details: list[dict[str, Any]] = []
            first = scrape_restores(server.base_url)
            idle: dict[str, float] = {}  # the (a) phases' histogram counts, summed
            for r in range(args.repeats):
                server.flush_cache(wait_s=60)
                before = scrape_restores(server.base_url)
                for ids in convs:
                    tail = [rng.randrange(256) for _ in range(args.new)]
                    t, d = _ttft(server, ids + tail)
                    single.append(t)
                    details.append(d)
                    server.flush_cache(wait_s=60)
                for k, v in scrape_restores(server.base_url).items():
                    idle[k] = idle.get(k, 0.0) + v - before.get(k, 0.0)
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
            last = scrape_restores(server.base_url)
            log = server.log_text()
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        path = args.log_dir / f"{link}-{policy}.log"
        k = 1
        while path.exists():  # A-B-B-A: the second server of a cell keeps its own log
            k += 1
            path = args.log_dir / f"{link}-{policy}-{k}.log"
        path.write_text(log)
    shapes = {
        k.removeprefix("shape:"): int(v - first.get(k, 0.0))
        for k, v in last.items()
        if k.startswith("shape:") and v > first.get(k, 0.0)
    }
    return {
        "link": link,
        "policy": policy,
        "tp": args.tp,
        "single_mean_s": statistics.mean(single),
        "together_mean_s": statistics.mean(together),
        "storage_tokens": sum(int(d.get("storage", 0)) for d in details),
        "decisions": sum(shapes.values()),
        "shapes": shapes,
        "predicted_within_10pct": {
            "single": predicted_within({}, idle, 0.10),
            "all": predicted_within(first, last, 0.10),
        },
        "predicted_within_25pct": {"all": predicted_within(first, last, 0.25)},
    }


def kv_bytes_per_token(model: Path, dtype: str) -> int:
    config = json.loads((model / "config.json").read_text())
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    size = {"float32": 4, "float16": 2, "bfloat16": 2, "half": 2}.get(dtype, 2)
    return 2 * config["num_hidden_layers"] * heads * head_dim * size


def balanced_link(prefix: int, kv_bytes_per_token: float, recompute_s: float) -> float:
    """Bit rate at which loading ``prefix`` tokens of KV takes ``recompute_s``."""
    return prefix * kv_bytes_per_token * 8 / recompute_s


def _link(bits_per_s: float) -> str:
    return f"{bits_per_s / 1e6:.0f}mbps+1ms"


def _average(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for the servers of one (link, policy): mean TTFTs and prediction accuracies,
    restore shapes summed."""
    out = dict(rows[0])
    for key in ("single_mean_s", "together_mean_s"):
        out[key] = statistics.mean(r[key] for r in rows)
    for key in ("predicted_within_10pct", "predicted_within_25pct"):
        phases = {p for r in rows for p in r.get(key, {})}
        out[key] = {
            p: statistics.mean(vals) if vals else None
            for p in phases
            for vals in [[r[key][p] for r in rows if r.get(key, {}).get(p) is not None]]
        }
    shapes: dict[str, int] = {}
    for r in rows:
        for shape, n in r.get("shapes", {}).items():
            shapes[shape] = shapes.get(shape, 0) + n
    out["shapes"] = shapes
    out["decisions"] = sum(r.get("decisions", 0) for r in rows)
    out["servers"] = len(rows)
    out["runs"] = [{k: r[k] for k in ("single_mean_s", "together_mean_s")} for r in rows]
    return out


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per link: each policy's gain over the better pure mode in (a) and (b), and T*."""
    out = []
    by_link: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_link.setdefault(r["link"], {})[r["policy"]] = r
    for link, rs in by_link.items():
        if "recompute" not in rs or "load" not in rs:
            continue
        tc, tio = rs["recompute"]["single_mean_s"], rs["load"]["single_mean_s"]
        entry: dict[str, Any] = {"link": link, "t_star_single_s": tc * tio / (tc + tio)}
        for phase in ("single", "together"):
            best = min(rs["recompute"][f"{phase}_mean_s"], rs["load"][f"{phase}_mean_s"])
            for policy in ("cake", "cacheflow"):
                if policy in rs:
                    entry[f"{policy}_{phase}_speedup"] = best / rs[policy][f"{phase}_mean_s"]
        if "cacheflow" in rs:
            entry["cacheflow_single_over_t_star"] = (
                rs["cacheflow"]["single_mean_s"] / entry["t_star_single_s"]
            )
        out.append(entry)
    return out


def schedule(
    others: list[str], links: list[str], order: str, recompute: bool
) -> list[tuple[str, str]]:
    """The (link, policy) servers to run after the first ``recompute`` one, in order.

    With ``abba`` each link runs ``others`` forward then backward; ``abba-balanced`` does so
    at the middle link only. When ``recompute`` is compared, a second recompute server closes
    the last A-B-B-A link, so that it brackets the other policies as they bracket each other:
    the machine's speed drifts within a run, and one recompute server at the start would
    charge that drift to every ratio over it.
    """
    out: list[tuple[str, str]] = []
    abba_links = [
        link
        for link in links
        if order == "abba" or (order == "abba-balanced" and link == links[len(links) // 2])
    ]
    for link in links:
        abba = link in abba_links
        out += [(link, p) for p in (others + others[::-1] if abba else others)]
        if recompute and abba and link == abba_links[-1]:
            out.append((link, "recompute"))
    return out


def run(args: argparse.Namespace) -> int:
    model = _model(args.model)
    policies = [x for x in args.policies.split(",") if x]
    others = [x for x in policies if x != "recompute"]

    def one(link: str, policy: str) -> dict[str, Any]:
        row = _one(model, link, policy, args)
        print(json.dumps(row), flush=True)
        return row

    recompute = None
    if "recompute" in policies or args.links == "auto":
        # no L3 read: the same TTFT at every link (its backups go out at the link's pace)
        recompute = one(args.links.split(",")[0] if args.links != "auto" else "1gbps+1ms",
                        "recompute")  # fmt: skip
    if args.links == "auto":
        assert recompute is not None
        per_rank = kv_bytes_per_token(model, args.dtype) / args.tp
        bits = balanced_link(args.prefix, per_rank, recompute["single_mean_s"])
        links = [_link(bits * float(f)) for f in args.link_factors.split(",") if f]
        print(f"balanced link: {_link(bits)} (recompute of {args.prefix} tokens took "
              f"{recompute['single_mean_s'] * 1e3:.0f} ms)", flush=True)  # fmt: skip
    else:
        links = [x for x in args.links.split(",") if x]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    recomputes = [recompute] if recompute is not None else []
    for link, policy in schedule(others, links, args.order, "recompute" in policies):
        row = one(link, policy)
        if policy == "recompute":
            recomputes.append(row)
        else:
            runs.setdefault((link, policy), []).append(row)
    rows: list[dict[str, Any]] = []
    for link in links:
        if recomputes:  # one row for every link: its servers read nothing from L3
            rows.append({**_average(recomputes), "link": link})
        rows += [_average(runs[link, p]) for p in others]
    print()
    n = args.conversations
    print(f"| L3 link | policy | (a) one at a time: mean TTFT | (b) {n} together: mean TTFT "
          "| restore shapes | predicted within 10% (a) |")  # fmt: skip
    print("| --- | --- | ---: | ---: | --- | ---: |")
    for row in rows:
        within = row["predicted_within_10pct"]["single"]
        shapes = ", ".join(f"{k} {v}" for k, v in sorted(row["shapes"].items()))
        print(
            f"| {row['link']} | {row['policy']} | {row['single_mean_s'] * 1e3:.0f} ms "
            f"| {row['together_mean_s'] * 1e3:.0f} ms | {shapes or '-'} "
            f"| {'-' if within is None else f'{within:.0%}'} |"
        )
    summary = summarize(rows)
    print()
    print("| L3 link | T* (a) | cacheflow / T* (a) | cacheflow (a) | cake (a) | cacheflow (b) "
          "| cake (b) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for e in summary:

        def x(key: str, e: dict[str, Any] = e) -> str:
            return f"{e[key]:.2f}x" if key in e else "-"

        print(
            f"| {e['link']} | {e['t_star_single_s'] * 1e3:.0f} ms "
            f"| {e.get('cacheflow_single_over_t_star', float('nan')):.2f} "
            f"| {x('cacheflow_single_speedup')} | {x('cake_single_speedup')} "
            f"| {x('cacheflow_together_speedup')} | {x('cake_together_speedup')} |"
        )
    if args.out is not None:
        args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sglang-cacheflow sglang-restore-bench")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
