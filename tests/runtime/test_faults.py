"""A tier that fails mid-restore never yields wrong tokens: the lost cells are recomputed,
counted, and the logits are those of a fresh prefill."""

from __future__ import annotations

import threading

import pytest
import torch

from sglang_cacheflow.planner.capabilities import Capabilities
from sglang_cacheflow.runtime.io import LoadTask
from sglang_cacheflow.runtime.workload import prepare
from sglang_cacheflow.testing.redis import RedisServer
from sglang_cacheflow.tiers import HostTier, RedisTier
from tests.runtime.helpers import VOCAB, kv_diff, logprob_diff, make_executor, random_model

TOKEN_WISE = Capabilities(token_split=True, layer_split=False)
LAYER_WISE = Capabilities(token_split=False, layer_split=True)
CASES = {
    "load": ("load", None),
    "cacheflow-token": ("cacheflow", TOKEN_WISE),
    "cacheflow-layer": ("cacheflow", LAYER_WISE),
}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_model("llama", seed=5)


def _check_exact(prep, result) -> None:
    n = prep.request.input_ids.numel()
    assert kv_diff(prep.request.kv.data, prep.reference_kv.data, n) <= 1e-5
    assert logprob_diff(result.requests[prep.request.id].logits, prep.reference_logits) <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_missing_host_pages_are_recomputed(model, case: str) -> None:
    policy, caps = CASES[case]
    host = HostTier(1 << 28)
    ex = make_executor(model, {"host": host})
    torch.manual_seed(7)
    ids = torch.randint(0, VOCAB, (260,))
    prep = prepare(ex, "r", ids, 20, [("host", 236)])
    lost = [prep.request.page_hashes[p] for p in (13, 15)]  # back pages: loaded by every case
    assert host.delete(ex.namespace, lost) == 2
    kwargs = {"capabilities": caps} if caps else {}
    result = ex.run([prep.request], policy, chunk_tokens=32, **kwargs)
    assert result.stats.failed_pages >= 2
    assert result.stats.repairs >= 1 and result.stats.repaired_token_layers > 0
    assert ex.totals.repairs == result.stats.repairs
    _check_exact(prep, result)


@pytest.mark.redis
def test_corrupted_redis_page_is_recomputed(model, redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, layers_per_block=2)
    ex = make_executor(model, {"redis": tier})
    torch.manual_seed(8)
    ids = torch.randint(0, VOCAB, (200,))
    prep = prepare(ex, "r", ids, 0, [("redis", 192)], salt="corrupt")
    key = tier.block_keys(ex.namespace, prep.request.page_hashes[4])[1]  # layers 2-3
    raw = bytearray(tier.client.get(key))
    raw[-5] ^= 0xFF  # flip a payload byte: the layer checksum no longer matches
    tier.client.set(key, bytes(raw))
    try:
        result = ex.run([prep.request], "load")
    finally:
        tier.close()
    assert tier.stats.snapshot()["corrupt"] >= 1
    assert result.stats.failed_pages >= 1 and result.stats.repairs >= 1
    _check_exact(prep, result)


@pytest.mark.redis
@pytest.mark.parametrize("case", ["load", "cacheflow-layer"])
def test_redis_killed_mid_restore(model, fresh_redis: RedisServer, case: str) -> None:
    policy, caps = CASES[case]
    tier = RedisTier(fresh_redis.url, streams=1, layers_per_block=1, socket_timeout_s=2.0)
    killed = threading.Event()

    def kill_after_first(task: LoadTask, failed: int) -> None:
        if not killed.is_set():
            killed.set()
            fresh_redis.kill()

    ex = make_executor(
        model, {"redis": tier}, io_workers=1, task_bytes=1, on_task_done=kill_after_first
    )
    torch.manual_seed(9)
    ids = torch.randint(0, VOCAB, (300,))
    prep = prepare(ex, "r", ids, 32, [("redis", 260)], salt=case)
    kwargs = {"capabilities": caps} if caps else {}
    try:
        result = ex.run([prep.request], policy, chunk_tokens=32, **kwargs)
    finally:
        tier.close()
    assert killed.is_set()
    assert result.stats.loaded_bytes > 0  # the first layer group did arrive
    assert result.stats.failed_pages > 0 and result.stats.repairs > 0
    _check_exact(prep, result)
