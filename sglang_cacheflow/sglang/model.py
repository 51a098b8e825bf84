"""The served model as the planner sees it (:class:`~sglang_cacheflow.planner.ModelShape`),
read from SGLang's ``ModelConfig``: its KV layout, and the share of a token's arithmetic
that each attended pair adds (the prior of calibration's attention term)."""

from __future__ import annotations

from typing import Any

from sglang_cacheflow.planner import ModelShape, attention_ratio

# config keys of a mixture of experts, whose per-token work is not its dense MLP's
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def model_attention_ratio(model_config: Any) -> float:
    """:func:`~sglang_cacheflow.planner.attention_ratio` of a dense model with a gated MLP
    (Llama, Qwen2, Mistral...); 0 (unknown: calibration alone decides) for a mixture of
    experts or a config without a dense MLP's size."""
    cfg = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    if any(getattr(cfg, key, None) for key in _MOE_KEYS):
        return 0.0
    try:
        return attention_ratio(
            hidden=int(cfg.hidden_size),
            heads=int(cfg.num_attention_heads),
            kv_heads=int(model_config.get_total_num_kv_heads()),
            head_dim=int(model_config.head_dim),
            intermediate=int(cfg.intermediate_size),
        )
    except (AttributeError, TypeError, ValueError):
        return 0.0


def model_shape(model_config: Any, dtype_bytes: int, tp: int) -> ModelShape:
    """What the planner needs to know of SGLang's ``ModelConfig`` served at ``tp`` ranks
    with a KV cache of ``dtype_bytes`` per element."""
    return ModelShape(
        num_layers=int(model_config.num_hidden_layers),
        num_kv_heads=int(model_config.get_total_num_kv_heads()),
        head_dim=int(model_config.head_dim),
        dtype_bytes=int(dtype_bytes),
        tp=int(tp),
        attention_ratio=model_attention_ratio(model_config),
    )
