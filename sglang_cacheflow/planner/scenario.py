"""Scenario files: a model, a cost model, a chunk size and one round of requests, as JSON.

See the README's "Scenario format" section and ``examples/scenarios/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sglang_cacheflow.planner.cost import ComputeCost, CostModel, ModelShape, TierCost
from sglang_cacheflow.planner.request import Request, Span


@dataclass(frozen=True)
class Scenario:
    cost: CostModel
    chunk_tokens: int
    requests: tuple[Request, ...]


class ScenarioError(ValueError):
    pass


def _section(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: missing object {key!r}")
    return value


def _build(kind: type, values: dict[str, Any], where: str, renames: dict[str, str] | None = None):
    args = {(renames or {}).get(k, k): v for k, v in values.items()}
    try:
        return kind(**args)
    except TypeError as e:
        raise ScenarioError(f"{where}: {e}") from None
    except ValueError as e:
        raise ScenarioError(f"{where}: {e}") from None


def parse_scenario(data: dict[str, Any], where: str = "scenario") -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: top level must be a JSON object")
    shape = _build(ModelShape, _section(data, "model", where), f"{where}: model")
    compute = _build(ComputeCost, _section(data, "compute", where), f"{where}: compute")
    tiers: dict[str, TierCost] = {}
    for name, t in _section(data, "tiers", where).items():
        if not isinstance(t, dict) or "bandwidth_GBps" not in t:
            raise ScenarioError(f"{where}: tier {name!r} needs bandwidth_GBps (and latency_ms)")
        extra = set(t) - {"bandwidth_GBps", "latency_ms"}
        if extra:
            raise ScenarioError(f"{where}: tier {name!r} has unknown keys {sorted(extra)}")
        try:
            tiers[name] = TierCost.from_gbps(
                float(t["bandwidth_GBps"]), float(t.get("latency_ms", 0))
            )
        except ValueError as e:
            raise ScenarioError(f"{where}: tier {name!r}: {e}") from None
    chunk = data.get("chunk_tokens", 256)
    if not isinstance(chunk, int) or chunk < 1:
        raise ScenarioError(f"{where}: chunk_tokens must be a positive integer, got {chunk!r}")
    raw = data.get("requests")
    if not isinstance(raw, list) or not raw:
        raise ScenarioError(f"{where}: 'requests' must be a non-empty list")
    requests = []
    for i, r in enumerate(raw):
        at = f"{where}: requests[{i}]"
        if not isinstance(r, dict):
            raise ScenarioError(f"{at}: must be an object")
        spans = []
        for s in r.get("spans", []):
            if not (isinstance(s, list) and len(s) == 2 and isinstance(s[1], int)):
                raise ScenarioError(f'{at}: a span is ["tier", tokens], got {s!r}')
            if s[0] not in tiers:
                raise ScenarioError(
                    f"{at}: span tier {s[0]!r} is not in 'tiers' ({', '.join(sorted(tiers))})"
                )
            spans.append(_build(Span, {"tier": s[0], "tokens": s[1]}, at))
        requests.append(
            _build(
                Request,
                {
                    "id": str(r.get("id", i)),
                    "device_tokens": r.get("device_tokens", 0),
                    "spans": tuple(spans),
                    "new_tokens": r.get("new_tokens", 0),
                },
                at,
            )
        )
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        raise ScenarioError(f"{where}: request ids must be unique")
    return Scenario(CostModel(shape, compute, tiers), chunk, tuple(requests))


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"scenario file {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise ScenarioError(f"{p}: not valid JSON: {e}") from None
    return parse_scenario(data, str(p))
