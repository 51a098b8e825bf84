"""Faults under split restores on a real SGLang server (CPU engine, fp32 tiny Llama, real
redis-server): records corrupted in the middle of a split's range, redis-server killed in the
middle of a streamed read, and a layer split whose span follows a front in host memory. Every
reply must equal a server's with the radix cache disabled, the fallbacks must be counted, and
SGLang's idle pool check must find no leaked slot. The corrupted-records cases share a server
per configuration, each request forcing its shape (``custom_params``); the others start
servers that force one shape for every restore (the ``force_shape`` config key).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sglang_cacheflow.sglang.decision import logged_decisions
from sglang_cacheflow.testing.redis import RedisServer, wait_for_backups
from sglang_cacheflow.testing.server import SGLangServer
from tests.fixtures.sglang import StartServer
from tests.sglang.helpers import (
    FALLBACKS,
    PREFIX,
    ForcingServers,
    ask,
    assert_same_replies,
    corrupt,
    forced,
    forced_server,
    forcing,
    metrics,
    reference_server,
    returning_prompts,
    to_redis,
    total,
)

pytestmark = [pytest.mark.sglang, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def fault_reference(sglang_servers: StartServer, tiny_llama_path: Path) -> SGLangServer:
    return reference_server(sglang_servers, tiny_llama_path)


def test_a_layer_split_after_a_host_front_loads_the_front_back(
    sglang_servers: StartServer,
    tiny_llama_path: Path,
    fault_reference: SGLangServer,
    l3: RedisServer,
) -> None:
    # A conversation whose first FRONT tokens are in host memory and the rest of its prefix
    # only in Redis: the layer split restores the Redis span; the host front before it is
    # loaded back as for any host hit (it used to be left out of the match, the span then
    # started elsewhere than planned and the split was dropped for a recompute).
    front = 160
    server = forced_server(sglang_servers, tiny_llama_path, l3, "96mbps+1ms", "layer-split")
    try:
        p = returning_prompts(5)
        to_redis(server, p, l3)  # the "redis" prefix: in Redis only
        ask(server, p["redis"][:front] + p["next+"])  # its front back on device (a restore)
        ask(server, p["fill0"])
        ask(server, p["fill1"])  # ... and evicted from the device to host memory
        back = p["redis"] + p["redis+"]
        got = ask(server, back)
        assert_same_replies([ask(fault_reference, back)], [got])
        log = server.log_text()
        last = logged_decisions(log, "redis")[-1]
        assert last.shape == "layer split 2/4", last
        span = PREFIX - front
        assert re.findall(r"split rid=\S+: layer split 2/4; loaded layers \[2, 4\) of (\d+) "
                          r"of the (\d+)", log)[-1] == (str(span), str(span))  # fmt: skip
        assert got["meta_info"]["cached_tokens"] >= front, got["meta_info"]
        assert total(metrics(server), FALLBACKS) == 0
        time.sleep(1.0)
        assert "memory leak detected" not in server.log_text()
    finally:
        server.stop()


def _slow_split_server(start: StartServer, model: Path, l3: RedisServer, name: str) -> SGLangServer:
    """A server forcing the shape ``name`` whose Redis is seen through 8 Mbit/s: reading what
    a split loads of a 480-token span (240 tokens, 2 KiB each) takes about half a second."""
    return forced_server(start, model, l3, "8mbps+1ms", name)


CORRUPTED = [("token-split", 2), ("layer-split", 2), ("layer-split", 1),
             ("load-front-streamed", 2), ("load-all-streamed", 1),
             ("layer-split-two-forwards", 2), ("layer-split-two-forwards", 1),
             ("token-split-two-forwards", 2)]  # fmt: skip


@pytest.fixture(scope="module")
def slow_split_servers(
    sglang_servers: StartServer, tiny_llama_path: Path, l3: RedisServer
) -> Iterator[ForcingServers]:
    """Servers whose Redis is seen through 8 Mbit/s: reading what a split loads of a
    480-token span (240 tokens, 2 KiB each) takes about half a second."""
    servers = ForcingServers(sglang_servers, tiny_llama_path, l3, "8mbps+1ms")
    yield servers
    servers.stop()


@pytest.mark.parametrize(
    ("name", "every"),
    CORRUPTED,
    ids=["token-split-half", "layer-split-half", "layer-split-all", "load-front-half",
         "load-all-all", "two-forwards-half", "two-forwards-all", "token-two-forwards-half"],
)  # fmt: skip
def test_corrupted_records_under_a_split_restore_are_recomputed(
    name: str,
    every: int,
    slow_split_servers: ForcingServers,
    fault_reference: SGLangServer,
    l3: RedisServer,
) -> None:
    server = slow_split_servers.get(forced(name)[2])  # the request forces the shape
    force = forcing(name)
    p = returning_prompts(10 + CORRUPTED.index((name, every)))  # prompts of its own
    back = p["redis"] + p["redis+"]
    want = ask(fault_reference, back)
    client = redis.Redis(host="127.0.0.1", port=l3.port)
    # what earlier tests on this server back up has landed: the keys added next are this one's
    earlier = set(scan_keys(client, l3))
    to_redis(server, p, l3)
    keys = sorted(set(client.scan_iter(count=10_000)) - earlier)
    assert keys
    before = metrics(server)
    offset = len(server.log_text())
    # every other record, or all of them (nothing lands: a layer split whose span starts
    # at token 0 gives back its whole chunk and starts over): flip bytes in the second half
    corrupt(client, keys[every - 1 :: every])
    got = ask(server, back, **force)
    assert_same_replies([want], [got])
    m = metrics(server)
    assert total(m, FALLBACKS, reason="split_read_failed") > total(
        before, FALLBACKS, reason="split_read_failed"
    ), m
    log = server.log_text()[offset:]
    assert re.search(r"got \d+ of the \d+ tokens planned from redis \(split_read_failed", log)
    # found by the extend that streamed it, whose result was then dropped (no token)
    one = name in ("layer-split", "token-split")  # the CPU engine's default: in one forward
    where = "in its one forward" if one else "in the extend"
    assert re.search(rf"split rid=.* ms {where}\)", log), log
    # the restored prefix (what landed, the rest recomputed) serves the next turn
    following = ask(server, back + got["output_ids"] + p["next+"], **force)
    assert_same_replies([ask(fault_reference, back + got["output_ids"] + p["next+"])],
                        [following])  # fmt: skip
    time.sleep(1.0)
    assert "memory leak detected" not in server.log_text()


def scan_keys(client: redis.Redis, l3: RedisServer) -> list[bytes]:
    """Every key at ``l3`` once HiCache's backups have stopped landing."""
    wait_for_backups(l3.url, settle_s=2.5, limit_s=60)
    return list(client.scan_iter(count=10_000))


