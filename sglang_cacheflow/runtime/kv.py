"""A request's KV cache on the compute device, in the tiers' page layout.

One tensor of shape ``(num_layers, 2, capacity, kv_heads, head_dim)``: layer-major and
token-major like a :class:`~sglang_cacheflow.tiers.page.PageLayout` page, so page ``p``'s
layers ``[l0, l1)`` are the view ``data[l0:l1, :, p*T:(p+1)*T]`` and a load from a host
tier is one strided copy with no reshuffling. ``capacity`` is rounded up to whole pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_cacheflow.tiers.page import PageLayout


@dataclass
class KVCache:
    """KV of one request: K and V for every layer and token position ``[0, capacity)``."""

    data: torch.Tensor  # (num_layers, 2, capacity, kv_heads, head_dim)
    page_tokens: int

    @classmethod
    def empty(
        cls,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        tokens: int,
        page_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        pages = max(1, -(-tokens // page_tokens))
        data = torch.zeros(
            (num_layers, 2, pages * page_tokens, kv_heads, head_dim), dtype=dtype, device=device
        )
        return cls(data, page_tokens)

    @property
    def num_layers(self) -> int:
        return self.data.shape[0]

    @property
    def capacity(self) -> int:
        return self.data.shape[2]

    @property
    def kv_heads(self) -> int:
        return self.data.shape[3]

    @property
    def head_dim(self) -> int:
        return self.data.shape[4]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token, all layers (this rank's heads)."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.data.element_size()

    def layout(self) -> PageLayout:
        """The page layout of this cache (what its pages look like in a tier)."""
        return PageLayout(
            num_layers=self.num_layers,
            page_tokens=self.page_tokens,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype=self.data.dtype,
        )

    def keys(self, layer: int, end: int) -> torch.Tensor:
        """Keys of tokens ``[0, end)`` at ``layer`` as ``(1, kv_heads, end, head_dim)``."""
        return self.data[layer, 0, :end].transpose(0, 1).unsqueeze(0)

    def values(self, layer: int, end: int) -> torch.Tensor:
        return self.data[layer, 1, :end].transpose(0, 1).unsqueeze(0)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` of shape ``(1, kv_heads, n, head_dim)`` at ``[start, start+n)``."""
        n = k.shape[2]
        self.data[layer, 0, start : start + n].copy_(k[0].transpose(0, 1))
        self.data[layer, 1, start : start + n].copy_(v[0].transpose(0, 1))

    def scatter(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store ``k``, ``v`` of shape ``(1, kv_heads, n, head_dim)`` at ``positions`` (n)."""
        self.data[layer, 0, positions] = k[0].transpose(0, 1).to(self.data.dtype)
        self.data[layer, 1, positions] = v[0].transpose(0, 1).to(self.data.dtype)

    def page(self, index: int, layers: tuple[int, int] | None = None) -> torch.Tensor:
        """View of page ``index`` (layers ``[l0, l1)``, default all): a tier page tensor."""
        l0, l1 = layers if layers is not None else (0, self.num_layers)
        t = self.page_tokens
        return self.data[l0:l1, :, index * t : (index + 1) * t]

    def tokens(self, start: int, end: int, layers: tuple[int, int] | None = None) -> torch.Tensor:
        """View of tokens ``[start, end)`` (layers ``[l0, l1)``, default all)."""
        l0, l1 = layers if layers is not None else (0, self.num_layers)
        return self.data[l0:l1, :, start:end]

    def clear(self, start: int, end: int | None = None) -> None:
        """Forget tokens ``[start, end)`` (fill with NaN so a missed restore cannot pass)."""
        self.data[:, :, start:end].fill_(float("nan"))
