"""``sglang-cacheflow tier-bench``: throughput and per-page latency of the Redis tier.

Writes ``--pages`` pages of ``--shape`` (``--page-tokens`` tokens each) to the Redis at
``--url`` (or to a private redis-server it starts when no URL is given), reads them back
whole and by layer range, and reports GB/s for batches, the median latency of single-page
calls, and the client's CPU time per page (what a read takes from a forward on the same
host: with small pages the per-command work, not the bytes, is most of it). With
``--redis-benchmark`` it also runs ``redis-benchmark`` GET/SET on the same server, with
values of the tier's record size and the same number of connections, and reports the tier's
share of it. Its SET test writes random keys (about 63% of its key space), so before its GET
test the benchmark writes the keys it left out: every GET then moves a value, as the tier's
do (otherwise a third of them read nil, which moves nothing and inflates GB/s). The whole
measurement runs ``--repeat`` rounds, the tier and ``redis-benchmark`` alternating, and
keeps the best round of each (other jobs on the machine then disturb both alike).
``--emulate 10gbps`` measures through the link emulation wrapper instead (labelled as
emulated). The benchmark's pages are deleted at the end; ``redis-benchmark`` writes keys
``key:<12 digits>``, which are deleted too.

The CLI calls :func:`add_arguments` and :func:`run`; ``python -m
sglang_cacheflow.bench.tiers`` runs :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import torch

from sglang_cacheflow.tiers import KVTier, LinkShape, Namespace, PageLayout, ShapedTier
from sglang_cacheflow.tiers.page import SHAPES, BlockHeader
from sglang_cacheflow.tiers.redis import RedisTier, RedisTierConfig, redact_url

__all__ = ["BenchResult", "add_arguments", "main", "run", "run_bench"]


@dataclass
class BenchResult:
    op: str  # "set", "get", "get layers a:b"
    gbps: float  # GB/s (1e9 bytes) over the batch
    page_ms: float  # median latency of a single-page call, ms
    bytes_per_page: int
    # CPU time of this process (the tier's client, all its threads) per page of the batch:
    # what a read takes from a forward that shares the host with it
    cpu_us_per_page: float = 0.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=None,
        help="Redis URL (redis://, rediss://, unix://, redis+cluster://); "
        "default: start a private redis-server on a free loopback port",
    )
    parser.add_argument(
        "--private-cluster",
        action="store_true",
        help="without --url: start a private 3-node Redis Cluster instead",
    )
    parser.add_argument("--pages", type=int, default=32, help="pages per run (default 32)")
    parser.add_argument("--page-tokens", type=int, default=256, help="tokens per page")
    parser.add_argument(
        "--shape",
        default="llama-8b",
        help=f"model shape: {', '.join(sorted(SHAPES))} or LAYERSxHEADSxDIM",
    )
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    parser.add_argument("--tp-size", type=int, default=1, help="KV heads split over this TP")
    parser.add_argument("--streams", type=int, default=2, help="threads/connections per call")
    parser.add_argument(
        "--layers-per-block",
        type=int,
        default=None,
        help="layers per Redis value (default: about --block-bytes)",
    )
    parser.add_argument(
        "--block-bytes",
        type=int,
        default=1 << 20,
        help="target bytes per Redis value (default 1 MiB)",
    )
    parser.add_argument(
        "--pipeline-bytes",
        type=int,
        default=1 << 20,
        help="bytes of values per pipelined round trip (default 1 MiB)",
    )
    parser.add_argument(
        "--layer-range",
        action="append",
        default=None,
        metavar="A:B",
        help="layer range to read (repeatable); default: top half and one layer",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds (tier, then redis-benchmark); best of each kept",
    )
    parser.add_argument(
        "--redis-benchmark",
        action="store_true",
        help="also run redis-benchmark GET/SET with the same value size",
    )
    parser.add_argument(
        "--emulate",
        default=None,
        metavar="LINK",
        help="measure through an emulated link, e.g. 10gbps or 25gbps+0.2ms",
    )
    parser.add_argument(
        "--no-direct-io",
        action="store_true",
        help="use redis-py pipelines for data (the tier's fallback path)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _ranges(specs: list[str] | None, layers: int) -> list[tuple[int, int]]:
    if not specs:
        return [(layers // 2, layers), (layers - 1, layers)]
    out = []
    for spec in specs:
        try:
            a, b = (int(x) for x in spec.split(":"))
        except ValueError:
            raise SystemExit(f"--layer-range {spec!r}: write A:B, e.g. 16:32") from None
        if not 0 <= a < b <= layers:
            raise SystemExit(f"--layer-range {spec!r} is outside [0, {layers}]")
        out.append((a, b))
    return out


def _best_time(fn: Any, repeat: int) -> float:
    return _best_times(fn, repeat)[0]


def _best_times(fn: Any, repeat: int) -> tuple[float, float]:
    """The lowest wall time and the lowest process CPU time of ``repeat`` calls of ``fn``."""
    wall, cpu = [], []
    for _ in range(repeat):
        c, t = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def run_bench(
    tier: KVTier, layout: PageLayout, pages: int, ranges: list[tuple[int, int]], repeat: int
) -> list[BenchResult]:
    """Measure set, get and ranged get of ``pages`` pages on ``tier``: GB/s of the best of
    ``repeat`` batch calls, and the median latency of 8 single-page calls."""
    ns = Namespace(f"tier-bench-{uuid.uuid4().hex[:8]}", layout)
    g = torch.Generator().manual_seed(0)
    distinct = [torch.randn(layout.shape(), generator=g).to(layout.dtype) for _ in range(4)]
    data = [distinct[i % 4] for i in range(pages)]
    hashes = [f"{uuid.uuid4().hex}" for _ in range(pages)]
    results = []
    try:
        t_set, c_set = _best_times(lambda: _check(tier.batch_put(ns, hashes, data)), repeat)
        single = [
            _best_time(lambda h=h, p=p: tier.put(ns, h, p), 1)
            for h, p in zip(hashes[:8], data[:8], strict=True)
        ]
        results.append(
            BenchResult(
                "set",
                pages * layout.page_bytes / t_set / 1e9,
                statistics.median(single) * 1e3,
                layout.page_bytes,
                c_set / pages * 1e6,
            )
        )
        for rng in [None, *ranges]:
            l0, l1 = layout.check_layers(rng)
            # Touched before timing, as a host pool is: page faults are not the tier's.
            outs = [torch.zeros(layout.shape(rng), dtype=layout.dtype) for _ in range(pages)]
            t_get, c_get = _best_times(
                lambda rng=rng, outs=outs: _check(tier.batch_get_into(ns, hashes, outs, rng)),
                repeat,
            )
            one = layout.empty(rng)
            single = [
                _best_time(lambda h=h, rng=rng, one=one: tier.get_into(ns, h, one, rng), 1)
                for h in hashes[:8]
            ]
            nbytes = (l1 - l0) * layout.layer_bytes
            name = "get" if rng is None else f"get layers {l0}:{l1}"
            results.append(
                BenchResult(
                    name,
                    pages * nbytes / t_get / 1e9,
                    statistics.median(single) * 1e3,
                    nbytes,
                    c_get / pages * 1e6,
                )
            )
            for i in range(min(pages, 4)):
                if not torch.equal(outs[i], data[i][l0:l1]):
                    raise RuntimeError(f"{name}: page {i} read back different bytes")
    finally:
        tier.delete(ns, hashes)
    return results


def _best_of(rounds: list[list[BenchResult]]) -> list[BenchResult]:
    """Per op, the highest GB/s and the lowest single-page latency and CPU over the rounds."""
    return [
        BenchResult(
            same[0].op,
            max(r.gbps for r in same),
            min(r.page_ms for r in same),
            same[0].bytes_per_page,
            min(r.cpu_us_per_page for r in same),
        )
        for same in zip(*rounds, strict=True)
    ]


def _check(flags: list[bool]) -> None:
    if not all(flags):
        raise RuntimeError(f"{flags.count(False)} of {len(flags)} pages failed; see the log")


def redis_benchmark(
    url: str, value_bytes: int, count: int, clients: int, tests: str = "set,get"
) -> dict[str, float]:
    """GB/s of ``redis-benchmark -t <tests>`` (requests/s x ``value_bytes``) with
    ``value_bytes`` values over ``count`` keys (``-r``), on the server of ``url`` (single
    node, or cluster mode)."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise SystemExit("redis-benchmark is not installed (apt-get install -y redis-tools)")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    cmd = [exe, "-t", tests, "-d", str(value_bytes), "-n", str(count), "-r", str(count),
           "-c", str(clients), "--csv"]  # fmt: skip
    if scheme == "unix":
        cmd += ["-s", parts.path]
    else:
        host_port = parts.netloc.rsplit("@", 1)[-1].split(",")[0]
        host, _, port = host_port.rpartition(":")
        cmd += ["-h", host or "127.0.0.1", "-p", port or "6379"]
        if "cluster" in scheme or "cluster=true" in parts.query:
            cmd += ["--cluster"]
        if scheme.startswith("rediss"):
            cmd += ["--tls"]
    if parts.password:
        cmd += ["-a", parts.password, "--no-auth-warning"]
    if parts.username:
        cmd += ["--user", parts.username]
    db = parts.path.strip("/") if scheme != "unix" else ""
    if db.isdigit() and db != "0":
        cmd += ["--dbnum", db]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    rates = {}
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) >= 2 and cells[0] in ("SET", "GET"):
            rates[cells[0].lower()] = float(cells[1]) * value_bytes / 1e9
    return rates


