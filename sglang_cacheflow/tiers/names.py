"""The names of the tiers: what plans, metrics, logs and configuration call them."""

from __future__ import annotations

HOST_TIER = "host"
"""Host memory: SGLang's HiCache host pool, or :class:`~sglang_cacheflow.tiers.host.HostTier`."""

REDIS_TIER = "redis"
"""Redis (single server or cluster): :class:`~sglang_cacheflow.tiers.redis.RedisTier`."""

L3_TIER = REDIS_TIER
"""The tier behind SGLang's HiCache L3 storage when ``--enable-cacheflow`` runs it."""