@pytest.mark.parametrize("name", ["token-split", "load-front-streamed", "layer-split"])
def test_redis_killed_in_the_middle_of_a_split_read(
    name: str,
    sglang_servers: StartServer,
    tiny_llama_path: Path,
    fault_reference: SGLangServer,
    slow_split_servers: ForcingServers,
) -> None:
    slow_split_servers.stop()  # done with: the CPU is this test's
    with RedisServer() as l3:  # its own: killed below
        _redis_killed_in_the_middle_of_a_read(
            _slow_split_server(sglang_servers, tiny_llama_path, l3, name),
            fault_reference, l3,
        )  # fmt: skip


def _redis_killed_in_the_middle_of_a_read(
    server: SGLangServer, fault_reference: SGLangServer, l3: RedisServer
) -> None:
    try:
        p = returning_prompts(4)
        back = p["redis"] + p["redis+"]
        want = ask(fault_reference, back)
        to_redis(server, p, l3)
        before = metrics(server)
        replies: list[Any] = []
        asking = threading.Thread(target=lambda: replies.append(ask(server, back)))
        planned = len(logged_decisions(server.log_text(), "redis"))
        asking.start()
        # its read starts as it is planned (logged): kill Redis about a fifth into the read,
        # however long the request took to reach the scheduler on a busy machine
        deadline = time.monotonic() + 60
        while len(logged_decisions(server.log_text(), "redis")) == planned:
            assert time.monotonic() < deadline, "the returning request was never planned"
            time.sleep(0.01)
        time.sleep(0.1)
        l3.kill()
        asking.join(timeout=120)
        assert not asking.is_alive(), "the request hung after Redis died"
        assert_same_replies([want], replies)
        after = metrics(server)
        assert total(after, FALLBACKS) > total(before, FALLBACKS), after
        # and the server goes on serving, from what it has and by recomputing
        assert_same_replies([ask(fault_reference, p["fill2"])], [ask(server, p["fill2"])])
        time.sleep(1.0)
        assert "memory leak detected" not in server.log_text()
    finally:
        server.stop()
