"""The examples a user copies, run as a user would: ``examples/launch_server.sh`` starts SGLang
with ``--enable-cacheflow`` and its own Redis-compatible server, then the multi-turn chat
client and the agent loop talk to it over the OpenAI API."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sglang_cacheflow.testing.server import free_port

pytestmark = [pytest.mark.sglang, pytest.mark.redis, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def server_url(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("example") / "server.log"
    env = {**os.environ, "PYTHON": sys.executable, "SGLANG_CACHEFLOW_HICACHE_RESERVE_GB": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", str(EXAMPLES / "launch_server.sh"), str(smollm2_path), str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        text = log.read_text()
        assert re.search(r"L3: \S+ at redis://127\.0\.0\.1:\d+/0", text), text[-3000:]
        assert "cacheflow: policy cacheflow" in text, text[-3000:]
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server, and the script's Redis with it
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    return out.stdout


def test_chat_client_prints_the_ttft_of_every_turn(server_url: str) -> None:
    lines = _run("chat_client.py", "--url", server_url, "--turns", "3", "--max-tokens", "16")
    turns = re.findall(r"turn (\d): TTFT (\d+) ms: (.+)", lines)
    assert [t[0] for t in turns] == ["1", "2", "3"], lines
    assert all(int(ms) > 0 and text for _, ms, text in turns)


def test_agent_loop_returns_to_its_context(server_url: str) -> None:
    lines = _run("agent_loop.py", "--url", server_url, "--steps", "2", "--max-tokens", "8")
    steps = re.findall(r"step (\d): TTFT (\d+) ms, tool 12 \* 24 \+ \d = (\d+)", lines)
    assert steps == [(steps[0][0], steps[0][1], "288"), (steps[1][0], steps[1][1], "289")], lines
    metrics = urllib.request.urlopen(f"{server_url}/metrics", timeout=10).read().decode()
    # the second step resent the first step's context: SGLang served its prefix from cache
    cached = re.findall(r"sglang:cached_tokens_total\{[^}]*\} ([\d.]+)", metrics)
    assert cached and float(cached[0]) > 0, "no prefix of the agent's context was reused"
