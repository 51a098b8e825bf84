"""Redis Cluster losing a master, against a real cluster on loopback (3 masters, 1 replica
each): the master dies in the middle of a batch read (it is stopped while the batch waits on
it, then killed); the batch completes with the pages of the other masters, the dead master's
pages are counted misses, never wrong data; its replica is promoted and the same tier object
reads every page again from the new topology, without a restart. Slots moving under the tier
(MOVED, ASK) are in ``test_direct_io.py``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from sglang_cacheflow.testing.redis import RedisCluster
from sglang_cacheflow.tiers import PageLayout
from sglang_cacheflow.tiers.redis import RedisTier
from tests.tiers.helpers import page_hashes, random_pages, unique_ns

pytestmark = [pytest.mark.redis, pytest.mark.slow]

LAYOUT = PageLayout(4, 16, 2, 16, torch.bfloat16)


def _same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and torch.equal(a.view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(nodes=3, replicas=1) as c:
        yield c


def test_master_killed_mid_batch_then_replica_promoted(cluster: RedisCluster) -> None:
    ns = unique_ns(LAYOUT)
    pages = random_pages(LAYOUT, 24)
    h = page_hashes(24)
    with RedisTier(cluster.url, layers_per_block=2, socket_timeout_s=5.0) as t:
        assert t.batch_put(ns, h, pages) == [True] * 24
        cluster.wait_replicated()
        slots = [t.client.keyslot(t.block_keys(ns, x)[0]) for x in h]
        victim = next(m for m in cluster.masters() if int(m.cli("dbsize")))
        replica = cluster.replica_of(victim)
        owner = {
            i: t.client.nodes_manager.get_node_from_slot(slot).port for i, slot in enumerate(slots)
        }
        lost = {i for i, port in owner.items() if port == victim.port}
        assert lost and len(lost) < len(h)  # the victim holds some of the pages, not all

        # The batch waits on the stopped master; it dies while the batch is in flight.
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGSTOP)
        got: list[torch.Tensor | None] = []
        reader = threading.Thread(target=lambda: got.extend(t.batch_get(ns, h)))
        errors_before = t.stats.errors + t.stats.misses
        reader.start()
        time.sleep(0.5)
        assert reader.is_alive()  # still waiting on the victim
        victim.kill()
        reader.join(timeout=30)
        assert not reader.is_alive(), "the batch hung on a dead master"
        assert len(got) == len(h)
        for i, (page, want) in enumerate(zip(got, pages, strict=True)):
            if i in lost:
                assert page is None or _same(page, want), i  # a miss, never wrong data
            else:
                assert _same(page, want), i
        assert any(got[i] is None for i in lost)
        assert t.stats.errors + t.stats.misses > errors_before  # counted

        # The replica takes over the victim's slots; the same tier finds it.
        deadline = time.monotonic() + 30
        while not replica.cli("role").startswith("master"):  # after the node timeout (2 s)
            assert time.monotonic() < deadline, "no failover"
            time.sleep(0.1)
        survivors = [s for s in cluster.servers if s is not victim]
        assert RedisCluster.wait_state_ok(survivors, 30.0)
        deadline = time.monotonic() + 30
        while True:
            again = t.batch_get(ns, h)
            if all(_same(p, w) for p, w in zip(again, pages, strict=True)):
                break
            for p, w in zip(again, pages, strict=True):
                assert p is None or _same(p, w)  # misses until the map is refreshed
            assert time.monotonic() < deadline, "the tier did not find the promoted replica"
            time.sleep(0.2)
        # and writes go to the new topology too
        more, mh = random_pages(LAYOUT, 6, seed=1), page_hashes(6)
        assert t.batch_put(ns, mh, more) == [True] * 6
        assert all(_same(p, w) for p, w in zip(t.batch_get(ns, mh), more, strict=True))
