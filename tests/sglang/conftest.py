"""Fixtures of the server tests in this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sglang_cacheflow.testing.redis import RedisServer


@pytest.fixture(scope="module")
def l3() -> Iterator[RedisServer]:
    """A private redis-server (or embedded Valkey) for the module's CacheFlow servers."""
    with RedisServer() as server:
        yield server
