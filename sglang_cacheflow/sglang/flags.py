"""``--enable-cacheflow`` and its options in SGLang: the settings they imply and the routes that
bring them in (the options' schema: :mod:`sglang_cacheflow.sglang.config`).

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
from typing import Any

from sglang_cacheflow.sglang.config import (
    FLAG_CONFIG,
    FLAG_ENABLE,
    FLAG_POLICY,
    CacheFlowConfig,
    ConfigError,
    check_page_size,
    parse_config,
)

__all__ = [
    "BACKEND_NAME",
    "ENV_CONFIG",
    "config_from_server_args",
    "implied_settings",
    "resolve_server_args",
    "rewrite_argv",
]

BACKEND_NAME = "cacheflow"
"""``--radix-cache-backend`` name of the project's radix cache (``CacheFlowRadixCache``)."""

ENV_CONFIG = "SGLANG_CACHEFLOW_CONFIG"
"""Environment variable carrying the validated configuration (JSON) to SGLang's processes."""


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
    if current.get("device") == "cpu":
        # On the CPU engine a forward runs in the scheduler's thread, so the overlap loop
        # only delays each batch's replies by the next batch's forward, which the plan
        # does not count; without it the client sees the restore the plan timed.
        out["disable_overlap_schedule"] = True
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
    current["device"] = getattr(cfg_view, "device", None) or default_device()
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
        "device": _flag_value(argv, "--device") or default_device(),
    }
    settings = implied_settings(cfg, current)
    flags = {
        "enable_hierarchical_cache": "--enable-hierarchical-cache",
        "radix_cache_backend": "--radix-cache-backend",
        "hicache_storage_backend": "--hicache-storage-backend",
        "hicache_storage_backend_extra_config": "--hicache-storage-backend-extra-config",
        "hicache_storage_prefetch_policy": "--hicache-storage-prefetch-policy",
        "disable_overlap_schedule": "--disable-overlap-schedule",
    }
    aliases = {"--enable-hierarchical-cache": "--enable-hicache"}
    for name, value in settings.items():
        flag = flags[name]
        if value is True:
            if flag not in argv and aliases.get(flag, flag) not in argv:
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


def default_device() -> str:
    """The device SGLang picks when ``--device`` is not given (CUDA when torch sees one)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def config_from_server_args(server_args: Any) -> CacheFlowConfig:
    """The configuration a scheduler process runs with: the native fields if SGLang has them
    and they are set, else :data:`ENV_CONFIG`, else the defaults; resolved for the server's
    device."""
    device = getattr(server_args, "device", None) or default_device()
    overlap = getattr(server_args, "disable_overlap_schedule", None)
    overlap = None if overlap is None else not overlap
    if getattr(server_args, "enable_cacheflow", False):
        cfg = parse_config(
            getattr(server_args, "cacheflow_policy", None),
            getattr(server_args, "cacheflow_config", None),
        )
    elif text := os.environ.get(ENV_CONFIG):
        cfg = CacheFlowConfig.from_json(text)
    else:
        cfg = parse_config(None, None)
    return cfg.for_device(device, overlap)
