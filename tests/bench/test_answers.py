"""The "answers = ref" column compares only the turns both runs answered."""

from __future__ import annotations

from sglang_cacheflow.bench.sglang.client import Result
from sglang_cacheflow.bench.sglang.serving import Run, check_answers


def _result(turn: int, ids: list[int], error: str = "") -> Result:
    return Result("s", turn, True, 8, output_ids=ids, error=error)


def test_a_failed_request_is_not_counted_as_a_wrong_answer() -> None:
    ref = Run("recompute", None, [_result(0, [1, 2]), _result(1, [3, 4]), _result(2, [5])], {})
    got = Run(
        "load",
        None,
        [
            _result(0, [1, 2]),
            _result(1, [], "ServerDisconnectedError: Server disconnected"),
            _result(2, [6]),  # a wrong answer
        ],
        {},
    )
    check_answers([ref, got])
    assert ref.answers_match == 1.0
    assert got.answers_match == 0.5  # turns 0 and 2 compared; turn 1 failed
