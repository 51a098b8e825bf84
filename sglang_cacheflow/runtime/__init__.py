"""Reference restoration runtime: executes any planner plan on a transformers model.

- :mod:`~sglang_cacheflow.runtime.model`: partial forwards (token range x layer range)
  through the model's own modules, KV in the tiers' page layout;
- :mod:`~sglang_cacheflow.runtime.executor`: compute on one worker, loads on several,
  per-(layer, token) readiness, repair of lost pages, calibration;
- :mod:`~sglang_cacheflow.runtime.tp`: tensor-parallel ranks on ``torch.distributed``.

See ``docs/runtime.md`` for how another engine calls it.
"""

from sglang_cacheflow.runtime.executor import (
    Executor,
    RequestResult,
    RestoreStats,
    RoundResult,
    StepTiming,
)
from sglang_cacheflow.runtime.kv import KVCache
from sglang_cacheflow.runtime.model import ModelAdapter
from sglang_cacheflow.runtime.pages import page_hashes, store_pages
from sglang_cacheflow.runtime.request import RestoreRequest
from sglang_cacheflow.runtime.tp import TPGroup, shard_model

__all__ = [
    "Executor",
    "KVCache",
    "ModelAdapter",
    "RequestResult",
    "RestoreRequest",
    "RestoreStats",
    "RoundResult",
    "StepTiming",
    "TPGroup",
    "page_hashes",
    "shard_model",
    "store_pages",
]
