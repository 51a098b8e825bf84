"""Which reused tokens to recompute: the three choices, one interface (top ``k`` by a score).

- offline (CacheTune): a score computed once, when the chunk is stored; the store keeps the
  tokens in score order, so the choice costs nothing at reuse and the chosen tokens' KV is
  never read. Two scorers: :func:`probe_scores` (how much each token's KV moves when the
  chunk follows another text: the deviation the online choice measures, estimated offline)
  and :func:`spectral_scores` (CacheTune's low-frequency energy of the layer-0 values);
- online (CacheBlend): at reuse, the tokens whose keys at an early layer deviate most from
  the reused ones (:func:`key_deviation`); needs a full forward of that layer and every
  reused token's KV;
- random: the baseline at the same ratio.
"""

from __future__ import annotations

import torch

LOW_SHARE = 0.25  # share of the spectrum counted as low frequency (CacheTune's scripts)


def spectral_scores(values: torch.Tensor, low_share: float = LOW_SHARE) -> torch.Tensor:
    """Per-token score from a chunk's layer-0 values ``(tokens, kv_heads, head_dim)``.

    Each value channel is a signal over the chunk's tokens; its low-frequency part (the
    lowest ``low_share`` of the rFFT bins, the channel's mean removed) is what the chunk
    carries smoothly from token to token. A token scores by the energy of that part at its
    position. Measured on SmolLM2 (docs/benchmarks.md), these tokens repair more of what
    computing the chunk alone got wrong than random ones do, and less than
    :func:`probe_scores`' tokens.
    """
    n = values.shape[0]
    x = values.reshape(n, -1).to(torch.float32)
    x = x - x.mean(dim=0, keepdim=True)
    spectrum = torch.fft.rfft(x, dim=0)
    keep = max(1, round(low_share * spectrum.shape[0]))
    spectrum[keep:] = 0
    low = torch.fft.irfft(spectrum, n=n, dim=0)
    return (low**2).sum(dim=1)


def probe_scores(alone: torch.Tensor, probed: torch.Tensor) -> torch.Tensor:
    """Per-token score from a chunk's KV computed alone and after a probe text, both
    ``(num_layers, 2, tokens, kv_heads, head_dim)`` with the probed keys moved back to the
    alone positions: the distance between the two, K and V, summed over the layers."""
    layers, _, n = alone.shape[:3]
    diff = (probed.float() - alone.float()).reshape(layers, 2, n, -1)
    return diff.norm(dim=-1).sum(dim=(0, 1))


def key_deviation(fresh: torch.Tensor, reused: torch.Tensor) -> torch.Tensor:
    """Per-token L2 distance between fresh and reused keys ``(tokens, kv_heads, head_dim)``."""
    return (fresh.float() - reused.float()).reshape(fresh.shape[0], -1).norm(dim=1)


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, sorted by index."""
    k = max(0, min(int(k), scores.numel()))
    return torch.sort(torch.topk(scores, k).indices).values


def random_choice(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` of ``n`` indices uniformly at random, sorted."""
    return torch.sort(torch.randperm(n, generator=generator)[: max(0, min(k, n))]).values
