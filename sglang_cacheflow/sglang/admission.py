"""When SGLang can admit requests the device KV pool cannot hold yet.

SGLang admits a prefill only if the pool has room for its new tokens and its decode budget,
counting what the running requests may still decode (``PrefillAdder``'s token budget); if
not, the request waits while the running requests decode, until enough of them finish and
leave their KV to the tree, where it can be evicted. Under a multi-turn load a restore
waited up to 1.2 s so, behind decode steps no plan counted. This module replays that, from
the scheduler's state: the queue admitted in order as room comes, the running requests'
decode steps in between; the controller charges the time to the compute the round's
restores wait behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Running:
    """A request decoding in the running batch."""

    held: int  # tokens of KV it holds, evictable once it finishes
    steps_left: int  # decode steps until its ``max_new_tokens`` are out
    reserved: float  # tokens SGLang's budget keeps for what it may still decode


@dataclass(frozen=True)
class Waiting:
    """A request in SGLang's waiting queue."""

    tokens: int  # tokens its prefill puts in the pool
    budget: int  # its decode budget: reserved at admission, decode steps until it finishes
    prefill_s: float = 0.0  # compute its prefill takes (0 where it is counted elsewhere)


def wait_s(
    free: float, running: Sequence[Running], queue: Sequence[Waiting], step_s: float
) -> float:
    """Compute seconds before the last request of ``queue`` is admitted: SGLang admits the
    queue in order while the pool (``free`` tokens by its count) has room for a request's
    tokens and budget, and runs a decode step of the running requests when it has not; a
    request that finishes leaves its KV to the tree, evictable. The prefills of the
    requests admitted before the last count; the last one's own does not."""
    live = [[r.held + r.reserved, r.steps_left] for r in running]
    t = 0.0
    for i, w in enumerate(queue):
        need = w.tokens + w.budget
        while need > free and live:  # a decode step; the requests it finishes leave room
            t += step_s
            for r in live:
                r[1] -= 1
            free += sum(r[0] for r in live if r[1] <= 0)
            live = [r for r in live if r[1] > 0]
        if i == len(queue) - 1:
            break
        # admitted (or, with nothing left to finish, SGLang evicts or retracts: admitted too)
        free -= need
        t += w.prefill_s
        if w.budget > 0:
            live.append([float(need), w.budget])
    return t


def decode_budget(req: Any) -> int:
    """Tokens SGLang's admission reserves for ``req``'s decode (its remaining new tokens,
    capped as SGLang caps them)."""
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

    left = req.sampling_params.max_new_tokens - len(req.output_ids)
    return min(max(left, 0), CLIP_MAX_NEW_TOKENS)


def prefill_tokens(req: Any) -> int:
    """Tokens a queued ``req`` prefills: its input and output so far, beyond its device
    prefix."""
    return len(req.origin_input_ids) + len(req.output_ids) - req.prefix_len


def running_requests(scheduler: Any) -> list[Any]:
    """The requests that decode next: the running batch, and the last forward's prefills
    when they are not merged into it yet (a new arrival is planned before the merge)."""
    reqs = list(scheduler.running_batch.reqs)
    last = getattr(scheduler, "last_batch", None)
    if last is not None and last.forward_mode.is_extend():
        seen = {r.rid for r in reqs}
        chunked = getattr(scheduler, "chunked_req", None)
        reqs += [r for r in last.reqs if r.rid not in seen and r is not chunked]
    return [r for r in reqs if not r.finished()]


def pool_state(scheduler: Any) -> tuple[float, list[Running]]:
    """Free tokens as SGLang's admission counts them (free slots plus evictable tree, less
    the running requests' decode budgets) and the running requests."""
    ratio = float(scheduler.new_token_ratio_tracker.current)
    running = []
    for req in running_requests(scheduler):
        budget = decode_budget(req)
        reserved = budget * (1.0 if req.sampling_params.ignore_eos else ratio)
        held = len(req.origin_input_ids) + len(req.output_ids)
        running.append(Running(held, budget, reserved))
    free = scheduler.token_to_kv_pool_allocator.available_size()
    free += scheduler.tree_cache.evictable_size()
    return free - sum(r.reserved for r in running), running
