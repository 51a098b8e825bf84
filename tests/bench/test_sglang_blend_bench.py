"""sglang-blend-bench's arithmetic: the first-token KL over the reference's top tokens."""

from __future__ import annotations

import math

import pytest

from sglang_cacheflow.bench.sglang.blend import top_kl


def test_top_kl_is_zero_for_the_same_distribution_and_grows_with_a_moved_one() -> None:
    ref = {1: math.log(0.7), 2: math.log(0.2), 3: math.log(0.1)}
    assert top_kl(ref, ref) == 0.0
    moved = {1: math.log(0.5), 2: math.log(0.4), 3: math.log(0.1)}
    want = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.4)
    assert top_kl(ref, moved) == pytest.approx(want)


def test_a_token_missing_from_the_other_top_is_taken_at_its_least_logprob() -> None:
    ref = {1: math.log(0.6), 2: math.log(0.4)}
    other = {1: math.log(0.9), 5: math.log(0.05)}  # token 2 is below 0.05 there
    want = 0.6 * math.log(0.6 / 0.9) + 0.4 * math.log(0.4 / 0.05)
    assert top_kl(ref, other) == pytest.approx(want)
