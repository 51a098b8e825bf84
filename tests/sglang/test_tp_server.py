"""``--tp 2`` servers with ``--enable-cacheflow`` (CPU engine, tiny fp32 Llama, real Redis).

Each rank holds one of the model's two KV heads and keeps its own records in Redis
(``...:tp0of2`` and ``...:tp1of2``). The two ranks must take the same decisions and extend
the same tokens even when only one of them is short of KV: a record corrupted for one rank
only, or one rank's Redis connections cut while a split restore reads. Every reply is
compared with a TP=1 server's with the radix cache disabled (greedy ids identical,
logprobs within 1e-4: the two ranks' partial sums are added in another order than one
rank's, a difference of about 1e-6 in fp32).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from sglang_cacheflow.testing.redis import RedisServer
from sglang_cacheflow.testing.server import SGLangServer
from tests.fixtures.sglang import StartServer
from tests.sglang.helpers import (
    FALLBACKS,
    GROW,
    PREFIX,
    RESTORED,
    ask,
    assert_same_replies,
    cacheflow_server,
    conversations,
    corrupt,
    metrics,
    reference_server,
    returning_prompts,
    to_redis,
    total,
)

pytestmark = [pytest.mark.sglang, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def reference(sglang_servers: StartServer, tiny_llama_path: Path) -> SGLangServer:
    """TP=1, no radix cache: every prefill computes the whole prompt."""
    return reference_server(sglang_servers, tiny_llama_path)


def _tp2(start: StartServer, model: Path, l3: RedisServer, **cfg: Any) -> SGLangServer:
    return cacheflow_server(start, model, l3, "--tp", "2", **cfg)


def _decisions_by_rank(log: str) -> dict[str, list[str]]:
    """Each rank's restore decision lines, without their time stamps."""
    out: dict[str, list[str]] = {"TP0": [], "TP1": []}
    for rank, line in re.findall(r"^\[[^\]]* (TP[01])\] (cacheflow restore rid=\S+ policy=.*)$",
                                 log, flags=re.MULTILINE):  # fmt: skip
        out[rank].append(line)
    return out


def test_tp2_conversations_restore_from_host_and_redis_like_tp1(
    sglang_servers: StartServer, tiny_llama_path: Path, l3: RedisServer, reference: SGLangServer
) -> None:
    # the link of test_server.py, where a round of returning conversations loads some
    # prefixes and recomputes others
    server = _tp2(
        sglang_servers, tiny_llama_path, l3,
        link="96mbps+1ms", prior={"redis_GBps": 0.012, "redis_latency_ms": 1.0},
    )  # fmt: skip
    try:
        log = server.log_text()
        # the plugin bound one core to each rank and kept collectives off NCCL
        assert "2 ranks on 1 NUMA node(s)" in log or "SGLANG_CPU_OMP_THREADS_BIND" in log
        assert re.search(r"TP1\] sglang-cacheflow: rank 1 on cores", log), log[-2000:]
        ref, got = conversations([reference, server], seed=5)
        assert_same_replies(ref, got)
        m = metrics(server)
        assert total(m, RESTORED, action="load", tier="host") > 0, m
        assert total(m, RESTORED, action="load", tier="redis") > 0, m
        by_rank = _decisions_by_rank(server.log_text())
        assert by_rank["TP0"], "no restore decision logged"
        assert by_rank["TP0"] == by_rank["TP1"]
    finally:
        server.stop()


def _spliced_alike(log: str) -> int:
    """The tokens the one split restore in ``log`` spliced, the same on both ranks."""
    spliced = re.findall(
        r"(TP[01])\] cacheflow split rid=\S+: [^;]+; loaded (?:layers \[\d+, \d+\) of )?(\d+) of",
        log,
    )
    counts = dict(spliced)
    assert len(spliced) == 2 and set(counts) == {"TP0", "TP1"}, spliced
    assert counts["TP0"] == counts["TP1"], spliced
    return int(counts["TP0"])


def _rank_keys(client: redis.Redis, rank: int) -> list[bytes]:
    return sorted(client.scan_iter(match=f"*:tp{rank}of2:*", count=10_000))


