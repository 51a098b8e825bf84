"""What the server tests share: how their servers are launched, restore metrics, reply
comparison, and the conversations they send (multi-turn rounds, and prefixes that return from
host memory and from Redis)."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import redis

from sglang_cacheflow.sglang.config import FORCED_SHAPES, forcing_params
from sglang_cacheflow.testing.redis import RedisServer, wait_for_backups
from sglang_cacheflow.testing.server import SGLangServer
from tests.fixtures.sglang import StartServer

ENV = {"SGLANG_CACHEFLOW_HICACHE_RESERVE_GB": "1"}
COMMON = ("--dtype", "float32", "--page-size", "16", "--max-total-tokens", "1024")
RESTORED = "sglang:cacheflow_restored_tokens_total"
FALLBACKS = "sglang:cacheflow_fallbacks_total"


def reference_server(start: StartServer, model: Any, *args: str) -> SGLangServer:
    """No radix cache: every prefill computes the whole prompt (the replies to match)."""
    return start(model, *COMMON, *args, "--disable-radix-cache", env=ENV)


def cacheflow_server(
    start: StartServer, model: Any, l3: RedisServer, *args: str, host_ratio: str = "1.5",
    **config: Any,
) -> SGLangServer:  # fmt: skip
    """``--enable-cacheflow`` with ``l3`` emptied first (nothing from earlier servers), pages
    of 16 and a chunk of one page, decisions logged; ``config`` adds or overrides keys of
    ``--cacheflow-config`` and ``args`` adds server flags (e.g. ``--tp 2``)."""
    redis.Redis(host="127.0.0.1", port=l3.port).flushall()
    cfg = {"redis_url": l3.url, "chunk_tokens": 16, "log_decisions": True, **config}
    return start(
        model, *COMMON, *args, "--hicache-ratio", host_ratio, "--enable-metrics",
        "--enable-cacheflow", "--cacheflow-config", json.dumps(cfg), env=ENV,
    )  # fmt: skip


def metrics(server: SGLangServer) -> dict[str, float]:
    """The ``sglang:cacheflow_*`` samples of ``/metrics``, by their full name with labels."""
    out: dict[str, float] = {}
    for line in str(server.request("GET", "/metrics")).splitlines():
        if line.startswith("sglang:cacheflow") and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` that carry ``labels``."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return sum(v for k, v in samples.items() if k.startswith(name) and want in k)


def assert_same_replies(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> None:
    """Greedy ids identical, output logprobs within 1e-4 (fp32 models)."""
    assert len(ref) == len(got)
    for a, b in zip(ref, got, strict=True):
        assert a["output_ids"] == b["output_ids"]
        la = [t[0] for t in a["meta_info"]["output_token_logprobs"]]
        lb = [t[0] for t in b["meta_info"]["output_token_logprobs"]]
        assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 1e-4


def ask(server: SGLangServer, ids: list[int], new: int = 4, **sampling: Any) -> dict[str, Any]:
    """A greedy ``/generate`` of ``new`` tokens after ``ids`` (``sampling``: more of its
    sampling params)."""
    return server.generate(input_ids=ids, max_new_tokens=new, **sampling)


def conversations(
    servers: list[SGLangServer],
    seed: int,
    *,
    n_conv: int = 8,
    turns: int = 4,
    first: int = 240,
    grow: int = 16,
    new: int = 4,
) -> list[list[dict[str, Any]]]:
    """Run the same multi-turn conversations on every server: turn by turn, all
    conversations of a turn together (each turn appends the reply and ``grow`` new tokens).
    Returns, per server, every reply."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(first)] for _ in range(n_conv)]
    grows = [
        [[rng.randrange(256) for _ in range(grow)] for _ in range(n_conv)] for _ in range(turns)
    ]
    results: list[list[dict[str, Any]]] = [[] for _ in servers]
    for si, server in enumerate(servers):
        convs = [list(p) for p in prompts]
        for turn in range(turns):
            with ThreadPoolExecutor(n_conv) as pool:
                replies = list(pool.map(partial(ask, server, new=new), convs))
            for i, r in enumerate(replies):
                results[si].append(r)
                convs[i] = convs[i] + r["output_ids"] + grows[turn][i]
            # HiCache backs the turn up to Redis in the background, through the emulated link
            # (~0.5 s for this much KV): let it land so the next turn can find it there.
            time.sleep(2.0)
    return results


# -- one conversation returning from host memory, one from Redis -------------------------

PREFIX, GROW = 480, 16


