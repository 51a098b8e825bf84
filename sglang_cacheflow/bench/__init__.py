"""Workloads, benchmarks, tables and plots."""
