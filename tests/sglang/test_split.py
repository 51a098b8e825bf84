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
and SGLang's idle pool check must find no leaked slot. Faults under a split restore are
in ``test_split_faults.py``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from sglang_cacheflow.sglang.decision import logged_decisions
from sglang_cacheflow.testing.redis import RedisServer
from sglang_cacheflow.testing.server import SGLangServer
from tests.fixtures.sglang import StartServer
from tests.sglang.helpers import (
    FALLBACKS,
    GROW,
    PREFIX,
    RESTORED,
    SHAPES,
    VARIANTS,
    assert_same_replies,
    forced,
    forced_server,
    metrics,
    reference_server,
    returning,
    returning_prompts,
    total,
)

pytestmark = [pytest.mark.sglang, pytest.mark.redis, pytest.mark.slow]


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
    # (a layer split's chunk pays it whole, up to the fitted per-forward cost, which a fit
    # over noisy forwards on a busy machine can put at 0)
    step, outside = map(float, re.findall(r"([\d.]+) ms/forward \(([\d.]+) outside", log)[-1])
    assert outside > 0, (step, outside)
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


@pytest.mark.parametrize("name", [*SHAPES, *VARIANTS])
def test_every_forced_shape_restores_exactly(
    name: str,
    sglang_servers: StartServer,
    tiny_llama_path: Path,
    l3: RedisServer,
    tiny_reference: list[Any],
) -> None:
    _, shape, config = forced(name)
    # 96 Mbit/s: a 240-token back (2 KiB a token) reads in about 40 ms
    server = forced_server(sglang_servers, tiny_llama_path, l3, "96mbps+1ms", name)
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
    _, shape, config = forced(name)
    if shape == "layer split 2/4":
        shape = "layer split 15/30"  # SmolLM2 has 30 layers
    # SmolLM2 in fp32 keeps 46 KiB a token: 1 Gbit/s reads 240 tokens' worth in about 90 ms
    server = forced_server(sglang_servers, smollm2_path, l3, "1gbps+1ms", name)
    _restores_exactly(server, l3, 2, smollm2_reference, shape, config)
