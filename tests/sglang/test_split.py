"""Split restores on a real SGLang server (CPU engine, fp32 models, real redis-server).

One conversation returns to a prefix evicted to host memory, another to one evicted to Redis,
on servers that force one restore shape each (``force_shape``), for the tiny Llama and for
SmolLM2-135M: Cake's order (recompute the front in a first chunk while the back is read, then
splice it in), the layer split (a first chunk through the bottom layers only while the top
layers are read), load-front, load all and recompute all, and the Redis front loads streamed
into the extend (``stream_front_loads``). Every reply must equal a server's with the radix
cache disabled (greedy ids identical, logprobs within 1e-4), the decision
log must name the shape, ``/metrics`` must show the same request loading and recomputing
where the shape mixes them, the restored span must be cached on device for the next turn,
and SGLang's idle pool check must find no leaked slot. Then Redis is made to fail under a
split restore: records corrupted, and the server killed in the middle of a read.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from sglang_cacheflow.sglang.decision import logged_decisions
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
    corrupt,
    metrics,
    reference_server,
    returning,
    returning_prompts,
    to_redis,
    total,
)

pytestmark = [pytest.mark.sglang, pytest.mark.redis, pytest.mark.slow]

# (force_shape, force_recompute) -> what the decision log calls it for a 480-token span
SHAPES = {
    "token-split": (("token", 0.5), "token split 240+240"),
    "layer-split": (("layer", 0.5), "layer split 2/4"),
    "load-front": (("load_front", 0.5), "load front 240+240"),
    "load-all": (("load_front", 0.0), "load all"),
    "recompute-all": (("load_front", 1.0), "recompute all"),
}
FRONT_LOADS = {"stream_front_loads": True}  # L3 front loads read by the split reader, streamed
TWO_FORWARDS = {"one_forward_layer_splits": False}  # a layer split's chunk, then the extend


def _cacheflow(
    start: StartServer, model: Path, l3: RedisServer, link: str, force: tuple[str, float],
    **config: Any,
) -> SGLangServer:  # fmt: skip
    return cacheflow_server(
        start, model, l3, link=link, force_shape=force[0], force_recompute=force[1], **config
    )


def _check_restores(
    server: SGLangServer, shape: str, replies: list[Any], config: dict[str, Any]
) -> None:
    streamed = config.get("stream_groups") != 1
    log = server.log_text()
    m = metrics(server)
    for tier in ("host", "redis"):
        decisions = logged_decisions(log, tier)
        assert [d.shape for d in decisions] == [shape], (tier, decisions)
        loaded = total(m, RESTORED, action="load", tier=tier)
        recomputed = total(m, RESTORED, action="recompute", tier=tier)
        assert loaded + recomputed == PREFIX, (tier, m)
        if shape == "load all":
            assert loaded == PREFIX, (tier, m)
        elif shape == "recompute all":
            assert recomputed == PREFIX, (tier, m)
        else:  # the same request loaded half of its span and recomputed the other half
            assert loaded == recomputed == PREFIX // 2, (tier, m)
    assert total(m, FALLBACKS) == 0, m
    # the CPU engine times its layer loop: what a forward spends outside it is measured
    # (a layer split's chunk pays it whole), a part of the per-forward cost
    step, outside = map(float, re.findall(r"([\d.]+) ms/forward \(([\d.]+) outside", log)[-1])
    assert 0 < outside <= step, (step, outside)
    layers = r"(?:layers \[\d+, \d+\) of )?"
    pattern = rf"split rid=\S+: {re.escape(shape)}; loaded {layers}(\d+) of the (\d+)"
    done = re.findall(pattern, log)
    # streamed into the extend (the CPU engine's default), or spliced whole before it
    where = "in the extend" if streamed else "at the splice"
    if streamed and "layer split" in shape and config.get("one_forward_layer_splits", True):
        where = "in its one forward"  # the CPU engine's default
    if "split" in shape:  # both restores were spliced whole
        assert len(done) == 2 and all(a == b for a, b in done), done
        assert len(re.findall(rf"split rid=.* ms {where}\)", log)) == 2, log
    elif config.get("stream_front_loads"):  # the Redis front streamed into the extend, whole
        assert len(done) == 1 and done[0][0] == done[0][1] != "0", done
        assert len(re.findall(rf"split rid=.* ms {where}\)", log)) == 1, log
    else:  # SGLang's prefetch and load-back: no split reader
        assert not done, done
    # the restored span is a device node of the tree: the next turn hits all of it
    following = replies[2]["meta_info"]
    assert following["cached_tokens"] >= PREFIX + GROW, following
    time.sleep(1.0)  # idle: SGLang's scheduler checks its pools for leaked slots
    assert "memory leak detected" not in server.log_text()


def _reference_replies(start: StartServer, model: Path, seed: int) -> list[Any]:
    """The returning conversations of ``seed`` on a server with the radix cache disabled."""
    ref = reference_server(start, model)
    replies = returning(ref, returning_prompts(seed), None)
    ref.stop()
    return replies


@pytest.fixture(scope="module")
def tiny_reference(sglang_servers: StartServer, tiny_llama_path: Path) -> list[Any]:
    return _reference_replies(sglang_servers, tiny_llama_path, 1)


# a forced shape on a server configured otherwise: (shape, config)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "token-split-unstreamed": ("token-split", {"stream_groups": 1}),  # with the overlap loop
    "load-front-streamed": ("load-front", FRONT_LOADS),
    "load-all-streamed": ("load-all", FRONT_LOADS),
    "layer-split-two-forwards": ("layer-split", TWO_FORWARDS),
}


@pytest.mark.parametrize("name", [*SHAPES, *VARIANTS])
def test_every_forced_shape_restores_exactly(
    name: str,
    sglang_servers: StartServer,
    tiny_llama_path: Path,
    l3: RedisServer,
    tiny_reference: list[Any],
) -> None:
    base, config = VARIANTS.get(name, (name, {}))
    force, shape = SHAPES[base]
    # 96 Mbit/s: a 240-token back (2 KiB a token) reads in about 40 ms
    server = _cacheflow(sglang_servers, tiny_llama_path, l3, "96mbps+1ms", force, **config)
    _restores_exactly(server, l3, 1, tiny_reference, shape, config)


def _restores_exactly(
    server: SGLangServer, l3: RedisServer, seed: int, want: list[Any], shape: str,
    config: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Run the returning conversations of ``seed`` on ``server`` (started with ``config``),
    compare with ``want``, check the restores it made (all in ``shape``), and stop it."""
    try:
        replies = returning(server, returning_prompts(seed), l3)
        assert_same_replies(want, replies)
        _check_restores(server, shape, replies, config or {})
    finally:
        server.stop()


