"""``sglang-cacheflow overlap-bench``: what a tier read costs a forward that runs beside it.

A split restore's forwards run while its back is read from the tier in the same process.
This bench times a prefill of ``--tokens`` tokens through the first N layers of a model (the
reference runtime's partial forward, on this machine's CPU) alone and beside a thread that
keeps reading the pages of as many tokens from a private redis-server (through an emulated
``--link``), in rounds of alone, beside, beside, alone, and reports per layer count the
delay the reads added. It also reports the client's CPU time of one such read on its own
(the process's CPU time over the call): on a 2-core machine the delay tracks that CPU, not
the forward's length, which is what the servers' overlap slowdown (a proportion) does not
capture.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder (default: the demo's SmolLM2)")
    parser.add_argument("--tokens", type=int, default=384, help="prompt tokens of the forward")
    parser.add_argument("--layers", default="3,10,30", help="layer counts to time, comma-separated")
    parser.add_argument("--page-tokens", type=int, default=1, help="tokens per tier page")
    parser.add_argument("--groups", type=int, default=1, help="layer groups a read is made in")
    parser.add_argument("--link", default="0.193gbps", help="emulated link, e.g. 1gbps+0.2ms")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of alone, beside x2, alone")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from sglang_cacheflow.runtime.model import ModelAdapter
    from sglang_cacheflow.testing.redis import RedisServer
    from sglang_cacheflow.tiers import LinkShape, Namespace, PageLayout, ShapedTier
    from sglang_cacheflow.tiers.redis import RedisTier

    if min(args.tokens, args.page_tokens, args.groups, args.rounds) < 1:
        raise SystemExit("--tokens, --page-tokens, --groups and --rounds must be at least 1")
    if args.tokens % args.page_tokens:
        raise SystemExit("--tokens must be a multiple of --page-tokens")
    path = args.model
    if path is None:
        from sglang_cacheflow.models import convert_smollm2

        path = str(convert_smollm2())  # the weights the demo serves, run in fp32 here
    model = ModelAdapter(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    info = model.info
    layout = PageLayout(
        info.num_layers, args.page_tokens, info.num_kv_heads, info.head_dim, info.dtype
    )
    counts = [int(x) for x in args.layers.split(",")]
    if not counts or min(counts) < 1 or max(counts) > layout.num_layers:
        raise SystemExit(f"--layers: each count must be in [1, {layout.num_layers}]")
    ids = torch.randint(0, info.vocab_size, (1, args.tokens))
    kv = model.new_kv(args.tokens, args.page_tokens)
    pages = args.tokens // args.page_tokens
    read_layers = (1, layout.num_layers) if layout.num_layers > 1 else (0, 1)
    report: dict[str, Any] = {
        "model": path, "tokens": args.tokens, "page_tokens": args.page_tokens,
        "pages": pages, "groups": args.groups, "link": args.link,
        "threads": torch.get_num_threads(), "rounds": args.rounds, "results": [],
    }  # fmt: skip
    with RedisServer() as server, RedisTier(server.url) as rtier:
        tier = ShapedTier(rtier, LinkShape.parse(args.link))
        ns = Namespace("overlap-bench", layout)
        keys = [f"p{i}" for i in range(pages)]
        g = torch.Generator().manual_seed(0)
        rtier.batch_put(ns, keys, [torch.randn(layout.shape(), generator=g) for _ in keys])
        lo, hi = read_layers
        step = -(-(hi - lo) // args.groups)
        bounds = [(a, min(hi, a + step)) for a in range(lo, hi, step)]
        outs = [[layout.empty((a, b)) for _ in keys] for a, b in bounds]

        def read(through: Any) -> None:
            for (a, b), out in zip(bounds, outs, strict=True):
                if not all(through.batch_get_into(ns, keys, out, (a, b))):
                    raise RuntimeError("overlap-bench: a page did not read back")

        read(rtier)  # warm the connections
        cpu = []
        for _ in range(3):
            c = time.process_time()
            read(rtier)
            cpu.append(time.process_time() - c)
        report["read_cpu_ms"] = min(cpu) * 1e3
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                read(tier)

        def forward(layers: int) -> float:
            """A prefill of ``ids`` through the first ``layers`` layers (a split's chunk)."""
            t = time.perf_counter()
            model.run_layers(kv, model.embed(ids), 0, 0, layers)
            return time.perf_counter() - t

        def beside(layers: int) -> float:
            stop.clear()
            thread = threading.Thread(target=reader)
            thread.start()
            try:
                return forward(layers)
            finally:
                stop.set()
                thread.join()

        try:
            for n in counts:
                forward(n)  # warm
                alone: list[float] = []
                slow: list[float] = []
                for _ in range(args.rounds):
                    alone.append(forward(n))
                    slow += [beside(n), beside(n)]
                    alone.append(forward(n))
                a, b = statistics.mean(alone), statistics.mean(slow)
                report["results"].append(
                    {"layers": n, "alone_ms": a * 1e3, "beside_ms": b * 1e3,
                     "delay_ms": (b - a) * 1e3, "slowdown": b / a - 1.0}
                )  # fmt: skip
        finally:
            rtier.delete(ns, keys)
    print(
        f"{pages} pages of {args.page_tokens} tokens read in {len(bounds)} call(s) through "
        f"{args.link}: {report['read_cpu_ms']:.1f} ms of client CPU a read"
    )
    print(f"{'layers':>6}{'alone ms':>10}{'beside ms':>11}{'delay ms':>10}{'slowdown':>10}")
    for r in report["results"]:
        print(
            f"{r['layers']:>6}{r['alone_ms']:>10.1f}{r['beside_ms']:>11.1f}"
            f"{r['delay_ms']:>10.1f}{r['slowdown']:>10.0%}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0
