"""The served model as the planner sees it, read from SGLang's own ``ModelConfig`` of the
local model folders (and of a mixture-of-experts config, whose attention share is left to
calibration)."""

import json
from pathlib import Path
from typing import Any

import pytest

from sglang_cacheflow.models import SMALL_LLAMA_CONFIG
from sglang_cacheflow.planner import attention_ratio
from sglang_cacheflow.sglang.model import model_shape


def _model_config(folder: Path) -> Any:
    from sglang.srt.configs.model_config import ModelConfig

    return ModelConfig(str(folder))


def test_smollm2s_shape_and_attention_ratio(smollm2_path: Path) -> None:
    shape = model_shape(_model_config(smollm2_path), dtype_bytes=4, tp=1)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (30, 3, 64)
    assert shape.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4
    # 9 query heads of 64 over hidden 576, a gated MLP of 1536: about 1/3070 of a token
    assert shape.attention_ratio == pytest.approx(attention_ratio(576, 9, 3, 64, 1536))
    assert 3.2e-4 < shape.attention_ratio < 3.3e-4


def test_tp_splits_the_kv_heads_not_the_ratio(tiny_llama_path: Path) -> None:
    mc = _model_config(tiny_llama_path)
    one, two = model_shape(mc, 4, 1), model_shape(mc, 4, 2)
    assert two.kv_bytes_per_token == one.kv_bytes_per_token / 2
    assert one.attention_ratio == two.attention_ratio > 0


def test_a_mixture_of_experts_leaves_attention_to_calibration(tmp_path: Path) -> None:
    # a dense MLP's size says nothing of the experts a token goes through
    config = {
        **{k: SMALL_LLAMA_CONFIG[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "intermediate_size": 1536,
        "moe_intermediate_size": 256,
        "shared_expert_intermediate_size": 512,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = model_shape(_model_config(tmp_path), 4, 1)
    assert shape.attention_ratio == 0.0
    assert (shape.num_layers, shape.num_kv_heads) == (16, 4)
