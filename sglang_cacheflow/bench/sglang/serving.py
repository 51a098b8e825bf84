"""End-to-end runs on a real SGLang server: one server per (policy, emulated L3 bandwidth).

Each run starts SGLang with ``--enable-cacheflow --cacheflow-policy P`` (Redis as L3 seen
through an emulated link when a Redis URL is given), replays the sessions, reads the
server's restore counters from ``/metrics`` and stops the server. Every run starts cold: a
new server process and an emptied Redis database. Answers are checked against the first
policy's (greedy decoding, so a restore that changes the KV changes the ids).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sglang_cacheflow.bench.sglang.client import Result, replay
from sglang_cacheflow.bench.workloads import Session

RESERVE = "SGLANG_CACHEFLOW_HICACHE_RESERVE_GB"


@dataclass
class ServerSpec:
    """How to start SGLang for a run; ``args`` are passed through to ``launch_server``."""

    model: Path
    max_total_tokens: int = 4096
    hicache_ratio: float = 2.0
    chunk_tokens: int = 64
    args: tuple[str, ...] = ()
    cpu: bool = True

    def launch_args(self, policy: str, redis_url: str | None, link: str | None) -> list[str]:
        config: dict[str, Any] = {"chunk_tokens": self.chunk_tokens}
        if redis_url:
            config["redis_url"] = redis_url
            if link:
                config["link"] = link
                config["prior"] = link_prior(link)
        return [
            "--max-total-tokens", str(self.max_total_tokens),
            "--hicache-ratio", str(self.hicache_ratio),
            "--enable-metrics",
            "--enable-cacheflow",
            "--cacheflow-policy", policy,
            "--cacheflow-config", json.dumps(config),
            *self.args,
        ]  # fmt: skip


def link_prior(link: str) -> dict[str, float]:
    """The cost-model prior of a server whose L3 is seen through the emulated ``link``: its
    nominal rate, as an operator knows their network's (calibration refines it from the
    page reads; without it the first restores are planned with the default prior)."""
    from sglang_cacheflow.tiers.shaping import LinkShape

    return {"redis_GBps": LinkShape.parse(link).bandwidth_bytes_per_s / 1e9}


def link_for(gbps: float | None) -> str | None:
    """The emulated L3 link of a run (``None``: the Redis server as it is)."""
    return None if gbps is None else f"{gbps:g}gbps+0.2ms"


_BLEND = "sglang:cacheflow_blend_"


def scrape_restores(base_url: str) -> dict[str, float]:
    """Restore counters from ``/metrics``: ``load:TIER``, ``recompute:TIER``, ``fallbacks``,
    ``shape:SHAPE`` (restores given each shape), ``ratio_le:B`` (restores whose measured
    over predicted time was at most B, the error-ratio histogram's cumulative buckets) and
    ``blend:WHAT:LABEL`` (chunk reuse's counters, e.g. ``blend:requests:blended``)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as resp:
        return parse_restores(resp.read().decode())


def parse_restores(text: str) -> dict[str, float]:
    """:func:`scrape_restores` of a ``/metrics`` page's text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "sglang:cacheflow_restored_tokens_total":
                key = f"{s.labels.get('action')}:{s.labels.get('tier')}"
                out[key] = out.get(key, 0.0) + s.value
            elif s.name == "sglang:cacheflow_fallbacks_total":
                out["fallbacks"] = out.get("fallbacks", 0.0) + s.value
            elif s.name == "sglang:cacheflow_planned_requests_total":
                key = f"shape:{s.labels.get('shape')}"
                out[key] = out.get(key, 0.0) + s.value
            elif s.name.startswith(_BLEND) and s.name.endswith("_total") and s.labels:
                what = s.name[len(_BLEND) : -len("_total")]
                key = f"blend:{what}:{list(s.labels.values())[-1]}"
                out[key] = out.get(key, 0.0) + s.value
            elif s.name == "sglang:cacheflow_restore_error_ratio_bucket":
                key = f"ratio_le:{float(s.labels['le']):g}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def predicted_within(
    before: dict[str, float], after: dict[str, float], tolerance: float
) -> float | None:
    """Of the restores measured between two :func:`scrape_restores`, the fraction whose
    measured time was within ``tolerance`` of the predicted one (measured / predicted in
    ``(1 - tolerance, 1 + tolerance]``; both bounds must be buckets of the histogram)."""

    def count(le: str) -> float:
        key = f"ratio_le:{le}"
        if key not in after:
            raise ValueError(f"the error-ratio histogram has no bucket {le}")
        return after[key] - before.get(key, 0.0)

    n = count("inf")
    if n <= 0:
        return None
    return (count(f"{1 + tolerance:g}") - count(f"{1 - tolerance:g}")) / n


@dataclass
class Run:
    policy: str
    bandwidth_gbps: float | None
    results: list[Result]
    restores: dict[str, float]
    server_start_s: float = 0.0
    wall_s: float = 0.0
    answers_match: float | None = None  # fraction of turns equal to the reference policy
    errors: list[str] = field(default_factory=list)

    def predicted_within(self, tolerance: float) -> float | None:
        """:func:`predicted_within` of this run's restores; None if it measured none."""
        if "ratio_le:inf" not in self.restores:
            return None
        return predicted_within({}, self.restores, tolerance)

    def returning_ttfts(self) -> list[float]:
        return [r.ttft_s for r in self.results if r.returning and not r.error]

    def summary(self) -> dict[str, Any]:
        ret = self.returning_ttfts()
        allt = [r.ttft_s for r in self.results if not r.error]
        q = statistics.quantiles(ret, n=10) if len(ret) >= 2 else [float("nan")] * 9
        loaded = sum(v for k, v in self.restores.items() if k.startswith("load:"))
        recomputed = sum(v for k, v in self.restores.items() if k.startswith("recompute:"))
        return {
            "returning_turns": len(ret),
            "mean_ttft_returning_s": statistics.fmean(ret) if ret else None,
            "p50_ttft_returning_s": statistics.median(ret) if ret else None,
            "p90_ttft_returning_s": q[8] if ret else None,
            "mean_ttft_all_s": statistics.fmean(allt) if allt else None,
            "tokens_loaded": loaded,
            "tokens_recomputed": recomputed,
            "restores": self.restores,
            # restores whose measured time was within 10% / 25% of the planned one
            "predicted_within_10pct": self.predicted_within(0.10),
            "predicted_within_25pct": self.predicted_within(0.25),
            "answers_match": self.answers_match,
            "failed_requests": sum(1 for r in self.results if r.error),
            "server_start_s": self.server_start_s,
            "wall_s": self.wall_s,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "bandwidth_gbps": self.bandwidth_gbps,
            "summary": self.summary(),
            "requests": [r.to_dict() for r in self.results],
        }


def _flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def run_one(
    spec: ServerSpec,
    policy: str,
    sessions: Sequence[Session],
    redis_url: str | None,
    gbps: float | None,
    concurrency: int,
    by_arrival: bool,
    progress: Callable[[Result], None] | None = None,
    request_rate: float = 0.0,
) -> Run:
    """Start a server for ``policy``, replay ``sessions``, read its counters, stop it."""
    from sglang_cacheflow.testing.server import SGLangServer

    if redis_url:
        _flush_redis(redis_url)
    env = {}
    if spec.cpu:  # SGLang keeps 10 GiB free before sizing a host pool; a small box has less
        env = {"SGLANG_CACHEFLOW_HICACHE_RESERVE_GB": os.environ.get(RESERVE, "1")}
    server = SGLangServer(
        spec.model, spec.launch_args(policy, redis_url, link_for(gbps)), env=env, cpu=spec.cpu
    )
    with server:
        t0 = time.perf_counter()
        results = replay(server.base_url, sessions, concurrency, by_arrival, progress, request_rate)
        wall = time.perf_counter() - t0
        restores = scrape_restores(server.base_url)
    run = Run(policy, gbps, results, restores, server.startup_seconds or 0.0, wall)
    run.errors = [r.error for r in results if r.error]
    return run


def run_against(
    base_url: str,
    sessions: Sequence[Session],
    concurrency: int,
    by_arrival: bool,
    progress: Callable[[Result], None] | None = None,
    request_rate: float = 0.0,
) -> Run:
    """Replay ``sessions`` against a server that is already running, as it is configured."""
    try:
        before = scrape_restores(base_url)
    except OSError:  # no /metrics (started without --enable-metrics)
        before = {}
    t0 = time.perf_counter()
    results = replay(base_url, sessions, concurrency, by_arrival, progress, request_rate)
    wall = time.perf_counter() - t0
    try:
        after = scrape_restores(base_url)
    except OSError:
        after = {}
    restores = {k: v - before.get(k, 0.0) for k, v in after.items()}
    run = Run("as configured", None, results, restores, 0.0, wall)
    run.errors = [r.error for r in results if r.error]
    return run


def check_answers(runs: Sequence[Run]) -> None:
    """Set each run's ``answers_match`` against the first run with the same sessions.

    Only turns both runs answered are compared: a failed request is an error the bench
    reports as such, not a wrong answer."""
    if not runs:
        return
    ref = {(r.session, r.turn): r.output_ids for r in runs[0].results if not r.error}
    for run in runs:
        same = [
            ref[(r.session, r.turn)] == r.output_ids
            for r in run.results
            if (r.session, r.turn) in ref and not r.error
        ]
        run.answers_match = sum(same) / len(same) if same else None


def report(runs: Sequence[Run], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of a benchmark (schema in docs/bench-command.md)."""
    return {
        "meta": {
            **meta,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "runs": [r.to_dict() for r in runs],
    }
