"""Gathering a burst of arrivals before an idle scheduler starts on its first request.

SGLang's scheduler receives requests between forwards. On a GPU a forward is launched
asynchronously and the loop comes back to its socket at once; on the CPU engine the
forward runs in the scheduler's own thread, so requests sent together but delivered a few
milliseconds apart by the tokenizer are split: the first is planned and its forward runs
(hundreds of milliseconds), the others wait in the socket and are planned after it, alone
in a later round. When the scheduler is idle and a generation request arrives,
:func:`gather_burst` keeps receiving while requests keep coming (a short gap between polls,
a bounded number of polls), so that the batch-aware planner sees the burst as one round.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["gather_burst"]

_GENERATE = frozenset({"TokenizedGenerateReqInput", "BatchTokenizedGenerateReqInput"})


def _is_generate(req: Any) -> bool:
    return type(req).__name__ in _GENERATE


def gather_burst(scheduler: Any, recv_reqs: list[Any], gap_s: float, max_polls: int) -> int:
    """Extend ``recv_reqs`` in place with the requests that arrive within ``gap_s`` of each
    other (at most ``max_polls`` more receives) when ``scheduler`` is idle and ``recv_reqs``
    holds a generation request; returns how many were added.

    Every TP rank calls this with the same arguments and sees the same broadcast receives,
    so the ranks poll the same number of times (no clock decides when to stop). A
    non-generation message (an abort, a pause, a flush) ends the gathering and is left for
    the next round, after the requests received before it.
    """
    receiver = getattr(scheduler, "request_receiver", None)
    if (
        gap_s <= 0
        or receiver is None
        or not any(_is_generate(r) for r in recv_reqs)
        or not scheduler.is_fully_idle()
    ):
        return 0
    added = 0
    for _ in range(max_polls):
        time.sleep(gap_s)
        more = receiver.recv_requests()
        if not more:
            break
        if not all(_is_generate(r) for r in more):
            scheduler._deferred_input_requests.extend(more)
            break
        recv_reqs.extend(more)
        added += len(more)
    return added
