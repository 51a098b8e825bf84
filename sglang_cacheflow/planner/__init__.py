"""Pure restore planner: what to recompute and what to load, when.

Imports neither torch nor SGLang, so every rank and every executor can run it. The entry
point is :func:`plan`; executors call :func:`validate` on what they receive before running it.
"""

from sglang_cacheflow.planner.blend import (
    BlendPlan,
    BlendRequest,
    BlendRound,
    Selection,
    plan_blend,
)
from sglang_cacheflow.planner.bound import Bound, fluid_bound
from sglang_cacheflow.planner.calibration import Calibrator
from sglang_cacheflow.planner.capabilities import RUNTIME, Capabilities
from sglang_cacheflow.planner.cost import (
    ComputeCost,
    CostModel,
    ModelShape,
    TierCost,
    attention_ratio,
)
from sglang_cacheflow.planner.plan import Action, Plan, RequestPlan, Step
from sglang_cacheflow.planner.policies import (
    POLICIES,
    is_baseline,
    plan,
    reuses_evicted_kv,
    serves_in_order,
)
from sglang_cacheflow.planner.request import Request, Span
from sglang_cacheflow.planner.shapes import ShapeKind
from sglang_cacheflow.planner.validate import PlanError, validate

__all__ = [
    "POLICIES",
    "RUNTIME",
    "Action",
    "BlendPlan",
    "BlendRequest",
    "BlendRound",
    "Bound",
    "Calibrator",
    "Capabilities",
    "ComputeCost",
    "CostModel",
    "ModelShape",
    "Plan",
    "PlanError",
    "Request",
    "RequestPlan",
    "Selection",
    "ShapeKind",
    "Span",
    "Step",
    "TierCost",
    "attention_ratio",
    "fluid_bound",
    "is_baseline",
    "plan",
    "plan_blend",
    "reuses_evicted_kv",
    "serves_in_order",
    "validate",
]
