"""The probe read that measures what reading a tier costs the reading process's CPU,
against a real redis-server."""

from __future__ import annotations

import os

import pytest

from sglang_cacheflow.testing.redis import RedisServer
from sglang_cacheflow.tiers import PageLayout
from sglang_cacheflow.tiers.probe import probe_read_cpu
from sglang_cacheflow.tiers.redis import RedisTier
from tests.tiers.helpers import unique_ns


@pytest.mark.redis
def test_a_probe_measures_a_redis_clients_cpu_and_leaves_nothing(
    redis_server: RedisServer, small_layout: PageLayout
) -> None:
    ns = unique_ns(small_layout)
    with RedisTier(redis_server.url) as tier:
        cpu = probe_read_cpu(tier, ns, pages=64, rounds=3)
        assert cpu is not None
        # every page read is a command sent and a reply parsed in this process
        assert 0 < cpu.per_page_s < 0.05 and cpu.per_call_s >= 0 and cpu.per_page_layer_s >= 0
        # one page whole, 64 whole and 64 first layers a round: all of it read
        assert tier.stats.snapshot()["hits"] == 3 * (1 + 64 + 64)
        assert not tier.exists(ns, f"cacheflow-cpu-probe-{os.getpid()}")  # deleted


@pytest.mark.redis
def test_a_tier_that_cannot_store_the_probe_gives_nothing(
    fresh_redis: RedisServer, small_layout: PageLayout
) -> None:
    with RedisTier(fresh_redis.url, connect_timeout_s=0.5, socket_timeout_s=0.5) as tier:
        fresh_redis.kill()  # the server gone: the probe page cannot be written
        assert probe_read_cpu(tier, unique_ns(small_layout)) is None


def test_a_probe_needs_two_pages(small_layout: PageLayout) -> None:
    with pytest.raises(ValueError, match="pages >= 2"):
        probe_read_cpu(None, unique_ns(small_layout), pages=1)  # type: ignore[arg-type]
