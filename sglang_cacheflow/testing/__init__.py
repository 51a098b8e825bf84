"""Reusable launchers of real external processes (Redis, SGLang servers) for tests and demos."""
