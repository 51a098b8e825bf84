"""Servers that share one Redis never read each other's records.

Two writers that differ in model, model name spelling, dtype, page size, TP size, TP rank or
PP stage store the same page hash with different KV: each reads back its own, both ways,
and a record copied under the other's key (a misconfigured or hostile writer) is refused.
The control: two namespaces built alike do share records, so the test can see sharing.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sglang_cacheflow.testing.redis import RedisServer
from sglang_cacheflow.tiers import Namespace, PageLayout
from sglang_cacheflow.tiers.redis import RedisTier
from tests.tiers.helpers import page_hashes, random_pages

pytestmark = pytest.mark.redis

LAYOUT = PageLayout(4, 16, 2, 32, torch.bfloat16)
BASE = Namespace("org/model-a", LAYOUT, tp_rank=0, tp_size=2)
OTHERS = {
    "model": replace(BASE, model="org/model-b"),
    "model spelling": replace(BASE, model="org-model-a"),  # the same name once cleaned
    "dtype": replace(BASE, layout=replace(LAYOUT, dtype=torch.float16)),
    "page size": replace(BASE, layout=replace(LAYOUT, page_tokens=32)),
    "tp size": replace(BASE, tp_size=4),
    "tp rank": replace(BASE, tp_rank=1),
    "pp stage": replace(BASE, pp_rank=1, pp_size=2),
}


@pytest.fixture(scope="module")
def tier() -> RedisTier:
    with RedisServer() as server, RedisTier(server.url) as t:
        yield t


def _same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.shape == b.shape and torch.equal(a.view(-1), b.view(-1))


def _page(ns: Namespace, seed: int) -> torch.Tensor:
    return random_pages(ns.layout, 1, seed=seed)[0]


def _copy_records(tier: RedisTier, src: Namespace, dst: Namespace, page: str) -> None:
    """Store ``src``'s records of ``page`` under ``dst``'s keys, byte for byte."""
    src_keys, dst_keys = tier.block_keys(src, page), tier.block_keys(dst, page)
    for i, key in enumerate(dst_keys):
        value = tier.client.get(src_keys[min(i, len(src_keys) - 1)])
        assert value is not None
        tier.client.set(key, value)


@pytest.mark.parametrize("what", list(OTHERS))
def test_writers_that_differ_never_read_each_other(tier: RedisTier, what: str) -> None:
    other = OTHERS[what]
    (page,) = page_hashes(1)
    mine, theirs = _page(BASE, 1), _page(other, 2)
    assert tier.put(BASE, page, mine) and tier.put(other, page, theirs)
    # both ways: each reads its own page, not the other's
    assert _same(tier.get(BASE, page), mine)
    assert _same(tier.get(other, page), theirs)
    # a record copied under the other's keys is refused (layout or key digest), not used
    (copied,) = page_hashes(1)
    assert tier.put(BASE, copied, mine)
    _copy_records(tier, BASE, other, copied)
    assert tier.get(other, copied) is None


def test_control_namespaces_built_alike_share_records(tier: RedisTier) -> None:
    alike = Namespace("org/model-a", PageLayout(4, 16, 2, 32, torch.bfloat16), 0, 2)
    (page,) = page_hashes(1)
    mine = _page(BASE, 3)
    assert tier.put(BASE, page, mine)
    assert _same(tier.get(alike, page), mine)  # what the test above would see if keys met
    (copied,) = page_hashes(1)
    assert tier.put(BASE, copied, mine)
    _copy_records(tier, BASE, alike, copied)
    assert _same(tier.get(alike, copied), mine)