# redis-benchmark's keys: key:<12 digits>, in cluster mode key:{<tag>}:<12 digits>.
_RB_KEY = re.compile(rb"^key:(\{[^:]*\}+:)?[0-9]{12}$")


def _redis_benchmark_keys(tier: RedisTier) -> list[bytes]:
    return [k for k in tier.client.scan_iter(match="key:*", count=1000) if _RB_KEY.match(k)]


def _fill_redis_benchmark_keys(tier: RedisTier, keys: list[bytes], count: int, size: int) -> None:
    """Write every key of redis-benchmark's key space that its SET test left out (it picks
    random keys), so that its GET test reads a value every time, as the tier does."""
    present = set(keys)
    value = bytes(size)
    missing = [
        name
        for prefix in {k.rsplit(b":", 1)[0] for k in keys} or {b"key"}
        for i in range(count)
        if (name := prefix + b":%012d" % i) not in present
    ]
    for lo in range(0, len(missing), 32):
        pipe = tier.client.pipeline(transaction=False)
        for name in missing[lo : lo + 32]:
            pipe.set(name, value)
        pipe.execute()


def _get_hit_fraction(keys: list[bytes], count: int) -> float:
    """Share of redis-benchmark's GETs that can find a value: the keys present over its key
    space (``count`` keys per cluster hash tag in use)."""
    tags = {k.rsplit(b":", 1)[0] for k in keys}
    return min(1.0, len(keys) / (count * max(1, len(tags))))


