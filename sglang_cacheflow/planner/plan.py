"""Plan types: per request, steps of (token range, layer range, action) with predicted times."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Action(StrEnum):
    RECOMPUTE = "recompute"  # run the model over evicted tokens to rebuild their KV
    LOAD = "load"  # copy evicted KV from a tier
    PREFILL = "prefill"  # compute the request's new tokens once its prefix KV is in place


COMPUTE = "compute"  # the resource every RECOMPUTE and PREFILL step runs on


@dataclass(slots=True)  # not frozen: plans hold thousands and frozen init is slow
class Step:
    """One unit of restore work: ``action`` over tokens [start, end) and layers [l0, l1).

    Times are predictions in seconds from the start of the round. Layers finish one after
    another, evenly, after ``latency_s`` (a load's first byte); a load that is not
    ``streamed`` makes all its layers available only at ``finish_s``.
    """

    start: int
    end: int
    layer_start: int
    layer_end: int
    action: Action
    tier: str | None
    start_s: float
    finish_s: float
    latency_s: float = 0.0
    streamed: bool = True

    @property
    def resource(self) -> str:
        return self.tier if self.action is Action.LOAD and self.tier else COMPUTE

    @property
    def tokens(self) -> int:
        return self.end - self.start

    @property
    def layers(self) -> int:
        return self.layer_end - self.layer_start

    def layer_ready_s(self, layer: int) -> float:
        """Predicted time at which this step's output for ``layer`` is available."""
        if not self.streamed:
            return self.finish_s
        per = (self.finish_s - self.start_s - self.latency_s) / self.layers
        return self.start_s + self.latency_s + (layer - self.layer_start + 1) * per

    def layer_begin_s(self, layer: int) -> float:
        """Predicted time at which this step starts working on ``layer``."""
        per = (self.finish_s - self.start_s - self.latency_s) / self.layers
        return self.start_s + self.latency_s + (layer - self.layer_start) * per

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": [self.start, self.end],
            "layers": [self.layer_start, self.layer_end],
            "action": str(self.action),
            "tier": self.tier,
            "start_s": self.start_s,
            "finish_s": self.finish_s,
        }


@dataclass(frozen=True)
class RequestPlan:
    request_id: str
    shape: str  # human-readable restore shape, e.g. "token split @ 4096"
    steps: tuple[Step, ...]
    predicted_ttft_s: float
    # a split run in the new tokens' forward, not as a chunk and then an extend
    one_forward: bool = False

    def work_s(self) -> dict[str, float]:
        """Seconds of work this request puts on each resource (``"compute"``, tier names)."""
        out: dict[str, float] = {}
        for s in self.steps:
            out[s.resource] = out.get(s.resource, 0.0) + s.finish_s - s.start_s
        return out

    def tokens_by_action(self, num_layers: int) -> dict[str, float]:
        """Evicted tokens restored per action; a layer range counts its share of a token."""
        out: dict[str, float] = {}
        for s in self.steps:
            if s.action is Action.PREFILL:
                continue
            key = f"load:{s.tier}" if s.action is Action.LOAD else "recompute"
            out[key] = out.get(key, 0.0) + s.tokens * s.layers / num_layers
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "predicted_ttft_s": self.predicted_ttft_s,
            "one_forward": self.one_forward,
            "steps": [s.to_dict() for s in self.steps],
        }


@dataclass(frozen=True)
class Plan:
    policy: str
    requests: dict[str, RequestPlan]
    planner_time_ms: float = 0.0
    order: tuple[str, ...] = field(default=())  # request ids in the order they are served
    # Seconds of work each resource ("compute", tier names) owes once this plan is issued,
    # the round's ``busy`` included. Work, not the clock of the last step: a compute step that
    # waits for a load leaves a gap the next round's recomputes can fill.
    owed_s: dict[str, float] = field(default_factory=dict)

    @property
    def mean_ttft_s(self) -> float:
        if not self.requests:
            return 0.0
        return sum(r.predicted_ttft_s for r in self.requests.values()) / len(self.requests)

    @property
    def makespan_s(self) -> float:
        return max((r.predicted_ttft_s for r in self.requests.values()), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": {rid: rp.to_dict() for rid, rp in self.requests.items()},
            "mean_ttft_s": self.mean_ttft_s,
            "makespan_s": self.makespan_s,
            "planner_time_ms": self.planner_time_ms,
        }
