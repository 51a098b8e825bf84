"""A real SGLang server on CPU with the tiny fp32 Llama: prefix caching and the attention backend.

Two servers: one with this package's ``cacheflow_cpu`` attention backend, one
with SGLang's ``torch_native``. Both get the same request sequence; the
``cacheflow_cpu`` answers must be the ``torch_native`` ones (same ids, logprobs
within fp32 rounding) for cold prompts, extends over cached prefixes and
batched decode.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sglang_cacheflow.testing.server import SGLangServer
from tests.fixtures.sglang import StartServer

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(900)]

LOGPROB_TOLERANCE = 2e-4


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def _logprobs(reply: dict[str, Any]) -> list[float]:
    return [lp for lp, _, _ in reply["meta_info"]["output_token_logprobs"]]


@pytest.fixture(scope="module")
def servers(sglang_servers: StartServer, tiny_llama_path: Path) -> dict[str, SGLangServer]:
    common = ("--dtype", "float32", "--max-total-tokens", "4096")
    return {
        backend: sglang_servers(tiny_llama_path, *common, "--attention-backend", backend)
        for backend in ("cacheflow_cpu", "torch_native")
    }


@pytest.fixture(scope="module")
def server(servers: dict[str, SGLangServer]) -> SGLangServer:
    return servers["cacheflow_cpu"]


def test_identical_greedy_requests_hit_the_cache(server: SGLangServer) -> None:
    prompt = _ids(1, 200)
    first = server.generate(input_ids=prompt, max_new_tokens=12)
    second = server.generate(input_ids=prompt, max_new_tokens=12)
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] == len(prompt) - 1
    assert second["output_ids"] == first["output_ids"]
    assert len(first["output_ids"]) == 12


def test_text_round_trip_through_the_tokenizer(server: SGLangServer) -> None:
    reply = server.generate(text="The tiny model reads bytes.", max_new_tokens=4)
    assert reply["meta_info"]["prompt_tokens"] == len(b"The tiny model reads bytes.")
    assert isinstance(reply["text"], str)


Scenario = Callable[[SGLangServer], list[dict[str, Any]]]


def _cold(server: SGLangServer) -> list[dict[str, Any]]:
    return [server.generate(input_ids=_ids(2, n), max_new_tokens=6) for n in (1, 7, 300)]


def _extend_over_cached_prefix(server: SGLangServer) -> list[dict[str, Any]]:
    base = _ids(3, 400)
    replies = [server.generate(input_ids=base, max_new_tokens=4)]
    # 400 cached tokens + 37 new ones: the offset causal mask path.
    replies.append(server.generate(input_ids=base + _ids(4, 37), max_new_tokens=6))
    # A shared 400-token prefix, diverging: 1 new token.
    replies.append(server.generate(input_ids=[*base, 5], max_new_tokens=6))
    return replies


def _batched_decode(server: SGLangServer) -> list[dict[str, Any]]:
    prompts = [_ids(10 + i, n) for i, n in enumerate((50, 130, 260, 90))]
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: server.generate(input_ids=p, max_new_tokens=24), prompts))


@pytest.mark.parametrize(
    "scenario",
    [_cold, _extend_over_cached_prefix, _batched_decode],
    ids=["cold", "cached-prefix", "batched-decode"],
)
def test_cacheflow_cpu_matches_torch_native(
    servers: dict[str, SGLangServer], scenario: Scenario
) -> None:
    ours = scenario(servers["cacheflow_cpu"])
    native = scenario(servers["torch_native"])
    for mine, theirs in zip(ours, native, strict=True):
        assert mine["meta_info"]["cached_tokens"] == theirs["meta_info"]["cached_tokens"]
        assert mine["output_ids"] == theirs["output_ids"]
        gaps = [abs(a - b) for a, b in zip(_logprobs(mine), _logprobs(theirs), strict=True)]
        assert max(gaps) <= LOGPROB_TOLERANCE, gaps
