"""``--enable-cacheflow`` and its options: parsing, validation, and the SGLang flags they imply.

Two routes lead here:

- **native** (after ``sglang-cacheflow patch-sglang``): SGLang's ``ServerArgs`` has the fields
  ``enable_cacheflow``, ``cacheflow_policy`` and ``cacheflow_config``; the patched resolution
  pipeline calls :func:`resolve_server_args`, which validates them and declares the SGLang
  settings they imply (works for ``launch_server``, ``sglang serve`` and ``sglang.Engine``);
- **plugin** (unpatched SGLang): the plugin entry point runs in the launcher before SGLang
  parses ``sys.argv``; :func:`rewrite_argv` takes the project's flags out of the command line,
  validates them, replaces them with the SGLang flags they imply and hands the configuration
  to the scheduler processes in the environment variable :data:`ENV_CONFIG`.

Either way the scheduler reads the configuration with :func:`config_from_server_args`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sglang_cacheflow.planner.policies import POLICIES
from sglang_cacheflow.tiers.names import HOST_TIER, L3_TIER

__all__ = [
    "BACKEND_NAME",
    "ENV_CONFIG",
    "POLICY_CHOICES",
    "CacheFlowConfig",
    "ConfigError",
    "config_from_server_args",
    "implied_settings",
    "parse_config",
    "resolve_server_args",
    "rewrite_argv",
]

BACKEND_NAME = "cacheflow"
"""``--radix-cache-backend`` name of the project's radix cache (``CacheFlowRadixCache``)."""

STORAGE_MODULE = "sglang_cacheflow.sglang.l3"
STORAGE_CLASS = "CacheFlowRedisStorage"

ENV_CONFIG = "SGLANG_CACHEFLOW_CONFIG"
"""Environment variable carrying the validated configuration (JSON) to SGLang's processes."""

POLICY_CHOICES = POLICIES  # the names the patch lists too (tests/sglang/test_patch.py)

FLAG_ENABLE = "--enable-cacheflow"
FLAG_POLICY = "--cacheflow-policy"
FLAG_CONFIG = "--cacheflow-config"

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


_CONFIG_KEYS = {
    "redis_url": (str, type(None)),
    "link": (str, type(None)),
    "redis": (dict,),
    "chunk_tokens": (int,),
    "prior": (dict,),
    "calibrate": (bool,),
    "max_round_requests": (int,),
    "log_decisions": (bool,),
    "split_wait_s": (int, float),
    "force_shape": (str, type(None)),
    "force_recompute": (int, float),
}


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
        schemes = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
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
    if data.get("chunk_tokens", 64) < 1:
        raise ConfigError(f"{FLAG_CONFIG}: chunk_tokens must be >= 1, got {data['chunk_tokens']}")
    if data.get("max_round_requests", 64) < 1:
        raise ConfigError(
            f"{FLAG_CONFIG}: max_round_requests must be >= 1, got {data['max_round_requests']}"
        )
    if data.get("split_wait_s", 1.0) <= 0:
        raise ConfigError(f"{FLAG_CONFIG}: split_wait_s must be > 0, got {data['split_wait_s']}")
    if data.get("force_shape") is not None:
        from sglang_cacheflow.planner.policies import check_forced_shape
        from sglang_cacheflow.sglang.capabilities import SGLANG

        try:
            check_forced_shape(data["force_shape"], data.get("force_recompute", 0.5), SGLANG)
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
    return CacheFlowConfig(
        policy=policy,
        redis_url=url,
        link=link,
        redis=dict(data.get("redis", {})),
        chunk_tokens=int(data.get("chunk_tokens", 64)),
        prior=prior,
        calibrate=bool(data.get("calibrate", True)),
        max_round_requests=int(data.get("max_round_requests", 64)),
        log_decisions=bool(data.get("log_decisions", False)),
        split_wait_s=float(data.get("split_wait_s", 30.0)),
        force_shape=data.get("force_shape"),
        force_recompute=float(data.get("force_recompute", 0.5)),
    )


def check_page_size(cfg: CacheFlowConfig, page_size: int | None) -> None:
    page = page_size or 1
    if cfg.chunk_tokens % page:
        raise ConfigError(
            f"{FLAG_CONFIG}: chunk_tokens={cfg.chunk_tokens} must be a multiple of "
            f"--page-size {page} (restores split at page boundaries)"
        )


def implied_settings(cfg: CacheFlowConfig, current: Mapping[str, Any]) -> dict[str, Any]:
    """SGLang settings ``--enable-cacheflow`` implies, given the ``current`` ones (field name
    -> value). Raises :class:`ConfigError` when the user set a conflicting one."""
    if current.get("disable_radix_cache"):
        raise ConfigError(f"{FLAG_ENABLE} restores cached prefixes; drop --disable-radix-cache")
    backend = current.get("radix_cache_backend")
    if backend not in (None, BACKEND_NAME):
        raise ConfigError(
            f"{FLAG_ENABLE} selects --radix-cache-backend {BACKEND_NAME}; drop "
            f"--radix-cache-backend {backend}"
        )
    out: dict[str, Any] = {"enable_hierarchical_cache": True, "radix_cache_backend": BACKEND_NAME}
    if cfg.redis_url is not None:
        storage = current.get("hicache_storage_backend")
        if storage is not None:
            raise ConfigError(
                f"{FLAG_CONFIG} names a Redis tier (redis_url), which is the L3 backend; drop "
                f"--hicache-storage-backend {storage}"
            )
        out["hicache_storage_backend"] = "dynamic"
        out["hicache_storage_backend_extra_config"] = json.dumps(cfg.storage_extra_config())
        if current.get("hicache_storage_prefetch_policy") is None:
            # The planner decides how much to prefetch; the scheduler waits for that much.
            out["hicache_storage_prefetch_policy"] = "wait_complete"
    return out


