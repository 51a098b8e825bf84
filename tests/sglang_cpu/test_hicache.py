"""HiCache on a real SGLang server on CPU: evict to host, load back, same tokens and logprobs.

One server per host layout / io backend pair (tiny fp32 Llama, a 512-token
device pool, a host pool twice that). A 300-token prompt is served until it is
steady on device, pushed to host by two other prompts, and sent again: it must
report host-cached tokens and give the ids of the device-cached run and its
logprobs to within float rounding (1e-5). Bit-for-bit equality with the device
run is not expected on CPU: a row's matmul result depends on how many rows the
forward batch had, so KV written by a 300-token prefill and by a 1-token extend
differ in the last bits, and the two runs do not read KV of the same
provenance. Two host hits, evicted and restored independently, must agree
bit for bit. The negative control zeroes the KV each host load writes (test
fault switched on by a file): the output must move far beyond the tolerance.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sglang_cacheflow.sglang.cpu.faults import FAULT_ENV, FAULT_FILE_ENV, ZERO_HOST_LOADS
from sglang_cacheflow.sglang.cpu.install import HICACHE_RESERVE_ENV
from sglang_cacheflow.testing.server import SGLangServer
from tests.fixtures.sglang import StartServer

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(900)]

PROMPT_LEN = 300
TOLERANCE = 1e-5
PAIRS = [
    ("layer_first", "kernel"),
    ("page_first", "kernel"),
    ("page_head", "kernel"),
    ("layer_first", "direct"),
    ("page_first_direct", "direct"),
]


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(PROMPT_LEN)]


def _run(server: SGLangServer, ids: list[int]) -> dict[str, Any]:
    return server.generate(input_ids=ids, max_new_tokens=8)


def _tokens(reply: dict[str, Any]) -> list[tuple[int, float]]:
    return [(tok, logprob) for logprob, tok, _ in reply["meta_info"]["output_token_logprobs"]]


def _cached(reply: dict[str, Any]) -> dict[str, int]:
    return reply["meta_info"]["cached_tokens_details"] or {"device": 0, "host": 0}


class _HiCacheServer:
    def __init__(self, server: SGLangServer, fault_file: Path) -> None:
        self.server = server
        self.fault_file = fault_file
        self.prompt = _prompt(0)
        self.others = [_prompt(1), _prompt(2)]
        _run(server, self.prompt)  # cold
        _run(server, self.prompt)  # first device hit: the tree settles, write-through done
        self.reference = _run(server, self.prompt)
        assert _cached(self.reference)["device"] == PROMPT_LEN - 1

    def evict_prompt(self) -> None:
        """Serve the two other prompts: they do not fit next to the prompt in 512 slots.

        Always the same two, so the host pool (1024 slots) keeps all three.
        """
        for other in self.others:
            _run(self.server, other)


@pytest.fixture(scope="module", params=PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def hicache(
    request: pytest.FixtureRequest,
    sglang_servers: StartServer,
    tiny_llama_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[_HiCacheServer]:
    layout, io_backend = request.param
    fault_file = tmp_path_factory.mktemp("fault") / "armed"
    server = sglang_servers(
        tiny_llama_path,
        "--dtype", "float32",
        "--max-total-tokens", "512",
        "--enable-hierarchical-cache",
        "--hicache-ratio", "2",
        "--hicache-mem-layout", layout,
        "--hicache-io-backend", io_backend,
        env={
            HICACHE_RESERVE_ENV: "1",
            "MKL_DYNAMIC": "FALSE",
            FAULT_ENV: ZERO_HOST_LOADS,
            FAULT_FILE_ENV: str(fault_file),
        },
    )  # fmt: skip
    yield _HiCacheServer(server, fault_file)
    server.stop()


def _max_logprob_gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(abs(x[1] - y[1]) for x, y in zip(_tokens(a), _tokens(b), strict=True))


def _host_hit(hicache: _HiCacheServer) -> dict[str, Any]:
    hicache.evict_prompt()
    again = _run(hicache.server, hicache.prompt)
    cached = _cached(again)
    assert cached["host"] > 0.9 * PROMPT_LEN, cached
    assert again["meta_info"]["cached_tokens"] == PROMPT_LEN - 1
    return again


def test_host_hit_matches_the_device_hit(hicache: _HiCacheServer) -> None:
    first = _host_hit(hicache)
    ids = [tok for tok, _ in _tokens(first)]
    assert ids == [tok for tok, _ in _tokens(hicache.reference)]
    assert _max_logprob_gap(first, hicache.reference) <= TOLERANCE
    second = _host_hit(hicache)
    assert _tokens(second) == _tokens(first)


def test_corrupted_host_load_changes_the_output(hicache: _HiCacheServer) -> None:
    hicache.fault_file.touch()
    try:
        corrupted = _host_hit(hicache)
    finally:
        hicache.fault_file.unlink()
    ids = [tok for tok, _ in _tokens(corrupted)]
    assert (
        ids != [tok for tok, _ in _tokens(hicache.reference)]
        or _max_logprob_gap(corrupted, hicache.reference) > 1000 * TOLERANCE
    )
