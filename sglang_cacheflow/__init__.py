"""sglang-cacheflow: fast KV cache restoration (CacheFlow, Cake) for SGLang.

Subpackages: ``planner`` (pure restore planning), ``tiers`` (host and Redis KV tiers),
``runtime`` (reference executor on transformers models), ``sglang`` (the SGLang 0.5.23
adapter), ``cpu`` (CPU fallbacks that let SGLang run here), ``bench`` (workloads, benchmarks).
"""

__version__ = "0.1.0"
