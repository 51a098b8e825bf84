"""Chunk reuse on a real SGLang server (CPU engine, tiny fp32 Llama, chunks in a real
redis-server).

A RAG-like prompt ``[preamble][document A][document B][question]`` marks its documents as
chunks. Served the first time, it misses both and is computed plainly; both chunks are then
stored from its slots. With the radix cache flushed, the same prompt is blended: A sits
where it was stored after the same preamble (exact, loaded whole), B is reused (its best
tokens recomputed, the rest loaded), and since what was stored is what a prefill of this
prompt computes, the reply must equal a server's without any cache. The documents in the
other order are blended with their keys moved; a new document beside a stored one is
computed in the blend and stored from it; a blend's KV never enters the radix tree;
B's pages corrupted in Redis make the next blend fall back to a plain prefill with the
reply unchanged; a malformed chunk list is refused with a message.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sglang_cacheflow.bench.sglang.blend import forget_prefixes, wait_stored
from sglang_cacheflow.sglang.config import REQUEST_PARAM
from sglang_cacheflow.testing.redis import RedisServer
from sglang_cacheflow.testing.server import SGLangServer, SGLangServerError
from tests.fixtures.sglang import StartServer
from tests.sglang.helpers import (
    ask,
    assert_same_replies,
    cacheflow_server,
    corrupt,
    metrics,
    reference_server,
    total,
)

pytestmark = [pytest.mark.sglang, pytest.mark.redis, pytest.mark.slow]

REQUESTS = "sglang:cacheflow_blend_requests_total"
TOKENS = "sglang:cacheflow_blend_tokens_total"
CHUNKS = "sglang:cacheflow_blend_chunks_total"
FALLBACKS = "sglang:cacheflow_blend_fallbacks_total"

rng = random.Random(7)
PRE = [rng.randrange(3, 250) for _ in range(20)]
DOC_A = [rng.randrange(3, 250) for _ in range(64)]
DOC_B = [rng.randrange(3, 250) for _ in range(64)]
DOC_C = [rng.randrange(3, 250) for _ in range(48)]
QUESTION = [rng.randrange(3, 250) for _ in range(8)]


def _prompt(*docs: list[int]) -> tuple[list[int], list[int]]:
    """The prompt ids and its chunks' flat offsets."""
    ids, spans = list(PRE), []
    for doc in docs:
        spans += [len(ids), len(ids) + len(doc)]
        ids += doc
    return ids + QUESTION, spans


def _ask(server: SGLangServer, ids: list[int], spans: list[int] | None) -> dict[str, Any]:
    params = {} if spans is None else {"custom_params": {REQUEST_PARAM: {"chunks": spans}}}
    return ask(server, ids, 6, return_logprob=True, **params)


def _delta(server: SGLangServer, before: dict[str, float]) -> dict[str, float]:
    now = metrics(server)
    return {k: v - before.get(k, 0.0) for k, v in now.items()}


def _store_a_and_b(cf: SGLangServer) -> None:
    """A and B in the chunk store (stored by the first prompt that marks them)."""
    ids, spans = _prompt(DOC_A, DOC_B)
    _ask(cf, ids, spans)
    wait_stored(cf, 2)


def _cold(
    cf: SGLangServer, l3: RedisServer, ids: list[int], spans: list[int]
) -> tuple[dict[str, Any], dict[str, float]]:
    """The reply to ``ids`` with every cached prefix dropped first, and the counters it moved."""
    forget_prefixes(cf, l3.port)
    m0 = metrics(cf)
    reply = _ask(cf, ids, spans)
    return reply, _delta(cf, m0)


@pytest.fixture(scope="module")
def servers(
    sglang_servers: StartServer, tiny_llama_path: Path, l3: RedisServer
) -> Iterator[tuple[SGLangServer, SGLangServer]]:
    ref = reference_server(sglang_servers, tiny_llama_path)
    cf = cacheflow_server(
        sglang_servers, tiny_llama_path, l3, chunk_store="redis", force_blend_ratio=0.25
    )
    yield ref, cf


