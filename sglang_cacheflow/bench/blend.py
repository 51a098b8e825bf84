"""``blend-bench``: chunk reuse beyond exact prefixes, quality and TTFT against full recompute.

Quality: RAG-style prompts (:mod:`~sglang_cacheflow.bench.blend_data`) on SmolLM2-135M; for
each selection (offline = CacheTune's idea with the probe or the spectral scorer, online =
CacheBlend, random) and ratio, against the full recompute of the same prompt: the KL
divergence of the first token's distribution (what the restored prefill itself yields),
the mean KL over the reference answer's tokens (teacher-forced) with its median over
prompts and the share of prompts where it is below plain reuse's, and greedy answer
agreement (the share of the reference answer's tokens reproduced before the first
difference: teacher forcing makes it exactly what greedy decoding would keep; on a 135M
model a rounding difference flips it, so it is the noisiest of the measures). Ratio 0 is
plain reuse (the negative control), ratio 1 full recompute through the reuse path.

TTFT: longer prompts, chunks from host memory and from Redis behind an emulated link;
full recompute and chunk reuse alternated A-B-B-A per prompt; the ratio the planner picks
(``plan_blend``, calibrated on this machine's measured forwards) besides a fixed one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sglang_cacheflow.bench.blend_data import Document, RagSet, rag_prompts
from sglang_cacheflow.blend.store import ChunkStore
from sglang_cacheflow.planner import Calibrator, CostModel, TierCost
from sglang_cacheflow.planner.blend import BlendRequest, Selection, plan_blend
from sglang_cacheflow.runtime.blend.restore import BlendPrompt, ChunkReuse
from sglang_cacheflow.runtime.kv import KVCache
from sglang_cacheflow.runtime.model import ModelAdapter
from sglang_cacheflow.runtime.workload import balanced_cost
from sglang_cacheflow.tiers import HostTier
from sglang_cacheflow.tiers.base import KVTier, Namespace
from sglang_cacheflow.tiers.names import HOST_TIER, REDIS_TIER

RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class QualityRow:
    dtype: str
    selection: str  # "plain" at ratio 0, "full" at ratio 1
    ratio: float  # asked
    recomputed_share: float  # reused tokens recomputed / reused tokens (pages rounded)
    agreement: float  # mean share of the reference answer kept before the first difference
    exact_answers: float  # share of prompts whose whole answer is the reference's
    first_kl: float  # mean KL(reference || reuse) of the first token's distribution
    kl: float  # mean over prompts of the mean KL over the answer's tokens
    kl_median: float  # median over prompts of the same
    beats_plain: float  # share of prompts whose answer KL is below plain reuse's
    ttft_s: float  # mean restore time from host memory
    prompts: int


@dataclass
class TtftRow:
    tier: str
    selection: str
    ratio: float
    planned: bool  # the planner's ratio (else fixed)
    full_s: float  # mean full recompute of the same prompts (A-B-B-A)
    reuse_s: float
    speedup: float
    predicted_s: float  # the planner's TTFT for the reuse
    loaded_mb: float
    prompts: int


def _model_dir(dtype: str) -> str:
    """SmolLM2-135M-Instruct converted once into a local folder of ``dtype``."""
    from sglang_cacheflow.models import convert_smollm2

    return str(convert_smollm2(dtype="float32" if dtype == "fp32" else "bfloat16"))


def load_model(dtype: str) -> ModelAdapter:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_model_dir(dtype), dtype=DTYPES[dtype])
    return ModelAdapter(model)


def tokenizer_for(dtype: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_dir(dtype))


def _prompt(rag: RagSet, picked: list[int], q: torch.Tensor) -> BlendPrompt:
    return BlendPrompt(rag.preamble, tuple(rag.pool[i].ids for i in picked), q)


def _answer_logits(
    model: ModelAdapter, kv: KVCache, first: torch.Tensor, answer: torch.Tensor, start: int
) -> torch.Tensor:
    """Next-token logits over the answer, teacher-forced: ``(len(answer), vocab)``."""
    if answer.numel() == 1:
        return first[None]
    hidden = model.run_layers(kv, model.embed(answer[:-1]), start, 0, model.num_layers)
    return torch.cat([first[None], model.logits(hidden[0])])


def _reference_answer(
    model: ModelAdapter, kv: KVCache, logits: torch.Tensor, start: int, steps: int
) -> torch.Tensor:
    # greedy() reads only the prompt's length from its ids
    return torch.tensor(model.greedy(kv, torch.empty(start, dtype=torch.long), logits, steps))


def _kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    p = torch.log_softmax(ref.float(), -1)
    q = torch.log_softmax(got.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _kept(ref_answer: torch.Tensor, logits: torch.Tensor) -> int:
    """Reference tokens greedy decoding keeps before its first different token."""
    same = (logits.argmax(-1) == ref_answer).tolist()
    return same.index(False) if False in same else len(same)


def quality(
    dtype: str,
    prompts: int,
    per_prompt: int,
    doc_tokens: int,
    answer_tokens: int,
    ratios: Sequence[float] = RATIOS,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[QualityRow]:
    """Every method at every ratio on the same prompts (module doc). The offline choice
    runs with both scorers, on two stores of the same chunks."""
    model = load_model(dtype)
    tok = tokenizer_for(dtype)
    rag = rag_prompts(tok, prompts, per_prompt, doc_tokens, seed)
    tier = HostTier(8 << 30)
    probed = _reuse(model, tier, rag, probe=True)
    spectral = _reuse(model, tier, rag, probe=False)
    methods = [
        ("offline (probe)", probed, Selection.OFFLINE),
        ("offline (spectral)", spectral, Selection.OFFLINE),
        (Selection.ONLINE.value, probed, Selection.ONLINE),
        (Selection.RANDOM.value, probed, Selection.RANDOM),
    ]
    cells: dict[tuple[str, float], list[tuple[float, ...]]] = {}
    for n, (picked, q) in enumerate(rag.prompts):
        prompt = _prompt(rag, picked, q)
        extra = answer_tokens
        ref_logits, ref_kv, _ = probed.full(prompt, extra)
        answer = _reference_answer(model, ref_kv, ref_logits, prompt.tokens, answer_tokens)
        ref = _answer_logits(model, ref_kv, ref_logits, answer, prompt.tokens)
        plain_kl = None
        for ratio in sorted(ratios):
            ends = ratio in (0, 1)  # the same for every method: plain reuse, full recompute
            for name, reuse, sel in methods[:1] if ends else methods:
                res = reuse.restore(prompt, sel, ratio, extra=extra, seed=seed + n)
                got = _answer_logits(model, res.kv, res.logits, answer, prompt.tokens)
                kept = _kept(answer, got)
                kl = _kl(ref, got)
                plain_kl = kl if ratio == 0 else plain_kl
                label = ("plain" if ratio == 0 else "full") if ends else name
                below = float(plain_kl is not None and kl < plain_kl)
                cells.setdefault((label, ratio), []).append(
                    (res.ratio, kept / answer.numel(), kept == answer.numel(),
                     _kl(ref[:1], got[:1]), kl, below, res.ttft_s)
                )  # fmt: skip
        log(f"{dtype} prompt {n + 1}/{len(rag.prompts)} ({prompt.tokens} tokens) done")
    rows = []
    for (name, ratio), vals in cells.items():
        share, agreement, whole, first, kl, below, ttft_s = (
            statistics.fmean(v[i] for v in vals) for i in range(7)
        )
        median = statistics.median(v[4] for v in vals)
        rows.append(QualityRow(dtype, name, ratio, share, agreement, whole, first, kl, median,
                               below, ttft_s, prompts=len(vals)))  # fmt: skip
    return sorted(rows, key=lambda r: (r.ratio, r.selection))


def _reuse(
    model: ModelAdapter, tier: KVTier, rag: RagSet, probe: bool, page_tokens: int = 16
) -> ChunkReuse:
    """The pool's chunks computed and stored in ``tier``, ordered by the probe scorer (or
    the spectral one)."""
    layout = model.new_kv(1, page_tokens).layout()
    store = ChunkStore(tier, Namespace("SmolLM2-135M-Instruct", layout))
    reuse = ChunkReuse(model, store, rag.preamble, rag.probe if probe else None)
    for doc in rag.pool:
        if not reuse.store_chunk(doc.ids):
            raise RuntimeError(f"the {tier.name} tier refused a chunk; give it more memory")
    return reuse


def calibrated_cost(
    model: ModelAdapter, tiers: dict[str, TierCost], sizes: Sequence[int] = (256, 1024, 2048)
) -> CostModel:
    """The planner's cost model on this machine: forwards measured at ``sizes`` (twice each,
    the second kept), tier costs as given."""
    prior = balanced_cost(model, 1e3, list(tiers))
    cal = Calibrator(CostModel(prior.shape, prior.compute, dict(tiers)))
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        for _ in range(2):
            kv = model.new_kv(n, 16)
            ids = torch.randint(0, model.info.vocab_size, (n,), generator=gen)
            t = time.perf_counter()
            model.prefill(kv, ids[: n // 2])
            half = time.perf_counter() - t
            t = time.perf_counter()
            model.prefill(kv, ids[n // 2 :], start=n // 2)
            rest = time.perf_counter() - t
        cal.add_compute(0, n // 2, half)
        cal.add_compute(n // 2, n - n // 2, rest)
    return CostModel(prior.shape, cal.compute_cost(), dict(tiers))


def host_cost(reuse: ChunkReuse, doc: Document) -> TierCost:
    """Host memory's cost measured on one stored chunk (all its pages, all layers)."""
    store = reuse.store
    stored = store.meta(reuse.key(doc.ids), doc.ids.numel())
    assert stored is not None
    layers = (0, store.layout.num_layers)
    outs = [store.layout.empty() for _ in range(stored.pages(store.page_tokens))]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        store.read([(stored, 0)], layers, outs)
        best = min(best, time.perf_counter() - t)
    return TierCost(len(outs) * store.layout.page_bytes / best)


