"""A soak under faults: conversations against a real ``--enable-cacheflow`` server (tiny fp32
Llama, pools small enough that restores happen all the time) while its Redis is paused past
the tier's timeout, restarted empty, and kept at ``maxmemory`` (it evicts as it goes).

Every reply equals a server's without cache, no request is stuck (each round is bounded),
the fallbacks are counted, SGLang's idle pool check finds no leaked slot, and the server's
memory does not grow round over round. CI runs it small; ``SOAK_ROUNDS=20 pytest -m soak``
runs it longer (figures in docs/benchmarks.md, "Reliability").
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from sglang_cacheflow.testing.redis import RedisServer
from sglang_cacheflow.testing.server import SGLangServer
from tests.fixtures.sglang import StartServer
from tests.sglang.helpers import (
    assert_same_replies,
    cacheflow_server,
    conversations,
    metrics,
    reference_server,
    total,
)

pytestmark = [pytest.mark.sglang, pytest.mark.redis, pytest.mark.slow, pytest.mark.soak]

ROUNDS = int(os.environ.get("SOAK_ROUNDS", "2"))
SHAPE = {"n_conv": 6, "turns": 3, "first": 240, "grow": 16, "new": 4}


@pytest.fixture(scope="module")
def l3() -> Iterator[RedisServer]:
    """Redis at ``maxmemory``: 4 MB hold about 2000 tokens of the tiny model's KV, a fraction
    of what the conversations back up, so it evicts all the time."""
    extra = ("--maxmemory-policy", "allkeys-lru")
    with RedisServer(maxmemory="4mb", extra_args=extra) as server:
        yield server


def _faults(server: RedisServer, stop: threading.Event, done: list[str]) -> None:
    """Until ``stop``: pause Redis past the tier's 1 s timeout, then restart it empty."""
    while not stop.wait(1.0):
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        stop.wait(2.5)
        os.kill(server.pid, signal.SIGCONT)
        done.append("pause")
        if stop.wait(1.0):
            break
        server.stop()
        server.start()  # same port, no persistence: every record is gone
        done.append("restart")


def _rss_mb(server: SGLangServer) -> float:
    """Resident memory of the server's whole process tree, MB."""
    assert server.pid is not None
    root = psutil.Process(server.pid)
    procs = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 1e6


def test_conversations_under_redis_faults(
    sglang_servers: StartServer, tiny_llama_path: Path, l3: RedisServer
) -> None:
    reference = reference_server(sglang_servers, tiny_llama_path)
    server = cacheflow_server(
        sglang_servers, tiny_llama_path, l3,
        redis={"socket_timeout_s": 1.0, "connect_timeout_s": 0.5},
    )  # fmt: skip
    rss: list[float] = []
    faults: list[str] = []
    replies = 0
    for r in range(ROUNDS):
        want = conversations([reference], seed=100 + r, **SHAPE)[0]
        stop = threading.Event()
        injector = threading.Thread(target=_faults, args=(l3, stop, faults))
        injector.start()
        pool = ThreadPoolExecutor(1)  # a stuck request fails the round instead of hanging CI
        try:
            got = pool.submit(conversations, [server], 100 + r, **SHAPE).result(timeout=300)
        finally:
            pool.shutdown(wait=False)
            stop.set()
            injector.join(timeout=30)
        assert_same_replies(want, got[0])
        replies += len(want)
        rss.append(_rss_mb(server))
    m = metrics(server)
    assert {"pause", "restart"} <= set(faults), faults
    assert total(m, "sglang:cacheflow_fallbacks_total") > 0, m
    time.sleep(1.0)  # idle: SGLang's scheduler checks its pools for leaked slots
    assert "memory leak detected" not in server.log_text()
    # memory: the last round's footprint is the first's, give or take the allocator
    assert rss[-1] < rss[0] * 1.25 + 50, rss
    print(
        f"soak: {ROUNDS} rounds, {replies} replies identical, faults {len(faults)} "
        f"({faults.count('pause')} pauses, {faults.count('restart')} restarts), fallbacks "
        f"{total(m, 'sglang:cacheflow_fallbacks_total'):.0f}, RSS {rss[0]:.0f} -> {rss[-1]:.0f} MB"
    )
