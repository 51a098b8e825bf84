"""When SGLang can admit requests the device KV pool cannot hold yet.

SGLang admits a prefill only if the pool has room for its new tokens and its decode budget,
counting what the running requests may still decode (``PrefillAdder``'s token budget); if
not, the request waits while the running requests decode, until enough of them finish and
leave their KV to the tree, where it can be evicted. Under a multi-turn load a restore
waited up to 1.2 s so, behind decode steps no plan counted. This module predicts how many
decode steps that is, from the scheduler's state; the controller charges them to the compute
the round's restores wait behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# SGLang's cap on the decode budget counted per request (schedule_policy.CLIP_MAX_NEW_TOKENS)
_CLIP = int(os.environ.get("SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION", "4096"))


@dataclass(frozen=True)
class Running:
    """A request decoding in the running batch."""

    held: int  # tokens of KV it holds, evictable once it finishes
    steps_left: int  # decode steps until its ``max_new_tokens`` are out
    reserved: float  # tokens SGLang's budget keeps for what it may still decode


def steps_until_room(free: float, need: float, running: Sequence[Running]) -> int:
    """Decode steps until a pool with ``free`` tokens (by SGLang's count) has room for
    ``need``, as the running requests finish one after another (all of them at most)."""
    if need <= free:
        return 0
    for r in sorted(running, key=lambda r: r.steps_left):
        free += r.held + r.reserved
        if free >= need:
            return r.steps_left
    return max((r.steps_left for r in running), default=0)


def decode_budget(req: Any) -> int:
    """Tokens SGLang's admission reserves for ``req``'s decode (its remaining new tokens)."""
    left = req.sampling_params.max_new_tokens - len(req.output_ids)
    return min(max(left, 0), _CLIP)


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


def admission_steps(scheduler: Any, needs: Iterable[int]) -> int:
    """Decode steps before requests needing ``needs`` tokens each (new tokens plus decode
    budget) can all be admitted."""
    free, running = pool_state(scheduler)
    return steps_until_room(free, float(sum(needs)), running)
