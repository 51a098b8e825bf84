"""Shared fixtures. Each fixture module owns one kind of external process."""

from __future__ import annotations

import pytest

pytest_plugins: list[str] = ["tests.fixtures.redis", "tests.fixtures.sglang"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules that start SGLang servers run first, each in its own order: ``make test``
    spreads modules over two workers (``--dist loadfile``), and the long ones, started
    first, end with the rest instead of after it."""
    servers = {item.module for item in items if item.get_closest_marker("sglang")}
    items.sort(key=lambda item: item.module not in servers)
