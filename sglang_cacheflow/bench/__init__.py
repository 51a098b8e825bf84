"""Benchmarks, workloads, tables and plots. Engine-agnostic benches (planner, tiers, the
reference runtime) live here; those that run SGLang servers live in ``bench/sglang/``."""