def returning_prompts(seed: int) -> dict[str, list[int]]:
    """Token ids for :func:`returning`: a "host" and a "redis" prefix of :data:`PREFIX`
    tokens, six fillers that evict them, and the next turns' new tokens."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(256) for _ in range(n)]

    out = {"host": tokens(PREFIX), "redis": tokens(PREFIX)}
    out |= {f"fill{i}": tokens(PREFIX) for i in range(6)}
    out |= {"host+": tokens(GROW), "redis+": tokens(GROW), "next+": tokens(GROW)}
    return out


def returning(
    server: SGLangServer, p: dict[str, list[int]], l3: RedisServer | None, **sampling: Any
) -> list[Any]:
    """A prefix that returns from host memory (two prompts evicted it from a 1024-token
    device pool), one that returns from Redis (four more evicted it from a 1536-token host
    pool once it was backed up to ``l3``), then that conversation's next turn (its prefix is
    on device again). Returns the three replies; ``sampling`` goes with the returning
    requests (e.g. :func:`forcing`'s shape)."""
    ask(server, p["host"])
    ask(server, p["fill0"])
    ask(server, p["fill1"])
    host = ask(server, p["host"] + p["host+"], **sampling)
    to_redis(server, p, l3)
    back = p["redis"] + p["redis+"]
    from_redis = ask(server, back, **sampling)
    following = ask(server, back + from_redis["output_ids"] + p["next+"], **sampling)
    return [host, from_redis, following]


def returned(server: SGLangServer, p: dict[str, list[int]]) -> list[Any]:
    """The replies :func:`returning` gets, from a server with the radix cache disabled (on
    which the prompts that evict nothing change nothing)."""
    host = ask(server, p["host"] + p["host+"])
    back = p["redis"] + p["redis+"]
    from_redis = ask(server, back)
    following = ask(server, back + from_redis["output_ids"] + p["next+"])
    return [host, from_redis, following]


def to_redis(server: SGLangServer, p: dict[str, list[int]], l3: RedisServer | None) -> None:
    """Send the "redis" prefix and evict it from device and host memory; its backup goes to
    Redis in the background, through the emulated link: wait until it has landed. (An idle
    scheduler with --sleep-on-idle handles HiCache's acknowledgements once a second, and only
    then starts the backup to Redis: the key count must hold still for longer than that.)"""
    # what earlier turns back up lands first, so that the keys added next are this prompt's
    before = wait_for_backups(l3.url, settle_s=2.5, limit_s=60) if l3 is not None else 0
    ask(server, p["redis"])
    if l3 is not None:  # its pages are new keys (one each, at least)
        wait_for_backups(l3.url, settle_s=2.5, limit_s=60, at_least=before + PREFIX // 16)
    for i in range(2, 6):
        ask(server, p[f"fill{i}"])
    if l3 is not None:
        wait_for_backups(l3.url, settle_s=2.5, limit_s=60)


def corrupt(client: redis.Redis, keys: list[bytes]) -> None:
    """Flip the bytes of the second half of each record in place (same length): the page's
    checksum fails, the key stays."""
    for k in keys:
        value = bytearray(client.get(k) or b"")
        for i in range(len(value) // 2, len(value)):
            value[i] ^= 0x5A
        client.set(k, bytes(value))


# -- restores forced into one shape (``force_shape``) -------------------------------------

# name (of FORCED_SHAPES) -> what the decision log calls it for a 480-token span
SHAPES: dict[str, str] = {
    "token-split": "token split 240+240",
    "layer-split": "layer split 2/4",
    "load-front": "load front 240+240",
    "load-all": "load all",
    "recompute-all": "recompute all",
}
FRONT_LOADS = {"stream_front_loads": True}  # L3 front loads read by the split reader, streamed
# a split's chunk (the layer split's bottom layers, the token split's front), then the extend
TWO_FORWARDS = {"one_forward_layer_splits": False, "one_forward_token_splits": False}
# a forced shape on a server configured otherwise: name -> (name in SHAPES, config)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "token-split-unstreamed": ("token-split", {"stream_groups": 1}),  # with the overlap loop
    "load-front-streamed": ("load-front", FRONT_LOADS),
    "load-all-streamed": ("load-all", FRONT_LOADS),
    "layer-split-two-forwards": ("layer-split", TWO_FORWARDS),
    "token-split-two-forwards": ("token-split", TWO_FORWARDS),
}


def forced(name: str) -> tuple[tuple[str, float], str, dict[str, Any]]:
    """What ``name`` (of :data:`SHAPES` or :data:`VARIANTS`) forces, the shape its decisions
    log, and the ``--cacheflow-config`` keys it adds."""
    base, config = VARIANTS.get(name, (name, {}))
    return FORCED_SHAPES[base], SHAPES[base], config


def forcing(name: str) -> dict[str, Any]:
    """The sampling params by which a request forces the shape ``name`` on itself."""
    return forcing_params(*forced(name)[0])


def forced_server(
    start: StartServer, model: Any, l3: RedisServer, link: str, name: str
) -> SGLangServer:
    """A CacheFlow server forcing the shape ``name`` for every restore, its Redis seen
    through ``link``."""
    (shape, recompute), _, config = forced(name)
    return cacheflow_server(
        start, model, l3, link=link, force_shape=shape, force_recompute=recompute, **config
    )


class ForcingServers:
    """One CacheFlow server per ``--cacheflow-config`` at a time, shared by the shapes that
    run on that configuration (each request forces its own; a server's first restore of
    each kind would otherwise pay its warm-up in every test)."""

    def __init__(self, start: StartServer, model: Any, l3: RedisServer, link: str) -> None:
        self.start, self.model, self.l3, self.link = start, model, l3, link
        self.config: dict[str, Any] | None = None
        self.server: SGLangServer | None = None

    def get(self, config: dict[str, Any]) -> SGLangServer:
        if self.server is None or config != self.config:
            self.stop()
            self.config = config
            self.server = cacheflow_server(
                self.start, self.model, self.l3, link=self.link, **config
            )
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server = None
