"""Options and URLs of the Redis tier: :class:`RedisTierConfig`, the URL schemes it accepts
(:data:`URL_SCHEMES`), URL parsing into a :class:`RedisAddress`, and password redaction
for logs. Nothing here imports redis-py or opens a connection (that is
:mod:`~sglang_cacheflow.tiers.redis_connect`). URL forms and options: docs/tiers.md, "URLs
and options".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from sglang_cacheflow.tiers.page import PageLayout, mac_key_from_secret, split_blocks

__all__ = [
    "URL_SCHEMES",
    "RedisAddress",
    "RedisTierConfig",
    "RedisTierError",
    "parse_url",
    "redact_url",
]

URL_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)


class RedisTierError(RuntimeError):
    """The Redis tier cannot start: bad URL or options, or the server is unreachable."""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and error messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if "@" not in parts.netloc:
        return url
    userinfo, hosts = parts.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    masked = f"{user}:***@{hosts}" if ":" in userinfo else f"***@{hosts}"
    return parts._replace(netloc=masked).geturl()


@dataclass(frozen=True)
class RedisTierConfig:
    """Options of :class:`~sglang_cacheflow.tiers.redis.RedisTier`.

    ``url``: ``redis://[[user]:password@]host:port/db``, ``rediss://...`` (TLS, query
    options as redis-py reads them, e.g. ``?ssl_cert_reqs=none``), ``unix://[:password@]
    /path/to.sock?db=0``, or ``redis+cluster://host:port[,host:port...]`` (also
    ``rediss+cluster://``) for Redis Cluster; ``cluster=True`` (or ``?cluster=true``) makes
    a ``redis://`` URL a cluster URL. ``streams``: threads (and connections) a batch call
    uses. ``ttl_s``: expiry of written pages (None: keep until Redis evicts them).
    ``block_bytes``/``layers_per_block``: record size (layers per key). ``pipeline_bytes``:
    bytes of values per pipelined round trip. ``direct_io``: send the tier's GET, GETRANGE
    and SET commands on redis-py's pooled connections and read the replies with
    :mod:`~sglang_cacheflow.tiers.resp`, values straight into the destination tensors (one
    copy); False uses redis-py pipelines (and their reply copies) for everything.
    ``pipeline_depth``: groups of ``pipeline_bytes`` in flight per connection on the direct
    path (sent before the replies of the previous ones are read). ``client_name``: set on
    every connection (``CLIENT SETNAME``), so that ``CLIENT LIST`` tells whose it is.
    ``mac_key_env``: the environment variable holding a secret; records are then
    authenticated with keyed BLAKE3 instead of checksummed with xxh3 (docs/tiers.md,
    "Threat model"), and only servers holding the same secret read each other's records.
    """

    url: str
    cluster: bool | None = None
    streams: int = 2
    ttl_s: float | None = None
    block_bytes: int = 1 << 20
    layers_per_block: int | None = None
    pipeline_bytes: int = 1 << 20
    socket_timeout_s: float = 10.0
    connect_timeout_s: float = 2.0
    socket_read_size: int = 1 << 16
    evict_corrupt: bool = True
    direct_io: bool = True
    pipeline_depth: int = 1
    client_name: str | None = None
    mac_key_env: str | None = None

    def __post_init__(self) -> None:
        if self.streams < 1:
            raise ValueError(f"streams must be >= 1, got {self.streams}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive or None, got {self.ttl_s}")
        if self.layers_per_block is not None and self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.pipeline_depth < 1:
            raise ValueError(f"pipeline_depth must be >= 1, got {self.pipeline_depth}")
        if self.block_bytes < 1 or self.pipeline_bytes < 1:
            raise ValueError("block_bytes and pipeline_bytes must be positive")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> RedisTierConfig:
        """From a JSON-like mapping (e.g. SGLang's extra config); unknown keys are ignored
        so the mapping may carry other components' options."""
        names = set(cls.__dataclass_fields__)
        if "url" not in options:
            raise ValueError('Redis tier options need "url", e.g. "redis://127.0.0.1:6379/0"')
        return cls(**{k: v for k, v in options.items() if k in names})

    def mac_key(self) -> bytes | None:
        """The MAC key derived from the secret in ``mac_key_env`` (None without one); the
        variable must be set and hold at least 16 bytes."""
        if self.mac_key_env is None:
            return None
        value = os.environ.get(self.mac_key_env, "")
        hint = f"e.g. `export {self.mac_key_env}=$(openssl rand -hex 32)`"
        if not value:
            raise RedisTierError(
                f"mac_key_env names {self.mac_key_env}, which is not set: export a secret of "
                f"at least 16 bytes in it ({hint})"
            )
        if len(value.encode()) < 16:
            raise RedisTierError(
                f"{self.mac_key_env} holds {len(value.encode())} bytes; a secret needs at "
                f"least 16 ({hint})"
            )
        try:
            return mac_key_from_secret(value.encode())
        except ImportError:
            raise RedisTierError(
                "authenticated records (mac_key_env) need blake3: pip install blake3"
            ) from None

    def layers_per_block_for(self, layout: PageLayout) -> int:
        if self.layers_per_block is not None:
            return min(self.layers_per_block, layout.num_layers)
        return max(1, min(layout.num_layers, self.block_bytes // layout.layer_bytes))

    def blocks_for(self, layout: PageLayout) -> list[tuple[int, int]]:
        """``(layer_start, layer_count)`` of each block (Redis value) of a page."""
        return split_blocks(layout.num_layers, self.layers_per_block_for(layout))


@dataclass(frozen=True)
class RedisAddress:
    """Where a tier URL says to connect, checked but not connected.

    A single server keeps its URL (``url``, less the tier's own ``cluster`` query key) for
    redis-py to parse; a cluster URL is taken apart here, because redis-py's cluster client
    takes startup nodes and credentials, not a URL with several hosts.
    """

    cluster: bool
    url: str = ""
    nodes: tuple[tuple[str, int], ...] = ()  # cluster startup nodes, or the sentinels
    service: str | None = None  # the master's name at the sentinels
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    ssl_cert_reqs: str | None = None


def parse_url(url: str, cluster: bool | None = None) -> RedisAddress:
    """Parse a tier URL (``cluster``: :attr:`RedisTierConfig.cluster`, None to go by the
    URL). Raises :class:`RedisTierError` naming the redacted URL when it cannot be used."""
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise RedisTierError(f"cannot parse Redis URL {shown}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in URL_SCHEMES:
        raise RedisTierError(
            f"Redis URL {shown} has scheme {scheme!r}; use one of "
            f"{', '.join(s + '://' for s in URL_SCHEMES)}"
        )
    query = parse_qs(parts.query)
    if scheme.endswith("+sentinel"):
        return _sentinel_address(parts, query, shown)
    if cluster is None:
        flag = query.get("cluster", ["false"])[-1].lower()
        cluster = scheme.endswith("+cluster") or flag in ("1", "true", "yes")
    if not cluster:
        return RedisAddress(cluster=False, url=_strip_query_key(url, "cluster"))
    if scheme == "unix":
        raise RedisTierError(f"Redis Cluster cannot be reached over a unix socket: {shown}")
    netloc, username, password = _credentials(parts.netloc)
    if not netloc:
        raise RedisTierError(f"Redis Cluster URL {shown} names no host")
    db = parts.path.strip("/")
    if db not in ("", "0"):
        raise RedisTierError(f"Redis Cluster has only database 0; {shown} asks for {db}")
    return RedisAddress(
        cluster=True,
        nodes=tuple(_parse_hosts(netloc, shown)),
        username=username,
        password=password,
        ssl=scheme.startswith("rediss"),
        ssl_cert_reqs=query["ssl_cert_reqs"][-1] if "ssl_cert_reqs" in query else None,
    )


def _credentials(netloc: str) -> tuple[str, str | None, str | None]:
    """``(hosts, username, password)`` of a URL's ``[user[:password]@]hosts``."""
    if "@" not in netloc:
        return netloc, None, None
    userinfo, hosts = netloc.rsplit("@", 1)
    user, _, pw = userinfo.partition(":")
    return hosts, unquote(user) or None, unquote(pw) or None


def _sentinel_address(parts: Any, query: dict[str, list[str]], shown: str) -> RedisAddress:
    """``redis+sentinel://[user:password@]h1:p1[,h2:p2...]/service[/db]``: the sentinels,
    and the credentials and database of the master they name."""
    hosts, username, password = _credentials(parts.netloc)
    path = [p for p in parts.path.split("/") if p]
    if not hosts or not path or len(path) > 2:
        raise RedisTierError(
            f"Sentinel URL {shown} must read redis+sentinel://host:port[,host:port...]/"
            "SERVICE[/DB], e.g. redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster"
        )
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise RedisTierError(
            f"Sentinel URL {shown}: database {path[1]!r} is not a number"
        ) from None
    return RedisAddress(
        cluster=False,
        nodes=tuple(_parse_hosts(hosts, shown)),
        service=path[0],
        db=db,
        username=username,
        password=password,
        ssl=parts.scheme.lower().startswith("rediss"),
        ssl_cert_reqs=query["ssl_cert_reqs"][-1] if "ssl_cert_reqs" in query else None,
    )


def _parse_hosts(netloc_hosts: str, shown: str) -> list[tuple[str, int]]:
    out = []
    for item in netloc_hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = port, "6379"
        try:
            out.append((host.strip("[]"), int(port)))
        except ValueError:
            raise RedisTierError(f"bad host:port {item!r} in Redis URL {shown}") from None
    return out


def _strip_query_key(url: str, key: str) -> str:
    parts = urlsplit(url)
    if not parts.query:
        return url
    kept = "&".join(p for p in parts.query.split("&") if not p.startswith(key + "="))
    return parts._replace(query=kept).geturl()