def ttft(
    prompts: int,
    per_prompt: int,
    doc_tokens: int,
    link: str,
    dtype: str = "fp32",
    fixed_ratio: float = 0.15,
    min_ratio: float = 0.15,
    seed: int = 1,
    log: Callable[[str], None] = print,
) -> tuple[list[TtftRow], dict[str, Any]]:
    """Full recompute against chunk reuse (offline choice), per tier, A-B-B-A per prompt."""
    from sglang_cacheflow.testing.redis import RedisServer
    from sglang_cacheflow.tiers.redis import RedisTier
    from sglang_cacheflow.tiers.shaping import LinkShape, ShapedTier

    model = load_model(dtype)
    tok = tokenizer_for(dtype)
    rag = rag_prompts(tok, prompts, per_prompt, doc_tokens, seed)
    shape = LinkShape.parse(link)
    rows: list[TtftRow] = []
    with RedisServer() as server, RedisTier(server.url) as redis:
        tiers: dict[str, KVTier] = {
            HOST_TIER: HostTier(8 << 30),
            REDIS_TIER: ShapedTier(redis, shape),
        }
        reuses = {name: _reuse(model, tier, rag, probe=True) for name, tier in tiers.items()}
        costs = {
            HOST_TIER: host_cost(reuses[HOST_TIER], rag.pool[0]),
            REDIS_TIER: TierCost(shape.bandwidth_bytes_per_s, shape.latency_s),
        }
        cost = calibrated_cost(model, costs)
        meta: dict[str, Any] = {
            "dtype": dtype,
            "link": shape.describe(),
            "compute": asdict(cost.compute),
            "host_GBps": costs[HOST_TIER].bandwidth_Bps / 1e9,
        }
        for name, reuse in reuses.items():
            cells: dict[str, list[tuple[float, float, float, float]]] = {}
            full_s: list[float] = []
            for n, (picked, q) in enumerate(rag.prompts):
                prompt = _prompt(rag, picked, q)
                pre = rag.preamble.numel()
                first = rag.pool[picked[0]].ids.numel()
                reused = prompt.tokens - pre - first - q.numel()
                req = BlendRequest(f"p{n}", name, pre, first, reused, q.numel())
                planned = plan_blend([req], cost, min_ratio=min_ratio)
                fixed = plan_blend([req], cost, min_ratio=0.0, ratio=fixed_ratio)
                variants = {"fixed": fixed, "planned": planned}
                order = ["full", "fixed", "planned", "planned", "fixed", "full"]  # A-B-B-A
                for v in order:
                    if v == "full":
                        full_s.append(reuse.full(prompt)[2])
                        continue
                    b0 = reuse.store.tier.stats.get_bytes
                    res = reuse.restore(prompt, Selection.OFFLINE, variants[v].ratio)
                    mb = (reuse.store.tier.stats.get_bytes - b0) / 1e6
                    cells.setdefault(v, []).append(
                        (variants[v].ratio, res.ttft_s, variants[v].plans[0].ttft_s, mb)
                    )
                log(f"{name}: prompt {n + 1}/{len(rag.prompts)} ({prompt.tokens} tokens) done")
            full = statistics.fmean(full_s)
            for v, vals in cells.items():
                reuse_s = statistics.fmean(x[1] for x in vals)
                rows.append(TtftRow(
                    tier=name if name == HOST_TIER else f"{name} ({shape.describe()})",
                    selection=Selection.OFFLINE.value, ratio=statistics.fmean(x[0] for x in vals),
                    planned=v == "planned", full_s=full, reuse_s=reuse_s, speedup=full / reuse_s,
                    predicted_s=statistics.fmean(x[2] for x in vals),
                    loaded_mb=statistics.fmean(x[3] for x in vals), prompts=len(rag.prompts),
                ))  # fmt: skip
    return rows, meta