# -- native route -------------------------------------------------------------------------


def resolve_server_args(server_args: Any) -> None:
    """Patched SGLang's resolution step for ``--enable-cacheflow`` (see the module doc)."""
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    cfg_view = resolving_view(server_args)
    if not getattr(cfg_view, "enable_cacheflow", False):
        return
    cfg = parse_config(
        getattr(cfg_view, "cacheflow_policy", None), getattr(cfg_view, "cacheflow_config", None)
    )
    check_page_size(cfg, getattr(cfg_view, "page_size", None))
    names = (
        "disable_radix_cache",
        "radix_cache_backend",
        "hicache_storage_backend",
        "hicache_storage_prefetch_policy",
    )
    current = {n: getattr(cfg_view, n, None) for n in names}
    if current["hicache_storage_prefetch_policy"] == "timeout":  # SGLang's default
        current["hicache_storage_prefetch_policy"] = None
    settings = implied_settings(cfg, current)
    declare_resolution(server_args, "handle_cacheflow", **settings)
    os.environ[ENV_CONFIG] = cfg.to_json()


# -- plugin route -------------------------------------------------------------------------


def sglang_has_native_flags() -> bool:
    """Whether the installed SGLang carries the patch (``ServerArgs`` has the fields)."""
    try:
        from sglang.srt.arg_groups.fields.memory import Memory
    except ImportError:
        return False
    return "enable_cacheflow" in getattr(Memory, "__struct_fields__", ())


def _take(argv: list[str], flag: str, *, takes_value: bool) -> tuple[bool, str | None]:
    """Remove every ``flag`` (``flag VALUE`` or ``flag=VALUE``) from argv; the last value."""
    found, value = False, None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == flag:
            found = True
            del argv[i]
            if takes_value:
                if i >= len(argv):
                    raise ConfigError(f"{flag} needs a value")
                value = argv.pop(i)
            continue
        if takes_value and arg.startswith(flag + "="):
            found, value = True, arg.split("=", 1)[1]
            del argv[i]
            continue
        i += 1
    return found, value


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def rewrite_argv(argv: list[str]) -> CacheFlowConfig | None:
    """Plugin route: replace the project's flags in ``argv`` (in place) by what they imply.

    Returns the configuration, or None when ``--enable-cacheflow`` is absent (then the
    project's other flags are an error). Sets :data:`ENV_CONFIG` for SGLang's processes.
    """
    enabled, _ = _take(argv, FLAG_ENABLE, takes_value=False)
    has_policy, policy = _take(argv, FLAG_POLICY, takes_value=True)
    has_config, config = _take(argv, FLAG_CONFIG, takes_value=True)
    if not enabled:
        if has_policy or has_config:
            raise ConfigError(f"{FLAG_POLICY} and {FLAG_CONFIG} need {FLAG_ENABLE}")
        return None
    cfg = parse_config(policy, config)
    page = _flag_value(argv, "--page-size")
    check_page_size(cfg, int(page) if page and page.isdigit() else None)
    current: dict[str, Any] = {
        "disable_radix_cache": "--disable-radix-cache" in argv,
        "radix_cache_backend": _flag_value(argv, "--radix-cache-backend"),
        "hicache_storage_backend": _flag_value(argv, "--hicache-storage-backend"),
        "hicache_storage_prefetch_policy": _flag_value(argv, "--hicache-storage-prefetch-policy"),
    }
    settings = implied_settings(cfg, current)
    flags = {
        "enable_hierarchical_cache": "--enable-hierarchical-cache",
        "radix_cache_backend": "--radix-cache-backend",
        "hicache_storage_backend": "--hicache-storage-backend",
        "hicache_storage_backend_extra_config": "--hicache-storage-backend-extra-config",
        "hicache_storage_prefetch_policy": "--hicache-storage-prefetch-policy",
    }
    for name, value in settings.items():
        flag = flags[name]
        if value is True:
            if flag not in argv and "--enable-hicache" not in argv:
                argv.append(flag)
        elif _flag_value(argv, flag) != value:
            argv += [flag, str(value)]
    os.environ[ENV_CONFIG] = cfg.to_json()
    return cfg


def handle_launcher_argv() -> None:
    """Run :func:`rewrite_argv` on ``sys.argv`` unless SGLang parses the flags natively; on
    bad input print the error and exit 2, as argparse does."""
    if FLAG_ENABLE not in sys.argv and not any(
        a.startswith((FLAG_POLICY, FLAG_CONFIG)) for a in sys.argv
    ):
        return
    if sglang_has_native_flags():
        return
    try:
        rewrite_argv(sys.argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# -- scheduler side -----------------------------------------------------------------------


def config_from_server_args(server_args: Any) -> CacheFlowConfig:
    """The configuration a scheduler process runs with: the native fields if SGLang has them
    and they are set, else :data:`ENV_CONFIG`, else the defaults."""
    if getattr(server_args, "enable_cacheflow", False):
        return parse_config(
            getattr(server_args, "cacheflow_policy", None),
            getattr(server_args, "cacheflow_config", None),
        )
    text = os.environ.get(ENV_CONFIG)
    if text:
        return CacheFlowConfig.from_json(text)
    return parse_config(None, None)
