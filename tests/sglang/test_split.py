"""Split restores on a real SGLang server (CPU engine, fp32 models, real redis-server).

One conversation returns to a prefix evicted to host memory, another to one evicted to Redis,
each request forcing one restore shape on itself (its ``custom_params``; a server per
configuration, the shapes in turn on it, each on conversations of its own), for the tiny
Llama and for SmolLM2-135M: Cake's order (recompute the front in a first chunk while the back
is read, then splice it in), the layer split (a first chunk through the bottom layers only
while the top layers are read), load-front, load all and recompute all, and the Redis front
loads streamed into the extend (``stream_front_loads``). Every reply must equal a server's
with the radix cache disabled (greedy ids identical, logprobs within 1e-4), the decision
log must name the shape, ``/metrics`` must show the same request loading and recomputing
where the shape mixes them, the restored span must be cached on device for the next turn,
and SGLang's idle pool check must find no leaked slot. Faults under a split restore are
in ``test_split_faults.py``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sglang_cacheflow.sglang.decision import logged_decisions
from sglang_cacheflow.testing.redis import RedisServer
from sglang_cacheflow.testing.server import SGLangServer, SGLangServerError
from tests.fixtures.sglang import StartServer
from tests.sglang.helpers import (
    FALLBACKS,
    GROW,
    PREFIX,
    RESTORED,
    SHAPES,
    VARIANTS,
    ForcingServers,
    ask,
    assert_same_replies,
    forced,
    forcing,
    metrics,
    reference_server,
    returned,
    returning,
    returning_prompts,
    total,
)

pytestmark = [pytest.mark.sglang, pytest.mark.redis, pytest.mark.slow]


def _check_restores(
    server: SGLangServer,
    shape: str,
    replies: list[Any],
    config: dict[str, Any],
    log: str,
    m: dict[str, float],
) -> None:
    """Check what ``server`` logged (``log``) and counted (``m``: the ``/metrics`` deltas)
    while it served ``replies``, all of whose restores were forced into ``shape``."""
    streamed = config.get("stream_groups") != 1
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
    kind = "layer" if "layer split" in shape else "token"
    if streamed and "split" in shape and config.get(f"one_forward_{kind}_splits", True):
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


def _restores_exactly(
    servers: ForcingServers, name: str, seed: int, want: list[Any], num_layers: int
) -> None:
    """Run the returning conversations of ``seed``, each restore forcing the shape ``name``,
    on the server of ``name``'s configuration; compare with ``want`` and check the
    restores made."""
    _, shape, config = forced(name)
    if shape == "layer split 2/4":
        shape = f"layer split {num_layers // 2}/{num_layers}"
    server = servers.get(config)
    offset = len(server.log_text())
    before = metrics(server)
    replies = returning(server, returning_prompts(seed), servers.l3, **forcing(name))
    assert_same_replies(want, replies)
    after = metrics(server)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    _check_restores(server, shape, replies, config, server.log_text()[offset:], delta)


TINY = [*SHAPES, *VARIANTS]
SMOLLM2 = [*SHAPES, "load-front-streamed", "layer-split-two-forwards", "token-split-two-forwards"]


def _references(start: StartServer, model: Path, seeds: list[int]) -> dict[int, list[Any]]:
    """The returning conversations of each of ``seeds`` on a server with the radix cache
    disabled."""
    ref = reference_server(start, model)
    try:
        return {seed: returned(ref, returning_prompts(seed)) for seed in seeds}
    finally:
        ref.stop()


@pytest.fixture(scope="module")
def tiny_references(sglang_servers: StartServer, tiny_llama_path: Path) -> dict[int, list[Any]]:
    return _references(sglang_servers, tiny_llama_path, list(range(len(TINY))))


@pytest.fixture(scope="module")
def tiny_servers(
    sglang_servers: StartServer, tiny_llama_path: Path, l3: RedisServer
) -> Iterator[ForcingServers]:
    # 96 Mbit/s: a 240-token back (2 KiB a token) reads in about 40 ms
    servers = ForcingServers(sglang_servers, tiny_llama_path, l3, "96mbps+1ms")
    yield servers
    servers.stop()


def test_a_request_forcing_a_shape_the_server_cannot_run_is_refused(
    tiny_servers: ForcingServers,
) -> None:
    server = tiny_servers.get({})  # the server of the default configuration's shapes
    p = returning_prompts(99)  # prompts no other test sends
    bad = {"custom_params": {"cacheflow": {"force_shape": "layer", "force_recompute": 2}}}
    with pytest.raises(SGLangServerError, match="HTTP 400") as info:
        ask(server, p["host"], **bad)
    assert "custom_params['cacheflow']" in str(info.value), info.value
    assert "within [0, 1]" in str(info.value), info.value
    assert ask(server, p["fill0"])["output_ids"]  # and it serves on


@pytest.mark.parametrize("name", TINY)
def test_every_forced_shape_restores_exactly(
    name: str, tiny_servers: ForcingServers, tiny_references: dict[int, list[Any]]
) -> None:
    seed = TINY.index(name)
    _restores_exactly(tiny_servers, name, seed, tiny_references[seed], 4)


@pytest.fixture(scope="module")
def smollm2_references(sglang_servers: StartServer, smollm2_path: Path) -> dict[int, list[Any]]:
    return _references(sglang_servers, smollm2_path, [100 + i for i in range(len(SMOLLM2))])


@pytest.fixture(scope="module")
def smollm2_servers(
    sglang_servers: StartServer, smollm2_path: Path, l3: RedisServer, tiny_servers: ForcingServers
) -> Iterator[ForcingServers]:
    tiny_servers.stop()  # one CacheFlow server at a time: they share the Redis server
    # SmolLM2 in fp32 keeps 46 KiB a token: 1 Gbit/s reads 240 tokens' worth in about 90 ms
    servers = ForcingServers(sglang_servers, smollm2_path, l3, "1gbps+1ms")
    yield servers
    servers.stop()


@pytest.mark.parametrize("name", SMOLLM2)
def test_smollm2_restores_every_forced_shape_exactly(
    name: str, smollm2_servers: ForcingServers, smollm2_references: dict[int, list[Any]]
) -> None:
    seed = 100 + SMOLLM2.index(name)
    _restores_exactly(smollm2_servers, name, seed, smollm2_references[seed], 30)