# -- output ----------------------------------------------------------------------------------


def quality_table(rows: Sequence[QualityRow]) -> str:
    head = (
        "| dtype | selection | ratio | recomputed | first-token KL | answer KL (mean, median) "
        "| below plain | agreement | whole answer | TTFT (host) |"
    )
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r.dtype} | {r.selection} | {r.ratio:.0%} | {r.recomputed_share:.1%} | "
            f"{r.first_kl:.4f} | {r.kl:.4f}, {r.kl_median:.4f} | {r.beats_plain:.0%} | "
            f"{r.agreement:.2f} | {r.exact_answers:.2f} | {r.ttft_s * 1e3:.0f} ms |"
        )
    return "\n".join(lines)


def ttft_table(rows: Sequence[TtftRow]) -> str:
    head = "| chunks from | ratio | full recompute | chunk reuse | speed-up | predicted | read |"
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        how = f"{r.ratio:.0%} ({'planner' if r.planned else 'fixed'})"
        lines.append(
            f"| {r.tier} | {how} | {r.full_s * 1e3:.0f} ms | {r.reuse_s * 1e3:.0f} ms | "
            f"{r.speedup:.2f}x | {r.predicted_s * 1e3:.0f} ms | {r.loaded_mb:.0f} MB |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[QualityRow], path: Path) -> Path:
    from sglang_cacheflow.bench.plots import plt

    dtypes = sorted({r.dtype for r in rows})
    fig, axes = plt.subplots(
        len(dtypes), 3, figsize=(15, 3.8 * len(dtypes)), dpi=110, squeeze=False
    )
    for row, dtype in zip(axes, dtypes, strict=True):
        mine = [r for r in rows if r.dtype == dtype]
        ends = [r for r in mine if r.selection in ("plain", "full")]
        methods = sorted({r.selection for r in mine} - {"plain", "full"})
        for sel in methods:
            pts = sorted([r for r in mine if r.selection == sel] + ends, key=lambda r: r.ratio)
            xs = [r.ratio * 100 for r in pts]
            row[0].plot(xs, [r.first_kl for r in pts], marker="o", label=sel)
            row[1].plot(xs, [r.kl for r in pts], marker="o", label=sel)
            row[2].plot(xs, [r.ttft_s * 1e3 for r in pts], marker="o", label=sel)
        row[0].set_ylabel(f"{dtype}: first-token KL to full recompute")
        row[1].set_ylabel(f"{dtype}: answer KL to full recompute")
        row[2].set_ylabel(f"{dtype}: TTFT, chunks in host memory (ms)")
        for ax in row:
            ax.set_xlabel("recompute ratio (%)")
            ax.grid(alpha=0.3)
            ax.legend()
        row[0].set_yscale("symlog", linthresh=1e-3)
        row[1].set_yscale("symlog", linthresh=1e-3)
    fig.suptitle("Chunk reuse on SmolLM2-135M: quality and TTFT against the recompute ratio")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- command ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtypes", default="fp32,bf16", help="quality sweep dtypes (fp32, bf16)")
    parser.add_argument("--prompts", type=int, default=8, help="quality prompts per dtype")
    parser.add_argument("--docs", type=int, default=4, help="documents per quality prompt")
    parser.add_argument("--doc-tokens", type=int, default=480, help="tokens per document")
    parser.add_argument("--answer-tokens", type=int, default=24, help="reference answer length")
    parser.add_argument("--ratios", default="0,0.05,0.15,0.3,1", help="recompute ratios")
    parser.add_argument("--ttft-prompts", type=int, default=3, help="TTFT prompts (0: skip)")
    parser.add_argument("--ttft-docs", type=int, default=6, help="documents per TTFT prompt")
    parser.add_argument("--ttft-doc-tokens", type=int, default=640, help="tokens per TTFT document")
    parser.add_argument("--link", default="10gbps+0.2ms", help="emulated link to Redis")
    parser.add_argument("--ttft-dtype", default="fp32", choices=list(DTYPES), help="TTFT dtype")
    parser.add_argument("--min-ratio", type=float, default=0.15, help="the planner's quality floor")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--out", type=Path, default=Path("results/blend"), help="output folder")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(x) for x in args.ratios.split(",") if x]
    if any(not 0 <= r <= 1 for r in ratios):
        raise SystemExit(f"--ratios must be in [0, 1], got {args.ratios}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; use {', '.join(DTYPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    q_rows: list[QualityRow] = []
    for dtype in dtypes:
        q_rows += quality(
            dtype, args.prompts, args.docs, args.doc_tokens, args.answer_tokens, ratios
        )
    report["quality"] = [asdict(r) for r in q_rows]
    text = ["## Quality", "", quality_table(q_rows), ""]
    if q_rows:
        text += [f"![quality and TTFT vs ratio]({plot(q_rows, args.out / 'blend.png').name})", ""]
    if args.ttft_prompts:
        t_rows, meta = ttft(args.ttft_prompts, args.ttft_docs, args.ttft_doc_tokens, args.link,
                            args.ttft_dtype, min_ratio=args.min_ratio)  # fmt: skip
        report["ttft"] = [asdict(r) for r in t_rows]
        report["ttft_meta"] = meta
        text += ["## TTFT", "", ttft_table(t_rows), "", f"cost model: {json.dumps(meta)}", ""]
    (args.out / "blend.json").write_text(json.dumps(report, indent=1))
    (args.out / "blend.md").write_text("\n".join(text))
    print("\n".join(text))
    return 0
