"""Core shares of the ranks of a CPU server (``sglang_cacheflow.sglang.cpu.parallel``); the binding
itself runs in the ``--tp 2`` server tests (tests/sglang/test_tp_server.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_cacheflow.sglang.cpu.parallel import (
    default_binding,
    format_cores,
    parse_cores,
    split_cores,
)


def test_two_ranks_on_two_cores_get_one_each() -> None:
    assert default_binding(2, [0, 1]) == "0|1"
    assert default_binding(2, [0, 1, 2, 3, 4]) == "0-2|3-4"
    assert default_binding(4, [0, 1]) == "0|1|0|1"  # more ranks than cores: shared in turn


@given(
    cores=st.sets(st.integers(0, 255), min_size=1, max_size=64),
    ranks=st.integers(1, 16),
)
def test_shares_cover_the_cores_evenly(cores: set[int], ranks: int) -> None:
    shares = split_cores(sorted(cores), ranks)
    assert len(shares) == ranks and all(shares)
    if ranks <= len(cores):
        assert sorted(c for s in shares for c in s) == sorted(cores)  # each core once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    else:
        assert {c for s in shares for c in s} == cores
    for share in shares:
        assert parse_cores(format_cores(share)) == share


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        split_cores([0, 1], 0)
    with pytest.raises(ValueError):
        split_cores([], 2)
    with pytest.raises(ValueError):
        parse_cores("0-x")
