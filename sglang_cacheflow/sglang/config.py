"""The ``--cacheflow-policy`` / ``--cacheflow-config`` schema: :class:`CacheFlowConfig`, its
validation (:func:`parse_config`) and the cost model prior it carries. The keys are documented
in docs/sglang.md ("Configuration"); the flags and what they imply are in
:mod:`sglang_cacheflow.sglang.flags`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from sglang_cacheflow.planner.policies import POLICIES, serves_in_order
from sglang_cacheflow.tiers.names import HOST_TIER, L3_TIER, REDIS_TIER
from sglang_cacheflow.tiers.redis_config import URL_SCHEMES

__all__ = [
    "CPU_ARRIVAL_GAP_MS",
    "POLICY_CHOICES",
    "REQUEST_PARAM",
    "STREAM_GROUPS",
    "CacheFlowConfig",
    "ConfigError",
    "forcing_params",
    "parse_config",
    "request_blend_ratio",
    "request_chunks",
    "request_force",
    "tier_prior",
]

FLAG_ENABLE = "--enable-cacheflow"
FLAG_POLICY = "--cacheflow-policy"
FLAG_CONFIG = "--cacheflow-config"

POLICY_CHOICES = POLICIES  # the names the patch lists too (tests/sglang/test_patch.py)

CPU_ARRIVAL_GAP_MS = 5.0
"""Default ``arrival_gap_ms`` on the CPU engine, whose forwards hold the scheduler's thread:
a burst sent together reaches the scheduler within a few milliseconds (docs/sglang.md)."""

STREAM_GROUPS = 6
"""Default ``stream_groups`` where splits stream (a scheduler without SGLang's overlap
loop): each group is one tier call, so more groups shorten the extend's wait behind the
last group and add a call's latency each. Measured at 512 tokens on the CPU engine
(docs/benchmarks.md, "How many layer groups"): 3, 6 and 15 groups within noise of each
other, all about 8% sooner than unstreamed; 6 is the middle of that flat range."""

CHUNK_STORES = (HOST_TIER, REDIS_TIER)
"""The tiers that can keep reused chunks (``chunk_store``)."""

STORAGE_MODULE = "sglang_cacheflow.sglang.storage"
STORAGE_CLASS = "CacheFlowRedisStorage"

_TIER_PRIORS = {HOST_TIER: (5.0, 0.0), L3_TIER: (0.5, 1.0)}  # (GB/s, latency ms) per tier
_PRIOR_KEYS = {
    "tokens_per_s": 2.0e4,
    "attention_s_per_token_pair": 0.0,
    "step_s": 0.0,
    **{f"{tier}_GBps": gbps for tier, (gbps, _) in _TIER_PRIORS.items()},
    **{f"{tier}_latency_ms": ms for tier, (_, ms) in _TIER_PRIORS.items()},
}


def tier_prior(prior: dict[str, float], tier: str) -> tuple[float, float]:
    """(GB/s, latency in ms) of ``tier`` in a ``prior`` mapping of the configuration."""
    return prior[f"{tier}_GBps"], prior[f"{tier}_latency_ms"]


class ConfigError(ValueError):
    """Bad ``--cacheflow-*`` input; the message says what to change."""


@dataclass(frozen=True)
class CacheFlowConfig:
    """What ``--cacheflow-policy`` and ``--cacheflow-config`` say.

    ``redis_url``: the Redis L3 tier (none: host tier only). ``link``: emulated link the L3
    tier is seen through, e.g. ``"10gbps+0.2ms"`` (benchmarks; see
    :class:`~sglang_cacheflow.tiers.shaping.LinkShape`). ``redis``: further options of the
    Redis tier (``streams``, ``block_bytes``, ``ttl_s``...). ``chunk_tokens``: split points of
    a restore (a multiple of ``--page-size``). ``prior``: the cost model before calibration.
    ``calibrate``: refit the cost model from measured forwards and transfers.
    ``max_round_requests``: waiting requests considered per scheduling round.
    ``log_decisions``: log each restore decision at INFO instead of DEBUG.
    ``split_wait_s``: longest wait of the scheduler, at a split restore's splice, for the back
    still being read (what has landed by then is used, the rest recomputed).
    ``force_shape`` / ``force_recompute``: tests and experiments: every restore takes this
    shape (``token``: Cake's order, ``load_front``) with about this fraction of its evicted
    span recomputed (0: load all, 1: recompute all), whatever the policy.
    ``arrival_gap_ms`` / ``arrival_polls``: an idle scheduler that receives a request keeps
    receiving while requests come within this gap of each other (at most this many more
    polls), so that a burst is planned as one round (:mod:`sglang_cacheflow.sglang.arrivals`);
    ``None``: :data:`CPU_ARRIVAL_GAP_MS` on the CPU engine, 0 (off) elsewhere.
    ``stream_groups``: a split restore's load is read in this many layer groups and
    streamed into the extend of the new tokens, each layer of which waits for its group
    (:mod:`sglang_cacheflow.sglang.stream`); 1: not streamed, the splice waits for the whole
    load. Streaming needs a scheduler without SGLang's overlap loop; ``None``:
    :data:`STREAM_GROUPS` there, 1 with the loop.
    ``stream_front_loads``: under ``cacheflow`` with streamed splits, an L3 load of a span's
    front (load front, load all) is read by the split reader and streams into the one extend
    that recomputes the rest, instead of landing whole in host memory through SGLang's
    prefetch first (the planner then prices the ``redis`` tier as streamed). Off by default:
    at 512 tokens on the CPU engine it made no restore faster (docs/benchmarks.md, "L3 front
    loads streamed into the extend").
    ``one_forward_layer_splits``: a layer split runs in the forward of the new tokens (the
    span and the new tokens through the bottom layers, the new tokens alone through the top
    ones, whose span KV streams in; :mod:`~sglang_cacheflow.sglang.one_forward`), not as a
    chunk and then an extend. Needs streamed splits and the CPU engine; ``None``: on there,
    off elsewhere (docs/benchmarks.md, "A layer split in one forward").
    ``one_forward_token_splits``: a token split may run in the forward of the new tokens
    (the front and the new tokens through every layer, each layer once the back's KV of that
    layer has streamed in; :mod:`~sglang_cacheflow.sglang.one_forward`), not as a chunk of
    the front and then an extend, where the plan prices it to end first (Cake's rule, a
    request forcing ``token``). Needs streamed splits and the CPU engine; ``None``: as
    ``one_forward_layer_splits`` (docs/benchmarks.md, "Cake's order in one forward").
    ``chunk_store``: chunk reuse beyond exact prefixes (:mod:`~sglang_cacheflow.sglang.blend`):
    the tier that keeps the chunks requests mark (``host``: this process's memory, at most
    ``chunk_store_mb``; ``redis``: the ``redis_url`` server); None: off. Needs the CPU engine
    without SGLang's overlap loop. ``blend_min_ratio``: the least share of a reused chunk's
    tokens recomputed (the planner may choose more, :func:`~sglang_cacheflow.planner.plan_blend`).
    ``force_blend_ratio``: tests and experiments: every request with stored chunks is
    blended at this ratio, whatever the plan predicts.
    """

    policy: str = "cacheflow"
    redis_url: str | None = None
    link: str | None = None
    redis: dict[str, Any] = field(default_factory=dict)
    chunk_tokens: int = 64
    prior: dict[str, float] = field(default_factory=lambda: dict(_PRIOR_KEYS))
    calibrate: bool = True
    max_round_requests: int = 64
    log_decisions: bool = False
    split_wait_s: float = 30.0
    force_shape: str | None = None
    force_recompute: float = 0.5
    arrival_gap_ms: float | None = None
    arrival_polls: int = 8
    stream_groups: int | None = None
    stream_front_loads: bool = False
    one_forward_layer_splits: bool | None = None
    one_forward_token_splits: bool | None = None
    chunk_store: str | None = None
    chunk_store_mb: int = 256
    blend_min_ratio: float = 0.15
    force_blend_ratio: float | None = None

    def for_device(self, device: str | None, overlap: bool | None = None) -> CacheFlowConfig:
        """This configuration with its server-dependent defaults resolved for ``device``
        and a scheduler with (``overlap``; default: off on the CPU engine, as
        ``--enable-cacheflow`` sets it there) or without SGLang's overlap loop."""
        if overlap is None:
            overlap = device != "cpu"
        if overlap and (self.stream_groups or 1) > 1:
            raise ConfigError(
                f"{FLAG_CONFIG}: stream_groups={self.stream_groups} streams split restores, "
                "which needs --disable-overlap-schedule (or set stream_groups to 1)"
            )
        if self.stream_front_loads and (overlap or self.stream_groups == 1):
            raise ConfigError(
                f"{FLAG_CONFIG}: stream_front_loads streams L3 front loads into the extend, "
                "which needs streamed splits: --disable-overlap-schedule and stream_groups > 1 "
                "(or set stream_front_loads to false)"
            )
        ones = {}  # one_forward_*_splits, resolved
        for name in ("one_forward_layer_splits", "one_forward_token_splits"):
            one = getattr(self, name)
            if one and (overlap or self.stream_groups == 1):
                raise ConfigError(
                    f"{FLAG_CONFIG}: {name} streams a split's load into its one forward, "
                    "which needs streamed splits: --disable-overlap-schedule and "
                    f"stream_groups > 1 (or set {name} to false)"
                )
            if one and device != "cpu":
                raise ConfigError(
                    f"{FLAG_CONFIG}: {name} changes a forward's tokens before a layer, which "
                    "the CPU engine's attention backends follow (they read the batch's lengths "
                    "and positions at every layer) and CUDA backends do not (they plan once a "
                    "forward): set it to false on this device"
                )
            ones[name] = one
        if self.chunk_store and (overlap or device != "cpu"):
            raise ConfigError(
                f"{FLAG_CONFIG}: chunk_store blends chunks in one forward whose queries leave "
                "holes between them, which the CPU engine's attention follows (CUDA backends "
                "need a masked extend, not built yet), and cuts a failed blend back before the "
                "next batch (--disable-overlap-schedule): unset chunk_store on this device"
            )
        gap = self.arrival_gap_ms
        if gap is None:
            gap = CPU_ARRIVAL_GAP_MS if device == "cpu" else 0.0
        groups = self.stream_groups
        if groups is None:
            groups = 1 if overlap else STREAM_GROUPS
        for name, one in ones.items():  # on where they can run: streamed splits on CPU
            ones[name] = device == "cpu" and groups > 1 if one is None else one
        return replace(self, arrival_gap_ms=gap, stream_groups=groups, **ones)

    @property
    def force(self) -> tuple[str, float] | None:
        """The planner's ``force`` argument."""
        return (self.force_shape, self.force_recompute) if self.force_shape else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CacheFlowConfig:
        data = json.loads(text)
        return parse_config(data.pop("policy", "cacheflow"), data)

    def storage_extra_config(self) -> dict[str, Any]:
        """``--hicache-storage-backend-extra-config`` of the Redis L3 backend."""
        extra: dict[str, Any] = {
            "backend_name": "cacheflow-redis",
            "module_path": STORAGE_MODULE,
            "class_name": STORAGE_CLASS,
            "url": self.redis_url,
            # SGLang skips L3 lookups shorter than this (default 256 tokens); the planner
            # decides per request, at chunk granularity.
            "prefetch_threshold": self.chunk_tokens,
            **self.redis,
        }
        if self.link:
            extra["link"] = self.link
        return extra


# JSON types each annotation of CacheFlowConfig accepts (``policy`` is its own flag)
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str | None": (str, type(None)),
    "float | None": (int, float, type(None)),
    "dict[str, Any]": (dict,),
    "dict[str, float]": (dict,),
    "int": (int,),
    "int | None": (int, type(None)),
    "bool": (bool,),
    "bool | None": (bool, type(None)),
    "float": (int, float),
}
_CONFIG_KEYS = {
    f.name: _JSON_TYPES[str(f.type)] for f in fields(CacheFlowConfig) if f.name != "policy"
}
_DEFAULTS = CacheFlowConfig()


def parse_config(policy: str | None, config: str | Mapping[str, Any] | None) -> CacheFlowConfig:
    """Validate ``--cacheflow-policy`` and ``--cacheflow-config`` (JSON text or a mapping)."""
    policy = policy or "cacheflow"
    if policy not in POLICY_CHOICES:
        raise ConfigError(
            f"{FLAG_POLICY} {policy!r} is unknown; choose one of {', '.join(POLICY_CHOICES)}"
        )
    if config is None or config == "":
        data: dict[str, Any] = {}
    elif isinstance(config, str):
        try:
            data = json.loads(config)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{FLAG_CONFIG} is not valid JSON ({e}); write e.g. "
                '\'{"redis_url": "redis://127.0.0.1:6379/0", "chunk_tokens": 64}\''
            ) from None
    else:
        data = dict(config)
    if not isinstance(data, dict):
        raise ConfigError(f"{FLAG_CONFIG} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"{FLAG_CONFIG}: unknown key(s) {', '.join(unknown)}; known keys: "
            f"{', '.join(sorted(_CONFIG_KEYS))}"
        )
    for key, types in _CONFIG_KEYS.items():
        if key in data and not isinstance(data[key], types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(f"{FLAG_CONFIG}: {key} must be {names}, got {json.dumps(data[key])}")
        if key in data and bool not in types and isinstance(data[key], bool):
            raise ConfigError(f"{FLAG_CONFIG}: {key} must be a number, got {json.dumps(data[key])}")
    url = data.get("redis_url")
    if url is not None:
        schemes = tuple(f"{scheme}://" for scheme in URL_SCHEMES)
        if not url.startswith(schemes):
            raise ConfigError(
                f"{FLAG_CONFIG}: redis_url {url!r} must start with one of {', '.join(schemes)}"
            )
    link = data.get("link")
    if link is not None:
        from sglang_cacheflow.tiers.shaping import LinkShape

        if url is None:
            raise ConfigError(f"{FLAG_CONFIG}: link shapes the Redis tier; set redis_url too")
        try:
            LinkShape.parse(link)
        except ValueError as e:
            raise ConfigError(f"{FLAG_CONFIG}: {e}") from None
    if data.get("redis") and url is None:
        raise ConfigError(f"{FLAG_CONFIG}: redis options need redis_url")
    if "redis" in data:
        from sglang_cacheflow.tiers.redis import RedisTierConfig

        try:
            RedisTierConfig.from_dict({"url": url or "redis://x", **data["redis"]})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{FLAG_CONFIG}: redis options: {e}") from None
    if data.get("chunk_tokens", _DEFAULTS.chunk_tokens) < 1:
        raise ConfigError(f"{FLAG_CONFIG}: chunk_tokens must be >= 1, got {data['chunk_tokens']}")
    if data.get("max_round_requests", _DEFAULTS.max_round_requests) < 1:
        raise ConfigError(
            f"{FLAG_CONFIG}: max_round_requests must be >= 1, got {data['max_round_requests']}"
        )
    if (data.get("arrival_gap_ms") or 0) < 0:
        raise ConfigError(
            f"{FLAG_CONFIG}: arrival_gap_ms must be >= 0 (0: off), got {data['arrival_gap_ms']}"
        )
    if data.get("arrival_polls", _DEFAULTS.arrival_polls) < 1:
        raise ConfigError(f"{FLAG_CONFIG}: arrival_polls must be >= 1, got {data['arrival_polls']}")
    if data.get("stream_groups") is not None and data["stream_groups"] < 1:
        raise ConfigError(
            f"{FLAG_CONFIG}: stream_groups must be >= 1 (1: not streamed), got "
            f"{data['stream_groups']}"
        )
    if data.get("stream_front_loads") and not serves_in_order(policy):
        raise ConfigError(
            f"{FLAG_CONFIG}: stream_front_loads needs a policy served one restore per forward "
            f"(a streamed extend runs alone): {FLAG_POLICY} cacheflow, not {policy!r}"
        )
    store = data.get("chunk_store")
    if store is not None and store not in CHUNK_STORES:
        raise ConfigError(
            f"{FLAG_CONFIG}: chunk_store {store!r} is unknown; choose one of "
            f"{', '.join(CHUNK_STORES)} (or null: no chunk reuse)"
        )
    if store == REDIS_TIER and url is None:
        raise ConfigError(f"{FLAG_CONFIG}: chunk_store {store!r} keeps chunks in redis_url: set it")
    if data.get("chunk_store_mb", _DEFAULTS.chunk_store_mb) < 1:
        raise ConfigError(
            f"{FLAG_CONFIG}: chunk_store_mb must be >= 1, got {data['chunk_store_mb']}"
        )
    for key in ("blend_min_ratio", "force_blend_ratio"):
        if not 0.0 <= (data.get(key) or 0.0) <= 1.0:
            raise ConfigError(f"{FLAG_CONFIG}: {key} must be in [0, 1], got {data[key]}")
    if data.get("split_wait_s", _DEFAULTS.split_wait_s) <= 0:
        raise ConfigError(f"{FLAG_CONFIG}: split_wait_s must be > 0, got {data['split_wait_s']}")
    if data.get("force_shape") is not None:
        from sglang_cacheflow.planner.policies import check_forced_shape
        from sglang_cacheflow.sglang.capabilities import SGLANG

        try:
            recompute = data.get("force_recompute", _DEFAULTS.force_recompute)
            check_forced_shape(data["force_shape"], recompute, SGLANG)
        except ValueError as e:
            raise ConfigError(f"{FLAG_CONFIG}: force_shape: {e}") from None
    prior = dict(_PRIOR_KEYS)
    for key, value in data.get("prior", {}).items():
        if key not in _PRIOR_KEYS:
            raise ConfigError(
                f"{FLAG_CONFIG}: unknown prior key {key!r}; known: {', '.join(_PRIOR_KEYS)}"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{FLAG_CONFIG}: prior {key} must be a number >= 0, got {value!r}")
        prior[key] = float(value)
    for key in ("tokens_per_s", *(f"{tier}_GBps" for tier in _TIER_PRIORS)):
        if prior[key] <= 0:
            raise ConfigError(f"{FLAG_CONFIG}: prior {key} must be > 0")
    known = {k: data[k] for k in _CONFIG_KEYS if k in data and k not in ("prior", "redis")}
    cfg = replace(_DEFAULTS, policy=policy, prior=prior, redis=dict(data.get("redis", {})), **known)
    # JSON numbers as the fields' types (an int where a float is expected)
    gap = None if cfg.arrival_gap_ms is None else float(cfg.arrival_gap_ms)
    return replace(
        cfg,
        split_wait_s=float(cfg.split_wait_s),
        force_recompute=float(cfg.force_recompute),
        arrival_gap_ms=gap,
        blend_min_ratio=float(cfg.blend_min_ratio),
        force_blend_ratio=None if cfg.force_blend_ratio is None else float(cfg.force_blend_ratio),
    )


REQUEST_PARAM = "cacheflow"
"""The key of a request's ``sampling_params.custom_params`` that holds its own settings:
``{"force_shape": ..., "force_recompute": ...}``, as the config keys, for that request only,
and ``"chunks": [s0, e0, s1, e1, ...]``, the token ranges ``[s, e)`` of its prompt that are
reusable chunks, with ``"blend_ratio"`` (tests and experiments) the share of its reused
chunks recomputed, as ``force_blend_ratio`` for that request only (docs/sglang.md,
"Configuration" and "Chunk reuse")."""

_REQUEST_KEYS = ("force_shape", "force_recompute", "chunks", "blend_ratio")


FORCED_SHAPES: dict[str, tuple[str, float]] = {
    "token-split": ("token", 0.5),
    "layer-split": ("layer", 0.5),
    "load-front": ("load_front", 0.5),
    "load-all": ("load_front", 0.0),
    "recompute-all": ("load_front", 1.0),
}
"""The restore shapes a check forces, by name: (``force_shape``, ``force_recompute``)."""


def forcing_params(force_shape: str, force_recompute: float) -> dict[str, Any]:
    """The sampling params by which a request forces a shape on itself (what
    :func:`request_force` reads back)."""
    own = {"force_shape": force_shape, "force_recompute": force_recompute}
    return {"custom_params": {REQUEST_PARAM: own}}


def _request_own(custom_params: Any) -> Mapping[str, Any] | None:
    """A request's own settings (:data:`REQUEST_PARAM`), checked for unknown keys."""
    if not isinstance(custom_params, Mapping) or custom_params.get(REQUEST_PARAM) is None:
        return None
    own = custom_params[REQUEST_PARAM]
    if not isinstance(own, Mapping) or set(own) - set(_REQUEST_KEYS):
        raise ConfigError(
            f"custom_params[{REQUEST_PARAM!r}] must be an object with any of "
            f"{', '.join(_REQUEST_KEYS)}, got {own!r}"
        )
    return own


def request_chunks(custom_params: Any, prompt_tokens: int) -> list[tuple[int, int]] | None:
    """The chunks a request marks in its prompt of ``prompt_tokens`` tokens (``chunks`` of
    :data:`REQUEST_PARAM`), as ``[start, end)`` ranges, or None. Raises :class:`ConfigError`
    for a malformed list: odd length, not integers, empty, overlapping or out of order
    ranges, or one past the prompt's end (the last token must stay outside: it is the
    query's)."""
    own = _request_own(custom_params)
    if own is None or own.get("chunks") is None:
        return None
    flat = own["chunks"]
    where = f"custom_params[{REQUEST_PARAM!r}]['chunks']"
    ok = isinstance(flat, list) and len(flat) % 2 == 0 and flat
    if not ok or not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
        raise ConfigError(
            f"{where} must be a flat list of token offsets [s0, e0, s1, e1, ...], got {flat!r}"
        )
    spans = list(zip(flat[::2], flat[1::2], strict=True))
    end = 0
    for s, e in spans:
        if not end <= s < e:
            raise ConfigError(
                f"{where}: range [{s}, {e}) is empty, overlaps the one before or is out of "
                "order; give non-empty ranges in prompt order"
            )
        end = e
    if end >= prompt_tokens:
        raise ConfigError(
            f"{where}: range ending at {end} leaves no query token in a prompt of "
            f"{prompt_tokens} tokens; chunks must end before the prompt's last token"
        )
    return spans


def request_blend_ratio(custom_params: Any) -> float | None:
    """The ratio a request forces on its own blend (``blend_ratio`` of
    :data:`REQUEST_PARAM`), or None. Raises :class:`ConfigError` outside ``[0, 1]``."""
    own = _request_own(custom_params)
    ratio = None if own is None else own.get("blend_ratio")
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
        raise ConfigError(
            f"custom_params[{REQUEST_PARAM!r}]['blend_ratio'] must be a number in [0, 1], "
            f"got {ratio!r}"
        )
    return float(ratio)


def request_force(custom_params: Any, capabilities: Any) -> tuple[str, float] | None:
    """The shape a request forces through its ``custom_params`` (:data:`REQUEST_PARAM`), or
    None. Raises :class:`ConfigError` for what ``capabilities`` cannot run or a malformed
    value."""
    own = _request_own(custom_params)
    if own is None or (own.get("force_shape") is None and "force_recompute" not in own):
        return None
    where = f"custom_params[{REQUEST_PARAM!r}]"
    shape = own.get("force_shape")
    recompute = own.get("force_recompute", _DEFAULTS.force_recompute)
    if isinstance(recompute, bool) or not isinstance(recompute, int | float):
        raise ConfigError(f"{where}: force_recompute must be a number, got {recompute!r}")
    from sglang_cacheflow.planner.policies import check_forced_shape

    try:
        check_forced_shape(shape, float(recompute), capabilities)
    except ValueError as e:
        raise ConfigError(f"{where}: force_shape: {e}") from None
    return shape, float(recompute)


def check_page_size(cfg: CacheFlowConfig, page_size: int | None) -> None:
    page = page_size or 1
    if cfg.chunk_tokens % page:
        raise ConfigError(
            f"{FLAG_CONFIG}: chunk_tokens={cfg.chunk_tokens} must be a multiple of "
            f"--page-size {page} (restores split at page boundaries)"
        )
    if page == 1 and cfg.redis_url:
        logging.getLogger("sglang_cacheflow.sglang").warning(
            "%s: with SGLang's default --page-size 1 the Redis L3 holds one value per token: "
            "a restore reads one per token and layer group, and the reads' CPU slows the "
            'forwards beside them (docs/benchmarks.md, "One-token pages"); --page-size 16 '
            "stores one value per 16 tokens",
            FLAG_CONFIG,
        )
