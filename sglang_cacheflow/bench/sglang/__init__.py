"""Benchmarks that run real SGLang servers: returning conversations per policy (``bench``,
``demo``), split restores (``sglang-bench``), the CPU attention backend. The engine-agnostic
benches (planner, tiers, reference runtime) are one folder up."""
