"""The ``sgl_kernel`` torch stand-ins for CUDA against plain torch references (on CPU).

fp32 results must match the references to float rounding; bf16 results are the fp32
computation rounded once, so they match the reference rounded once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_cacheflow.sglang.cuda import kernels

SHAPES = st.tuples(st.integers(1, 5), st.integers(1, 48))


def _rms_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), w.float(), eps)


@settings(max_examples=30, deadline=None)
@given(SHAPES, st.sampled_from(["silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul"]))
def test_activations_match_torch(shape: tuple[int, int], name: str) -> None:
    rows, d = shape
    x = torch.randn(rows, 2 * d, generator=torch.Generator().manual_seed(rows * 100 + d))
    act = {
        "silu_and_mul": F.silu,
        "gelu_and_mul": F.gelu,
        "gelu_tanh_and_mul": lambda t: F.gelu(t, approximate="tanh"),
    }[name]
    expected = act(x[:, :d]) * x[:, d:]
    out = torch.full((rows, d), float("nan"))
    returned = getattr(kernels, name)(x, out)
    assert returned is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(getattr(kernels, name)(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemma", [False, True])
def test_norms_match_torch(dtype: torch.dtype, gemma: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(7, 64, generator=g) * 3).to(dtype)
    w = torch.randn(64, generator=g).to(dtype)
    eps = 1e-6
    expected = _rms_reference(x, w.float() + 1 if gemma else w, eps)
    norm = kernels.gemma_rmsnorm if gemma else kernels.rmsnorm
    tol = 1e-6 if dtype == torch.float32 else 2**-7  # bf16: one rounding of the fp32 value
    torch.testing.assert_close(norm(x, w, eps).float(), expected, rtol=tol, atol=1e-6)
    out = torch.empty_like(x)
    assert norm(x, w, eps, out=out, enable_pdl=False) is out
    assert torch.equal(out, norm(x, w, eps))


@pytest.mark.parametrize("gemma", [False, True])
def test_fused_add_norms_update_both_tensors(gemma: bool) -> None:
    g = torch.Generator().manual_seed(2)
    x, residual = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g)
    w = torch.randn(32, generator=g)
    total = x + residual
    fused = kernels.gemma_fused_add_rmsnorm if gemma else kernels.fused_add_rmsnorm
    assert fused(x, residual, w, 1e-5) is None
    torch.testing.assert_close(residual, total, rtol=0, atol=0)
    torch.testing.assert_close(x, _rms_reference(total, w + 1 if gemma else w, 1e-5))


def _top_k_reference(p: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[p.topk(k).indices] = True
    kept = torch.where(keep, p, 0.0)
    return kept / kept.sum()


def _top_p_reference(p: torch.Tensor, top_p: float) -> torch.Tensor:
    order = p.argsort(descending=True)
    kept, mass = torch.zeros_like(p), 0.0
    for i in order.tolist():  # largest first, until the kept mass reaches top_p
        if mass >= top_p:
            break
        kept[i], mass = p[i], mass + float(p[i])
    return kept / kept.sum()


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(1, 40), st.floats(0.05, 1.0), st.integers(0, 10**6))
def test_renormalisations_match_references(vocab: int, k: int, top_p: float, seed: int) -> None:
    k = min(k, vocab)
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(3, vocab, generator=g, dtype=torch.float64), -1)
    by_row = kernels.top_k_renorm_prob(probs, torch.tensor([k, k, k]))
    scalar = kernels.top_k_renorm_prob(probs, k)
    p_rows = kernels.top_p_renorm_prob(probs, torch.full((3,), top_p, dtype=torch.float64))
    for i in range(3):
        torch.testing.assert_close(by_row[i], _top_k_reference(probs[i], k))
        torch.testing.assert_close(p_rows[i], _top_p_reference(probs[i], top_p))
    torch.testing.assert_close(scalar, by_row)


def test_pdl_is_never_claimed() -> None:
    assert kernels.is_arch_support_pdl() is False


def test_an_unavailable_op_names_itself_and_the_way_around() -> None:
    op = kernels.unavailable("kvcacheio.transfer_kv_per_layer")
    with pytest.raises(NotImplementedError, match=r"sgl_kernel\.kvcacheio\.transfer_kv_per_layer"):
        op(1, 2)
    with pytest.raises(NotImplementedError, match="--hicache-io-backend direct"):
        op()
