"""redis-py clients of the Redis tier: a blocking connection pool on one server, or a Redis
Cluster client, both RESP2 with the tier's timeouts, retry and command packer; and the
connection pools that serve a key. The URL is parsed by
:mod:`~sglang_cacheflow.tiers.redis_config`.
"""

from __future__ import annotations

from typing import Any, TypeAlias, TypeGuard

import redis
import redis.cluster
import redis.sentinel
from redis._parsers import Encoder
from redis.backoff import ExponentialBackoff
from redis.connection import ConnectionPool, PythonRespSerializer
from redis.retry import Retry

from sglang_cacheflow.tiers.redis_config import (
    RedisAddress,
    RedisTierConfig,
    RedisTierError,
    parse_url,
    redact_url,
)

__all__ = ["REDIS_ERRORS", "Client", "connect", "default_pool", "is_cluster", "slot_pool"]

Client: TypeAlias = redis.Redis | redis.cluster.RedisCluster

# What a call into redis-py may raise when a server or the cluster misbehaves.
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)


def connect(config: RedisTierConfig) -> Client:
    """A client for ``config.url``, answering ``PING``; otherwise :class:`RedisTierError`
    naming the redacted URL."""
    address = parse_url(config.url, config.cluster)
    options = _connection_options(config)
    try:
        if address.cluster:
            client: Client = _cluster_client(address, config, options)
        elif address.service is not None:
            client = _sentinel_client(address, config, options)
        else:
            pool = redis.BlockingConnectionPool.from_url(
                address.url,
                max_connections=config.streams * 2 + 4,
                timeout=config.socket_timeout_s,
                **options,
            )
            client = redis.Redis(connection_pool=pool)
        client.ping()
    except (*REDIS_ERRORS, ValueError, TypeError) as e:
        raise RedisTierError(f"cannot reach Redis at {redact_url(config.url)}: {e}") from None
    return client


def _connection_options(config: RedisTierConfig) -> dict[str, Any]:
    """Options of every connection, on one server or on each cluster node."""
    options: dict[str, Any] = dict(
        socket_timeout=config.socket_timeout_s,
        socket_connect_timeout=config.connect_timeout_s,
        socket_read_size=config.socket_read_size,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
        # RESP2 (redis-py 8 defaults to RESP3): the direct path reads RESP2 replies, and
        # a RESP2 connection carries no push messages. ``?protocol=3`` in the URL wins
        # (and turns the direct path off).
        protocol=2,
        # redis-py's Python packer sends large values as they are; hiredis's packer
        # copies each value into the command first (measured: 2 ms per MiB here).
        command_packer=PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode),
    )
    if config.client_name:
        options["client_name"] = config.client_name
    return options


def _cluster_client(
    address: RedisAddress, config: RedisTierConfig, options: dict[str, Any]
) -> redis.cluster.RedisCluster:
    kwargs: dict[str, Any] = dict(
        startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in address.nodes],
        username=address.username,
        password=address.password,
        ssl=address.ssl,
        # Per master; opened on demand. Batches use up to the executor's workers.
        max_connections=max(64, config.streams * 16),
        **options,
    )
    if address.ssl_cert_reqs is not None:
        kwargs["ssl_cert_reqs"] = address.ssl_cert_reqs
    return redis.cluster.RedisCluster(**kwargs)


def _sentinel_client(
    address: RedisAddress, config: RedisTierConfig, options: dict[str, Any]
) -> redis.Redis:
    """The master the sentinels name; its pool asks them again after a failover."""
    sentinels = redis.sentinel.Sentinel(
        list(address.nodes),
        socket_timeout=config.connect_timeout_s,
        socket_connect_timeout=config.connect_timeout_s,
    )
    kwargs: dict[str, Any] = dict(
        db=address.db, username=address.username, password=address.password, **options
    )
    if address.ssl:
        kwargs["ssl"] = True
        if address.ssl_cert_reqs is not None:
            kwargs["ssl_cert_reqs"] = address.ssl_cert_reqs
    return sentinels.master_for(address.service, redis_class=redis.Redis, **kwargs)


def is_cluster(client: Client) -> TypeGuard[redis.cluster.RedisCluster]:
    return isinstance(client, redis.cluster.RedisCluster)


def default_pool(client: Client) -> ConnectionPool:
    """The pool of the server, or of the cluster's default node (to inspect its options)."""
    if is_cluster(client):
        return client.get_default_node().redis_connection.connection_pool  # type: ignore[union-attr]
    return client.connection_pool


def slot_pool(client: redis.cluster.RedisCluster, key: str) -> ConnectionPool:
    """The pool of the master that holds ``key`` by the client's slot map (no round trip).
    Raises one of :data:`REDIS_ERRORS` when no node covers its slot."""
    node = client.nodes_manager.get_node_from_slot(client.keyslot(key))
    return node.redis_connection.connection_pool  # type: ignore[union-attr]
