"""Small random fp32 models and a restore set-up shared by the runtime tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sglang_cacheflow.planner import CostModel
from sglang_cacheflow.runtime import Executor, ModelAdapter
from sglang_cacheflow.runtime.workload import balanced_cost
from sglang_cacheflow.tiers import HostTier, KVTier

VOCAB = 256
SMALL = {
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,  # GQA
    "head_dim": 16,
    "vocab_size": VOCAB,
    "max_position_embeddings": 4096,
    "initializer_range": 0.1,
}


def random_model(family: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A random-weight fp32 Llama or Qwen2 (Qwen2 has q/k/v biases)."""
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    config = config_cls(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    if family == "qwen2":  # random biases, so a bias handled wrongly shows
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.1)
    return model


def make_executor(
    model: torch.nn.Module,
    tiers: dict[str, KVTier] | None = None,
    page_tokens: int = 16,
    cost: CostModel | None = None,
    **options: object,
) -> Executor:
    adapter = ModelAdapter(model)
    tiers = tiers if tiers is not None else {"host": HostTier(1 << 28)}
    cost = cost or balanced_cost(adapter, 2e4, list(tiers))
    options.setdefault("calibrate", False)
    return Executor.for_model(adapter, tiers, f"test-{model.config.model_type}", cost,
                              page_tokens=page_tokens, **options)  # fmt: skip


def logprob_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((torch.log_softmax(a.float(), -1) - torch.log_softmax(b.float(), -1)).abs().max())


def kv_diff(got: torch.Tensor, want: torch.Tensor, end: int) -> float:
    return float((got[:, :, :end].float() - want[:, :, :end].float()).abs().max())
