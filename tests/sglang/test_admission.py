"""Decode steps a request waits for when the device pool cannot hold it yet, and the
restore plan that counts them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from sglang_cacheflow.sglang.admission import Running, Waiting, pool_state, wait_s
from tests.sglang.test_controller import _call, _controller


def test_room_comes_as_the_running_requests_finish_soonest_first() -> None:
    running = [Running(600, 7, 3.5), Running(300, 2, 1.0), Running(500, 4, 2.0)]

    def steps(free: float, need: int) -> float:
        return wait_s(free, running, [Waiting(need, 0)], 1.0)

    assert steps(400, 400) == 0  # room now
    assert steps(100, 400) == 2  # the 2-step one frees 301
    assert steps(100, 402) == 4  # then the 4-step one's 502
    assert steps(100, 1500) == 7
    assert steps(100, 10_000) == 7  # all finish: no more to wait for
    assert wait_s(0, [], [Waiting(10, 0)], 1.0) == 0


def test_a_queue_ahead_is_admitted_in_order_and_decodes_before_room_comes() -> None:
    # 1000 free; two requests ahead need 700 each (600 tokens, 100 decode steps), the last
    # one 500: the first is admitted at once, the second waits for the first's 100 steps,
    # the last for the second's
    queue = [Waiting(600, 100, 0.5), Waiting(600, 100, 0.5), Waiting(500, 0)]
    assert wait_s(1000, [], queue, 0.01) == pytest.approx(0.5 + 1.0 + 0.5 + 1.0)
    # a pool that holds them all: only the prefills ahead
    assert wait_s(5000, [], queue, 0.01) == pytest.approx(1.0)


class _Req:
    """A request as SGLang's scheduler holds it."""

    def __init__(self, rid: str, tokens: int, out: int = 0, max_new: int = 8) -> None:
        self.rid = rid
        self.origin_input_ids = list(range(tokens))
        self.output_ids = list(range(out))
        self.prefix_len = 0
        self.sampling_params = SimpleNamespace(max_new_tokens=max_new, ignore_eos=False)

    def finished(self) -> bool:
        return False


def _scheduler(free: int, running: list[_Req], last: list[_Req] | None = None) -> Any:
    mode = SimpleNamespace(is_extend=lambda: True)
    return SimpleNamespace(
        waiting_queue=[],
        running_batch=SimpleNamespace(reqs=running),
        last_batch=SimpleNamespace(forward_mode=mode, reqs=last) if last else None,
        chunked_req=None,
        token_to_kv_pool_allocator=SimpleNamespace(available_size=lambda: free),
        tree_cache=SimpleNamespace(evictable_size=lambda: 50),
        new_token_ratio_tracker=SimpleNamespace(current=0.5),
    )


def test_the_pool_is_counted_as_sglang_admission_counts_it() -> None:
    # one decoding request, and one whose prefill just ran (not merged into the batch yet)
    sched = _scheduler(200, [_Req("a", 700, out=2)], last=[_Req("b", 400)])
    free, running = pool_state(sched)
    assert [(r.held, r.steps_left) for r in running] == [(702, 6), (400, 8)]
    assert free == pytest.approx(200 + 50 - 0.5 * (6 + 8))
    assert wait_s(free, running, [Waiting(100, 0)], 1.0) == 0
    assert wait_s(free, running, [Waiting(600, 0)], 1.0) == 6  # "a" finishes first
    assert wait_s(free, running, [Waiting(1300, 0)], 1.0) == 8


def _restore_alongside(running: list[_Req], decode_s: float | None, free: int = 100) -> Any:
    ctl, _ = _controller()
    if decode_s is not None:
        ctl._decode_s = decode_s
    sched = _scheduler(free, running)
    sched.waiting_queue.append(_Req("restore", 512))  # the prefetch call has its handle
    ctl.begin_arrivals(sched)
    ctl.on_prefetch(_call("restore"))
    ctl.end_arrivals()
    return ctl.storage_plans["restore"]


def test_a_restore_the_pool_cannot_hold_waits_for_the_decode_steps_it_needs() -> None:
    idle = _restore_alongside([], None)
    # two requests decode; the pool has room for the restore once the 5-step one is done
    blocked = _restore_alongside([_Req("a", 900, out=3), _Req("b", 300, out=7)], 0.13)
    assert 5 * 0.13 < blocked.predicted_s < 5 * 0.13 + idle.predicted_s
    assert not blocked.alone
    # the span loads while the request waits: nothing is left to recompute after the wait
    assert idle.shape != "load all" and blocked.shape == "load all"
    # room for it now: the running requests do not delay it
    roomy = _restore_alongside([_Req("c", 10, out=3)], 0.13, free=1000)
    assert roomy.predicted_s == pytest.approx(idle.predicted_s)


def test_decode_steps_are_timed_as_they_run() -> None:
    ctl, _ = _controller()
    model = ctl.costs.model()
    assert ctl.decode_step_s(model) == model.compute.step_s  # nothing measured yet
    decode = SimpleNamespace(is_decode=lambda: True, is_extend=lambda: False)
    for s in (0.1, 0.2):
        ctl.forward_done(SimpleNamespace(forward_mode=decode, reqs=[]), s)
    assert ctl.decode_step_s(model) == pytest.approx(0.1 + 0.3 * 0.1)  # a moving average


def test_a_round_planned_as_sglang_admits_it_waits_for_nothing() -> None:
    # host hits are planned while SGLang admits them: a decision counts only if its request
    # is admitted in that round, so the pool had room; an L3 arrival waits for it
    ctl, _ = _controller()
    ctl._decode_s = 0.13
    ctl.scheduler = _scheduler(100, [_Req("a", 900, out=3)])
    model = ctl.costs.model()
    assert ctl.queued_compute_s(model, {"host-hit": None}) == 0.0
    assert ctl.queued_compute_s(model, {"arrival": 520}) == pytest.approx(5 * 0.13)


def test_a_prefill_queued_ahead_runs_first_and_takes_the_room() -> None:
    ctl, _ = _controller()
    ctl._decode_s = 0.13
    sched = _scheduler(600, [])  # 650 free, nothing running
    sched.waiting_queue = [_Req("chat", 500), _Req("restore", 512), _Req("behind", 900)]
    ctl.scheduler, ctl.queue = sched, sched.waiting_queue
    model = ctl.costs.model()
    prefill = model.recompute_s(0, 500)
    # the chat is admitted first (its prefill), then holds the pool for its 8 decode steps;
    # the request queued behind the restore does not count
    got = ctl.queued_compute_s(model, {"restore": 520})
    assert got == pytest.approx(prefill + 8 * 0.13)
    assert ctl.queued_compute_s(model, {"restore": 100}) == pytest.approx(prefill)