def _cleanup_redis_benchmark_keys(tier: RedisTier, keys: list[bytes]) -> None:
    for lo in range(0, len(keys), 500):
        tier._delete_keys(keys[lo : lo + 500])


def run(args: argparse.Namespace) -> int:
    """Run the benchmark with parsed ``args``; prints a table or JSON; returns 0."""
    layout = PageLayout.from_shape_name(
        args.shape, page_tokens=args.page_tokens, dtype=args.dtype, tp_size=args.tp_size
    )
    ranges = _ranges(args.layer_range, layout.num_layers)
    server: Any = None
    url = args.url
    if url is None:
        from sglang_cacheflow.testing.redis import RedisCluster, RedisServer

        server = RedisCluster().start() if args.private_cluster else RedisServer().start()
        url = server.url
    try:
        cfg = RedisTierConfig(
            url=url, streams=args.streams, layers_per_block=args.layers_per_block,
            block_bytes=args.block_bytes, pipeline_bytes=args.pipeline_bytes,
            direct_io=not args.no_direct_io,
        )  # fmt: skip
        with RedisTier(cfg) as rtier:
            tier: KVTier = rtier
            link = LinkShape.parse(args.emulate) if args.emulate else None
            if link is not None:
                tier = ShapedTier(rtier, link)
            lpb = cfg.layers_per_block_for(layout)
            record = BlockHeader.size_for(lpb) + lpb * layout.layer_bytes
            # redis-benchmark keys: as many values as the tier moves, and at least 512 MiB.
            count = max(args.pages * -(-layout.num_layers // lpb), (512 << 20) // record)
            # The tier runs ``streams`` connections to each master: give redis-benchmark
            # as many (it spreads its clients over the masters).
            masters = len(rtier.client.get_primaries()) if rtier.is_cluster else 1
            clients = args.streams * masters
            rounds: list[list[BenchResult]] = []
            ref_rounds: list[dict[str, float]] = []
            for _ in range(max(1, args.repeat)):
                # Two calls per figure in a round: the first warms the connections.
                rounds.append(run_bench(tier, layout, args.pages, ranges, 2))
                if args.redis_benchmark:
                    rates = redis_benchmark(url, record, count, clients, "set")
                    _fill_redis_benchmark_keys(rtier, _redis_benchmark_keys(rtier), count, record)
                    rates |= redis_benchmark(url, record, count, clients, "get")
                    keys = _redis_benchmark_keys(rtier)
                    hit = _get_hit_fraction(keys, count)  # 1.0 after the fill
                    if "get" in rates:  # GB/s of values delivered, as for the tier
                        rates["get"] *= hit
                    rates["get_hit_fraction"] = hit
                    ref_rounds.append(rates)
                    _cleanup_redis_benchmark_keys(rtier, keys)
            results = _best_of(rounds)
            ref = {
                op: max(r[op] for r in ref_rounds)
                for op in ("set", "get")
                if ref_rounds and all(op in r for r in ref_rounds)
            }
            report = {
                "tier": tier.name,
                "emulated": link is not None,
                "url": redact_url(url) + (" (private, started by tier-bench)" if server else ""),
                "cluster": rtier.is_cluster,
                "layout": layout.tag,
                "page_bytes": layout.page_bytes,
                "pages": args.pages,
                "streams": args.streams,
                "connections": clients,
                "layers_per_block": lpb,
                "record_bytes": record,
                "pipeline_bytes": args.pipeline_bytes,
                "direct_io": rtier.direct_io,
                "rounds": max(1, args.repeat),
                "results": [asdict(r) for r in results],
                "redis_benchmark_gbps": ref,
                "redis_benchmark_get_hit_fraction": [r["get_hit_fraction"] for r in ref_rounds],
            }
            if ref:
                by_op = {r.op: r.gbps for r in results}
                report["share_of_redis_benchmark"] = {
                    op: by_op[op] / ref[op] for op in ("set", "get") if ref.get(op)
                }
                # Same statistic round by round (tier and redis-benchmark measured seconds
                # apart), median over the rounds: less sensitive to one quiet moment.
                report["share_of_redis_benchmark_median_round"] = {
                    op: statistics.median(
                        {r.op: r.gbps for r in tier_round}[op] / ref_round[op]
                        for tier_round, ref_round in zip(rounds, ref_rounds, strict=True)
                    )
                    for op in report["share_of_redis_benchmark"]
                }
    finally:
        if server is not None:
            server.cleanup()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _print_table(report: dict[str, Any]) -> None:
    kind = "EMULATED link " if report["emulated"] else ""
    print(f"{kind}{report['tier']} at {report['url']}  cluster={report['cluster']}")
    print(
        f"pages: {report['pages']} x {report['layout']} ({report['page_bytes'] / 2**20:.2f} "
        f"MiB), streams {report['streams']}, {report['layers_per_block']} layers "
        f"({report['record_bytes'] / 2**20:.2f} MiB) per Redis value, "
        f"direct_io={report['direct_io']}, best of {report['rounds']} rounds"
    )
    print(f"{'op':<22}{'GB/s':>8}{'ms/page':>10}{'MiB/page':>10}{'CPU us/page':>13}")
    for r in report["results"]:
        print(
            f"{r['op']:<22}{r['gbps']:>8.2f}{r['page_ms']:>10.2f}"
            f"{r['bytes_per_page'] / 2**20:>10.2f}{r['cpu_us_per_page']:>13.1f}"
        )
    ref = report.get("redis_benchmark_gbps")
    if ref:
        share = report["share_of_redis_benchmark"]
        for op in ("set", "get"):
            if op in ref:
                print(
                    f"redis-benchmark {op.upper()} {ref[op]:.2f} GB/s (same value size, "
                    f"{report['connections']} connections): tier at {share[op]:.0%} "
                    f"(median of rounds {report['share_of_redis_benchmark_median_round'][op]:.0%})"
                )
        hits = report["redis_benchmark_get_hit_fraction"]
        if min(hits) < 1:
            print(f"(redis-benchmark GET: only {min(hits):.0%} of its keys held a value)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sglang-cacheflow tier-bench", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