@pytest.mark.parametrize(
    "shape",
    [{"force_shape": "token"}, {"force_shape": "layer"}],  # a layer split: in one forward
    ids=["token-split", "layer-split-one-forward"],
)
def test_record_corrupted_for_one_rank_only(
    shape: dict[str, Any],
    sglang_servers: StartServer,
    tiny_llama_path: Path,
    l3: RedisServer,
    reference: SGLangServer,
) -> None:
    # half of the span recomputed for every restore (Cake's order: its front; a layer split
    # in one forward: its bottom layers), the rest read
    server = _tp2(
        sglang_servers, tiny_llama_path, l3, link="8mbps+1ms", force_recompute=0.5, **shape
    )
    try:
        p = returning_prompts(6)
        back = p["redis"] + p["redis+"]
        to_redis(server, p, l3)
        client = redis.Redis(host="127.0.0.1", port=l3.port)
        mine, other = _rank_keys(client, 1), _rank_keys(client, 0)
        assert mine and len(mine) == len(other)
        corrupt(client, mine[len(mine) // 2 :])  # rank 1 only, the back half of its records
        before = metrics(server)
        got = ask(server, back)
        assert_same_replies([ask(reference, back)], [got])
        after = metrics(server)
        # counted once (rank 0 keeps the metrics), though rank 0's own read was whole
        assert total(after, FALLBACKS) - total(before, FALLBACKS) == 1, after
        assert total(after, FALLBACKS, reason="split_read_failed") >= 1, after
        # both ranks spliced the same pages: what rank 1 got, agreed by MIN, short of what
        # the split loads (Cake's order: the back half; a layer split: all of the span)
        planned = PREFIX // 2 if shape["force_shape"] == "token" else PREFIX
        assert _spliced_alike(server.log_text()) < planned
        # the next turn is served from the restored prefix on both ranks alike
        nxt = back + got["output_ids"] + p["next+"]
        assert_same_replies([ask(reference, nxt)], [ask(server, nxt)])
        assert ask(server, nxt)["meta_info"]["cached_tokens"] >= PREFIX + GROW
        time.sleep(1.0)
        assert "memory leak detected" not in server.log_text()
    finally:
        server.stop()


def _shut_out(client: redis.Redis, name: str) -> int:
    """Cut every connection named ``name`` and keep it from reconnecting: Redis refuses new
    connections beyond ``maxclients``, set to the connections that stay. Returns how many
    were cut."""
    conns = client.client_list()
    cut = [c for c in conns if c.get("name") == name]
    client.config_set("maxclients", len(conns) - len(cut))
    for c in cut:
        client.client_kill_filter(_id=c["id"])
    return len(cut)


def test_one_rank_loses_redis_in_the_middle_of_a_split_read(
    sglang_servers: StartServer, tiny_llama_path: Path, l3: RedisServer, reference: SGLangServer
) -> None:
    # 4 Mbit/s: the 240 tokens of the back (1 KiB a token on each rank) take half a second
    server = _tp2(
        sglang_servers, tiny_llama_path, l3,
        link="4mbps+1ms", force_shape="token", force_recompute=0.5,
    )  # fmt: skip
    admin = redis.Redis(host="127.0.0.1", port=l3.port)
    maxclients = admin.config_get("maxclients")["maxclients"]
    try:
        p = returning_prompts(7)
        back = p["redis"] + p["redis+"]
        want = ask(reference, back)
        to_redis(server, p, l3)
        before = metrics(server)
        replies: list[Any] = []
        asking = threading.Thread(target=lambda: replies.append(ask(server, back)))
        asking.start()
        time.sleep(0.15)  # both ranks are reading the back
        assert _shut_out(admin, "sglang-cacheflow-tp1of2") > 0
        asking.join(timeout=120)
        assert not asking.is_alive(), "the request hung after rank 1 lost Redis"
        assert_same_replies([want], replies)
        admin.config_set("maxclients", maxclients)
        after = metrics(server)
        assert total(after, FALLBACKS) - total(before, FALLBACKS) == 1, after
        assert _spliced_alike(server.log_text()) < PREFIX // 2
        # rank 1 reconnects: the server goes on serving like TP=1
        assert_same_replies([ask(reference, p["fill2"])], [ask(server, p["fill2"])])
        time.sleep(1.0)
        assert "memory leak detected" not in server.log_text()
    finally:
        admin.config_set("maxclients", maxclients)
        server.stop()
