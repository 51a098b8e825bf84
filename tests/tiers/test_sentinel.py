"""Redis Sentinel: a master, its replica and a sentinel, all real. The master is killed;
the sentinel promotes the replica, and the tier (``redis+sentinel://``) finds the new master
without a restart: what was replicated reads back, new pages are written. While the
failover runs, reads are counted misses, never exceptions. The control: a tier that names
the old master directly stays without a server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
import torch

from sglang_cacheflow.testing.redis import RedisSentinel, RedisServer
from sglang_cacheflow.tiers import PageLayout
from sglang_cacheflow.tiers.redis import RedisTier, RedisTierError
from sglang_cacheflow.tiers.redis_config import parse_url
from tests.tiers.helpers import page_hashes, random_pages, unique_ns

pytestmark = pytest.mark.redis

LAYOUT = PageLayout(4, 8, 2, 16, torch.bfloat16)


@pytest.fixture
def topology() -> Iterator[tuple[RedisServer, RedisServer, RedisSentinel]]:
    with RedisServer() as master:
        replica = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(master.port)))
        with replica, RedisSentinel(master_port=master.port) as sentinel:
            yield master, replica, sentinel


def _same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_failover_to_the_replica(
    topology: tuple[RedisServer, RedisServer, RedisSentinel],
) -> None:
    master, replica, sentinel = topology
    ns = unique_ns(LAYOUT)
    hashes = page_hashes(3)
    pages = random_pages(LAYOUT, 4, seed=5)
    with RedisTier(sentinel.url, socket_timeout_s=2.0) as tier, RedisTier(master.url) as direct:
        assert tier.batch_put(ns, hashes, pages[:3]) == [True] * 3
        assert redis.Redis(port=master.port).wait(1, 5000) == 1  # on the replica too
        master.kill()
        deadline = time.monotonic() + 60
        got = None
        while time.monotonic() < deadline:
            got = tier.get(ns, hashes[0])  # a miss while no master is elected, never a raise
            if got is not None:
                break
            time.sleep(0.2)
        assert _same(got, pages[0]), "no failover within 60 s"
        addr = redis.Redis(port=sentinel.port).sentinel_get_master_addr_by_name(sentinel.service)
        assert int(addr[1]) == replica.port
        assert all(_same(g, p) for g, p in zip(tier.batch_get(ns, hashes), pages, strict=False))
        assert tier.put(ns, "after-failover", pages[3])
        assert _same(tier.get(ns, "after-failover"), pages[3])
        assert tier.stats.snapshot()["hits"] >= 5
        # the control: naming the old master, reads stay misses (nothing to fail over to)
        assert direct.get(ns, hashes[0]) is None


def test_sentinel_urls_say_what_is_wrong() -> None:
    a = parse_url("redis+sentinel://u:p%40w@10.0.0.1:26379,10.0.0.2:26380/mymaster/2")
    assert a.service == "mymaster" and a.db == 2 and a.nodes == (("10.0.0.1", 26379),
                                                                  ("10.0.0.2", 26380))  # fmt: skip
    assert (a.username, a.password, a.ssl) == ("u", "p@w", False)
    assert parse_url("rediss+sentinel://h:1/m").ssl
    with pytest.raises(RedisTierError, match=r"SERVICE\[/DB\]"):
        parse_url("redis+sentinel://h:1")
    with pytest.raises(RedisTierError, match="is not a number"):
        parse_url("redis+sentinel://h:1/m/x")