@pytest.fixture(scope="module")
def smollm2_reference(sglang_servers: StartServer, smollm2_path: Path) -> list[Any]:
    return _reference_replies(sglang_servers, smollm2_path, 2)


@pytest.mark.parametrize("name", [*SHAPES, "load-front-streamed", "layer-split-two-forwards"])
def test_smollm2_restores_every_forced_shape_exactly(
    name: str,
    sglang_servers: StartServer,
    smollm2_path: Path,
    l3: RedisServer,
    smollm2_reference: list[Any],
) -> None:
    base, config = VARIANTS.get(name, (name, {}))
    force, shape = SHAPES[base]
    if base == "layer-split":
        shape = "layer split 15/30"  # SmolLM2 has 30 layers
    # SmolLM2 in fp32 keeps 46 KiB a token: 1 Gbit/s reads 240 tokens' worth in about 90 ms
    server = _cacheflow(sglang_servers, smollm2_path, l3, "1gbps+1ms", force, **config)
    _restores_exactly(server, l3, 2, smollm2_reference, shape, config)


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
    server = _cacheflow(sglang_servers, tiny_llama_path, l3, "96mbps+1ms", SHAPES["layer-split"][0])
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


# -- faults under a split restore --------------------------------------------------------


@pytest.fixture(scope="module")
def fault_reference(sglang_servers: StartServer, tiny_llama_path: Path) -> SGLangServer:
    return reference_server(sglang_servers, tiny_llama_path)


def _slow_split_server(start: StartServer, model: Path, l3: RedisServer, name: str) -> SGLangServer:
    """A server forcing the shape ``name`` (of :data:`SHAPES` or :data:`VARIANTS`) whose Redis
    is seen through 8 Mbit/s: reading what a split loads of a 480-token span (240 tokens,
    2 KiB each) takes about half a second."""
    base, config = VARIANTS.get(name, (name, {}))
    return _cacheflow(start, model, l3, "8mbps+1ms", SHAPES[base][0], **config)


@pytest.mark.parametrize(
    ("name", "every"),
    [("token-split", 2), ("layer-split", 2), ("layer-split", 1), ("load-front-streamed", 2),
     ("load-all-streamed", 1), ("layer-split-two-forwards", 2),
     ("layer-split-two-forwards", 1)],
    ids=["token-split-half", "layer-split-half", "layer-split-all", "load-front-half",
         "load-all-all", "two-forwards-half", "two-forwards-all"],
)  # fmt: skip
def test_corrupted_records_under_a_split_restore_are_recomputed(
    name: str,
    every: int,
    sglang_servers: StartServer,
    tiny_llama_path: Path,
    fault_reference: SGLangServer,
    l3: RedisServer,
) -> None:
    server = _slow_split_server(sglang_servers, tiny_llama_path, l3, name)
    try:
        p = returning_prompts(3)
        back = p["redis"] + p["redis+"]
        want = ask(fault_reference, back)
        to_redis(server, p, l3)
        client = redis.Redis(host="127.0.0.1", port=l3.port)
        keys = sorted(client.scan_iter(count=10_000))
        assert keys
        # every other record, or all of them (nothing lands: a layer split whose span starts
        # at token 0 gives back its whole chunk and starts over): flip bytes in the second half
        corrupt(client, keys[every - 1 :: every])
        got = ask(server, back)
        assert_same_replies([want], [got])
        m = metrics(server)
        assert total(m, FALLBACKS, reason="split_read_failed") >= 1, m
        log = server.log_text()
        assert re.search(r"got \d+ of the \d+ tokens planned from redis \(split_read_failed", log)
        # found by the extend that streamed it, whose result was then dropped (no token)
        one = name == "layer-split"  # the CPU engine's default: in one forward
        where = "in its one forward" if one else "in the extend"
        assert re.search(rf"split rid=.* ms {where}\)", log), log
        # the restored prefix (what landed, the rest recomputed) serves the next turn
        following = ask(server, back + got["output_ids"] + p["next+"])
        assert_same_replies([ask(fault_reference, back + got["output_ids"] + p["next+"])],
                            [following])  # fmt: skip
        time.sleep(1.0)
        assert "memory leak detected" not in server.log_text()
    finally:
        server.stop()


@pytest.mark.parametrize("name", ["token-split", "load-front-streamed", "layer-split"])
def test_redis_killed_in_the_middle_of_a_split_read(
    name: str,
    sglang_servers: StartServer,
    tiny_llama_path: Path,
    fault_reference: SGLangServer,
) -> None:
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
        asking.start()
        time.sleep(0.15)  # the back is being read: about a quarter of it is in
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