def test_a_prompt_blended_from_its_own_chunks_replies_as_a_full_prefill(
    servers: tuple[SGLangServer, SGLangServer], l3: RedisServer
) -> None:
    ref, cf = servers
    ids, spans = _prompt(DOC_A, DOC_B)
    want = _ask(ref, ids, None)
    m0 = metrics(cf)
    first = _ask(cf, ids, spans)
    wait_stored(cf, 2)
    m = _delta(cf, m0)
    assert total(m, CHUNKS, result="miss") == 2, m
    assert total(m, REQUESTS) == 0, m  # nothing stored yet: a plain prefill
    assert_same_replies([want], [first])

    blended, m = _cold(cf, l3, ids, spans)
    assert total(m, REQUESTS, outcome="blended") == 1, m
    assert total(m, TOKENS, kind="exact") == len(DOC_A), m
    # B at ratio 0.25: its best 16 tokens (one page) recomputed, the other 48 loaded
    assert total(m, TOKENS, kind="recomputed") == 16, m
    assert total(m, TOKENS, kind="loaded") == len(DOC_B) - 16, m
    assert_same_replies([want], [blended])

    # the blend's KV stayed out of the tree: the same prompt is blended again, not matched
    m0 = metrics(cf)
    again = _ask(cf, ids, spans)
    assert total(_delta(cf, m0), REQUESTS, outcome="blended") == 1
    assert_same_replies([want], [again])


def test_chunks_in_another_order_are_blended_with_their_keys_moved(
    servers: tuple[SGLangServer, SGLangServer], l3: RedisServer
) -> None:
    _, cf = servers
    _store_a_and_b(cf)
    reply, m = _cold(cf, l3, *_prompt(DOC_B, DOC_A))
    assert total(m, REQUESTS, outcome="blended") == 1, m
    assert total(m, TOKENS, kind="exact") == 0, m  # B first, but not where it was stored
    assert total(m, TOKENS, kind="recomputed") == 32, m
    assert total(m, TOKENS, kind="loaded") == len(DOC_A) + len(DOC_B) - 32, m
    assert len(reply["output_ids"]) == 6


def test_a_new_chunk_beside_a_stored_one_is_stored_from_the_blend(
    servers: tuple[SGLangServer, SGLangServer], l3: RedisServer
) -> None:
    """A then a new C: A is loaded whole, C computed (a miss) and then stored from the
    blend's slots; blended again, C is reused, and since A's KV was exact so is C's."""
    ref, cf = servers
    _store_a_and_b(cf)
    ids, spans = _prompt(DOC_A, DOC_C)
    want = _ask(ref, ids, None)
    stored = total(metrics(cf), CHUNKS, result="stored")
    first, m = _cold(cf, l3, ids, spans)
    wait_stored(cf, int(stored) + 1)
    assert total(m, CHUNKS, result="hit") == 1 and total(m, CHUNKS, result="miss") == 1, m
    assert total(m, REQUESTS, outcome="blended") == 1, m
    assert total(m, TOKENS, kind="exact") == len(DOC_A), m
    assert total(m, TOKENS, kind="recomputed") == 0, m
    assert_same_replies([want], [first])

    again, m = _cold(cf, l3, ids, spans)
    assert total(m, CHUNKS, result="hit") == 2, m
    assert total(m, TOKENS, kind="recomputed") == 16, m  # C: its best page of 3
    assert total(m, TOKENS, kind="loaded") == len(DOC_C) - 16, m
    assert_same_replies([want], [again])


def test_corrupted_chunk_pages_fall_back_to_a_plain_prefill(
    servers: tuple[SGLangServer, SGLangServer], l3: RedisServer
) -> None:
    ref, cf = servers
    ids, spans = _prompt(DOC_A, DOC_B)
    want = _ask(ref, ids, None)
    _store_a_and_b(cf)
    client = redis.Redis(host="127.0.0.1", port=l3.port)
    pages = [k for k in client.scan_iter(match="*.chunks*", count=1000) if b"-p" in k]
    assert pages
    corrupt(client, pages)
    reply, m = _cold(cf, l3, ids, spans)
    assert total(m, REQUESTS, outcome="fallback") == 1, m
    assert total(m, FALLBACKS, reason="load_failed") == 1, m
    assert total(m, REQUESTS, outcome="blended") == 0, m
    assert_same_replies([want], [reply])


def test_a_malformed_chunk_list_is_refused_with_a_message(
    servers: tuple[SGLangServer, SGLangServer],
) -> None:
    _, cf = servers
    ids, _ = _prompt(DOC_A)
    with pytest.raises(SGLangServerError, match="flat list of token offsets"):
        _ask(cf, ids, [20])
    with pytest.raises(SGLangServerError, match="no query token"):
        _ask(cf, ids, [20, len(ids)])
    assert len(_ask(cf, ids, [20, 84])["output_ids"]) == 6  # the server serves on
