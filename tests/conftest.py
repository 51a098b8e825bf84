"""Shared fixtures. Each fixture module owns one kind of external process."""

pytest_plugins: list[str] = ["tests.fixtures.redis", "tests.fixtures.sglang"]
