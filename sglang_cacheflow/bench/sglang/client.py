"""Replays sessions against a running SGLang server and measures time to first token.

Requests go to SGLang's native ``/generate`` with ``input_ids`` and ``stream: true``; the
TTFT is the time to the first streamed chunk that carries an output token, measured on the
client. (SGLang's ``bench_serving`` request function measures TTFT the same way but keys
it on detokenized text and keeps no output ids, which the answer check needs.)
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import aiohttp

from sglang_cacheflow.bench.workloads import Session, Turn


@dataclass
class Result:
    session: str
    turn: int
    returning: bool
    prompt_tokens: int
    cached_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


async def generate(
    http: aiohttp.ClientSession, base_url: str, session: str, index: int, turn: Turn
) -> Result:
    payload = {
        "input_ids": list(turn.input_ids),
        "sampling_params": {
            "temperature": 0.0,
            "max_new_tokens": turn.max_new_tokens,
            "ignore_eos": True,
        },
        "stream": True,
    }
    res = Result(session, index, turn.returning, len(turn.input_ids))
    start = time.perf_counter()
    try:
        async with http.post(f"{base_url}/generate", json=payload) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:500]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                ids = chunk.get("output_ids") or []
                if ids and not res.ttft_s:
                    res.ttft_s = time.perf_counter() - start
                if ids:
                    res.output_ids = list(ids)
                res.cached_tokens = int(chunk.get("meta_info", {}).get("cached_tokens", 0))
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    res.latency_s = time.perf_counter() - start
    if not res.error and not res.output_ids:
        res.error = "no output tokens"
    return res


async def _replay(
    base_url: str,
    sessions: Sequence[Session],
    concurrency: int,
    by_arrival: bool,
    progress: Callable[[Result], None] | None,
    request_rate: float = 0.0,
) -> list[Result]:
    timeout = aiohttp.ClientTimeout(total=3600)
    gaps = random.Random(0)
    sem = asyncio.Semaphore(concurrency)
    results: list[Result] = []
    # One connection per request: SGLang's server (uvicorn) closes a connection idle for
    # SGLANG_TIMEOUT_KEEP_ALIVE (5 s), and a round that waits longer than that for its slowest
    # turn can reuse a connection the server is closing at that moment (ServerDisconnected).
    # A loopback connect costs every policy the same ~0.1 ms.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:

        async def one(sid: str, k: int, turn: Turn, t0: float, at: float = 0.0) -> None:
            if by_arrival:
                await asyncio.sleep(max(0.0, t0 + turn.arrival_s - time.perf_counter()))
            elif at:
                await asyncio.sleep(at)
            async with sem:
                r = await generate(http, base_url, sid, k, turn)
            results.append(r)
            if progress:
                progress(r)

        if by_arrival:
            t0 = time.perf_counter()
            await asyncio.gather(
                *(one(s.id, k, t, t0) for s in sessions for k, t in enumerate(s.turns))
            )
        else:
            # Round k sends turn k of every session: by the time a session comes back, the
            # other sessions' turns have pushed its prefix down the cache hierarchy.
            rounds = max((len(s.turns) for s in sessions), default=0)
            for k in range(rounds):
                group = [s for s in sessions if k < len(s.turns)]
                # with a request rate, the round's turns arrive as a Poisson process
                at = [0.0] * len(group)
                for i in range(1, len(group) if request_rate > 0 else 0):
                    at[i] = at[i - 1] + gaps.expovariate(request_rate)
                await asyncio.gather(
                    *(one(s.id, k, s.turns[k], 0.0, a) for s, a in zip(group, at, strict=True))
                )
    return results


def replay(
    base_url: str,
    sessions: Sequence[Session],
    concurrency: int = 1,
    by_arrival: bool = False,
    progress: Callable[[Result], None] | None = None,
    request_rate: float = 0.0,
) -> list[Result]:
    """Send every turn of every session; ``concurrency`` requests at most in flight.

    Without ``by_arrival``, round k sends turn k of all sessions (the next round starts when
    the previous one is done; ``request_rate`` > 0 spaces a round's turns as a Poisson
    process of that many requests per second); with it, each turn is sent at its
    ``arrival_s``.
    """
    return asyncio.run(_replay(base_url, sessions, concurrency, by_arrival, progress, request_rate))
