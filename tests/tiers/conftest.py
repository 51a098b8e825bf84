"""Fixtures of the tier tests."""

from __future__ import annotations

import pytest
import torch

from sglang_cacheflow.tiers import PageLayout


@pytest.fixture
def small_layout() -> PageLayout:
    """7 layers of 16 tokens x 2 heads x 8 dims (bf16): 1 KiB per layer, odd layer count."""
    return PageLayout(num_layers=7, page_tokens=16, kv_heads=2, head_dim=8, dtype=torch.bfloat16)
