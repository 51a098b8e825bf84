"""Torch bodies of the ``sgl_kernel`` functions SGLang's CUDA path imports.

Each keeps the CUDA op's signature and effect (``sgl-kernel/python/sgl_kernel``):
the activations and norms write into ``out`` (or into ``input`` for the fused
residual norms, which also update ``residual``), the renormalisations return new
probabilities. Norms compute in fp32 and cast back, as the kernels do. Launch
hints (``enable_pdl``) are accepted and ignored. They run on any device, which is
how the CPU tests check them against plain torch references.

Any other top-level or submodule name resolves to :func:`unavailable`: importing
it works (SGLang imports many names it only calls on paths this setup avoids),
calling it raises an error that names it and the flag that avoids it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``result``, written into ``out`` when the caller gave one (the kernels' convention)."""
    if out is None:
        return result
    return out.copy_(result)


def _act_and_mul(
    act: Callable[[torch.Tensor], torch.Tensor], input: torch.Tensor, out: torch.Tensor | None
) -> torch.Tensor:
    d = input.shape[-1] // 2
    return _into(act(input[..., :d]) * input[..., d:], out)


def silu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]``."""
    return _act_and_mul(F.silu, input, out)


def gelu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
    """``gelu(x[..., :d]) * x[..., d:]`` (erf form)."""
    return _act_and_mul(F.gelu, input, out)


def gelu_tanh_and_mul(
    input: torch.Tensor, out: torch.Tensor | None = None, **_: Any
) -> torch.Tensor:
    """``gelu(x[..., :d], approximate="tanh") * x[..., d:]``."""
    return _act_and_mul(lambda x: F.gelu(x, approximate="tanh"), input, out)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, *, gemma: bool) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float() + 1.0 if gemma else weight.float()
    return (normed * w).to(x.dtype)


def rmsnorm(
    input: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    enable_pdl: bool | None = None,
) -> torch.Tensor:
    """``x / rms(x) * weight``."""
    return _into(_rms(input, weight, eps, gemma=False), out)


def fused_add_rmsnorm(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    enable_pdl: bool | None = None,
) -> None:
    """In place: ``residual += input``, then ``input = rmsnorm(residual)``."""
    residual.add_(input)
    input.copy_(_rms(residual, weight, eps, gemma=False))


def gemma_rmsnorm(
    input: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    enable_pdl: bool | None = None,
) -> torch.Tensor:
    """``x / rms(x) * (1 + weight)``."""
    return _into(_rms(input, weight, eps, gemma=True), out)


def gemma_fused_add_rmsnorm(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    enable_pdl: bool | None = None,
) -> None:
    """In place: ``residual += input``, then ``input = gemma_rmsnorm(residual)``."""
    residual.add_(input)
    input.copy_(_rms(residual, weight, eps, gemma=True))


def _per_row(value: torch.Tensor | float | int, rows: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).to(device).expand(rows) if value.numel() == 1 else value.to(device)
    return torch.full((rows,), value, device=device)


def top_k_renorm_prob(probs: torch.Tensor, top_k: torch.Tensor | int) -> torch.Tensor:
    """Keep each row's ``top_k`` largest probabilities (ties at the k-th kept), renormalise."""
    k = _per_row(top_k, probs.shape[0], probs.device).long().clamp(1, probs.shape[-1])
    sorted_probs = probs.sort(dim=-1, descending=True).values
    kth = sorted_probs.gather(-1, (k - 1).unsqueeze(-1))
    kept = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    return kept / kept.sum(-1, keepdim=True)


def top_p_renorm_prob(probs: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Keep the smallest set of largest probabilities whose sum reaches ``top_p``, renormalise."""
    p = _per_row(top_p, probs.shape[0], probs.device).to(probs.dtype).unsqueeze(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each entry
    keep_sorted = before < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum(-1, keepdim=True)


def is_arch_support_pdl() -> bool:
    """Programmatic dependent launch needs the real kernels: never."""
    return False


def unavailable(name: str) -> Callable[..., Any]:
    """A stand-in for ``sgl_kernel.<name>`` that says, when called, what to change."""

    def _raise(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: SGLang runs on CUDA without sgl_kernel "
            "(sglang-cacheflow's torch stand-ins). Run with SGLANG_FORCE_FUSED_OP_BACKEND=torch, "
            "--attention-backend triton, --sampling-backend pytorch and "
            "--hicache-io-backend direct, or install the sgl-kernel wheel built for this torch."
        )

    _raise.__name__ = name.rsplit(".", 1)[-1]
    _raise.__qualname__ = _raise.__name__
    return _raise


KERNEL_FUNCTIONS: dict[str, Callable[..., Any]] = {
    fn.__name__: fn
    for fn in (
        silu_and_mul,
        gelu_and_mul,
        gelu_tanh_and_mul,
        rmsnorm,
        fused_add_rmsnorm,
        gemma_rmsnorm,
        gemma_fused_add_rmsnorm,
        top_k_renorm_prob,
        top_p_renorm_prob,
    )
}
"""Top-level ``sgl_kernel`` names with torch bodies."""

UTILS_FUNCTIONS: dict[str, Callable[..., Any]] = {"is_arch_support_pdl": is_arch_support_pdl}
"""``sgl_kernel.utils`` names with bodies."""
