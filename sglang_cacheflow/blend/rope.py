"""RoPE fix-up: move reused keys to a new position.

A key stored at position ``p`` carries the rotation ``R(p * inv_freq)``; rotating it by
``R(delta * inv_freq)`` gives the key a computation at ``p + delta`` would have produced
(rotations compose), so a chunk's KV computed at one offset is usable at another without a
forward. Values carry no position. The model's own rotary module gives ``inv_freq`` (with
its scaling, e.g. Llama-3's, already applied); the rotation is done without the module's
``attention_scaling`` factor, which the stored key already carries. RoPE variants whose
frequencies depend on the sequence length cannot be moved this way and are refused.
"""

from __future__ import annotations

import torch
from torch import nn

# rope_type values whose inv_freq changes with the sequence length at run time
LENGTH_DEPENDENT = ("dynamic", "longrope")


def rope_type(config: object) -> str:
    """The model's RoPE variant (``default`` when the config names none)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not params:
        return "default"
    return str(params.get("rope_type", params.get("type", "default")))


def check_movable(config: object) -> None:
    """Refuse models whose keys cannot be moved by a fixed rotation."""
    kind = rope_type(config)
    if kind in LENGTH_DEPENDENT:
        raise ValueError(
            f"chunk reuse needs RoPE frequencies that do not depend on the sequence length; "
            f"this model uses rope_type={kind!r}. Use a model with default, linear, llama3 or "
            "yarn RoPE, or restore its chunks by recompute"
        )


class KeyRotator:
    """Rotates keys laid out as ``(..., tokens, kv_heads, head_dim)`` by per-token deltas."""

    def __init__(self, rotary_emb: nn.Module, config: object) -> None:
        check_movable(config)
        # float64 angles: the delta's rounding must not add to what the stored key has
        self.inv_freq = rotary_emb.inv_freq.detach().to(torch.float64).cpu()

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor | int) -> torch.Tensor:
        """``keys`` rotated by ``delta`` positions (an int, or one per token: shape
        ``(tokens,)``); computed in fp32 or wider, returned in the keys' dtype."""
        delta_t = torch.as_tensor(delta, dtype=torch.float64).reshape(-1)
        angles = delta_t[:, None] * self.inv_freq[None, :]  # (tokens or 1, head_dim/2)
        work = torch.promote_types(keys.dtype, torch.float32)
        cos = angles.cos().to(device=keys.device, dtype=work).repeat(1, 2)[:, None, :]
        sin = angles.sin().to(device=keys.device, dtype=work).repeat(1, 2)[:, None, :]
        k = keys.to(work)
        half = k.shape[-1] // 2
        rotated_half = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
        return (k * cos + rotated_half * sin).to(keys.dtype)
