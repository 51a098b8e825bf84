"""Redis tier URLs parsed without a server: what a cluster URL becomes, and the public names
other packages import from ``tiers.redis``."""

from __future__ import annotations

import pytest

from sglang_cacheflow.tiers import redis as redis_tier
from sglang_cacheflow.tiers import redis_config
from sglang_cacheflow.tiers.redis_config import (
    URL_SCHEMES,
    RedisAddress,
    RedisTierError,
    parse_url,
    redact_url,
)


def test_public_names_are_reexported_from_tiers_redis() -> None:
    for name in ("RedisTier", "RedisTierConfig", "RedisTierError", "redact_url", "URL_SCHEMES"):
        assert name in redis_tier.__all__
        assert hasattr(redis_tier, name)
    assert redis_tier.URL_SCHEMES is redis_config.URL_SCHEMES
    assert redis_tier.RedisTierError is redis_config.RedisTierError


def test_single_server_url_goes_to_redis_py_without_the_cluster_key() -> None:
    url = "redis://u:p@h:1/2?cluster=false&socket_keepalive=true"
    assert parse_url(url) == RedisAddress(
        cluster=False, url="redis://u:p@h:1/2?socket_keepalive=true"
    )
    assert parse_url("unix:///tmp/r.sock?db=1") == RedisAddress(False, "unix:/tmp/r.sock?db=1")
    # cluster=False wins over the URL's scheme and flag.
    assert not parse_url("redis://h:1/0?cluster=true", cluster=False).cluster


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://h:1",
        "REDIS+CLUSTER://h:1/",
        "redis://h:1/0?cluster=true",
        "redis://h:1?cluster=1",
    ],
)
def test_cluster_by_scheme_or_flag(url: str) -> None:
    assert parse_url(url).cluster


def test_cluster_url_taken_apart() -> None:
    a = parse_url("rediss+cluster://us%40er:p%3Ass@h1:7000,[::1]:7001,h3/0?ssl_cert_reqs=none")
    assert a.cluster and a.ssl and a.ssl_cert_reqs == "none"
    assert a.nodes == (("h1", 7000), ("::1", 7001), ("h3", 6379))
    assert (a.username, a.password) == ("us@er", "p:ss")
    b = parse_url("redis://:pw@h:1", cluster=True)
    assert (b.username, b.password, b.ssl, b.ssl_cert_reqs) == (None, "pw", False, None)


@pytest.mark.parametrize(
    ("url", "cluster", "message"),
    [
        ("memcached://h:1", None, r"scheme 'memcached'; use one of redis://, rediss://, unix://"),
        ("redis+cluster://u:secret@h:x", None, r"bad host:port 'h:x' in Redis URL .*u:\*\*\*@"),
        ("redis+cluster://h:1/3", None, "only database 0"),
        (
            "redis+cluster://u:secret@/",
            None,
            r"Redis Cluster URL redis\+cluster://u:\*\*\*@/ names",
        ),
        ("unix:///tmp/r.sock", True, "cannot be reached over a unix socket"),
        ("redis://[::1", None, "cannot parse Redis URL"),
    ],
)
def test_bad_urls_name_the_redacted_url(url: str, cluster: bool | None, message: str) -> None:
    with pytest.raises(RedisTierError, match=message) as e:
        parse_url(url, cluster)
    assert "secret" not in str(e.value)


def test_schemes_and_redaction() -> None:
    for s in URL_SCHEMES:  # a sentinel URL names the master's service too
        address = parse_url(f"{s}://h:1/svc" if s.endswith("+sentinel") else f"{s}://h:1")
        assert address.cluster == s.endswith("+cluster")
        assert (address.service is not None) == s.endswith("+sentinel")
    assert redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://pw@h:1/0") == "redis://***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
