"""Shared fixtures. Each fixture module owns one kind of external process."""

from __future__ import annotations

import pytest

pytest_plugins: list[str] = ["tests.fixtures.redis", "tests.fixtures.sglang"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules that start SGLang servers run first, then the other slow ones, the modules
    of more tests (more servers) first within each, each module's tests in their own order:
    ``make test`` hands whole modules to two workers in this order (``--dist loadfile
    --no-loadscope-reorder``), and the long ones, started first, end with the rest instead
    of after it. Run in one process, the suite keeps its collection order."""
    if getattr(config.option, "dist", "no") == "no":
        return
    rank: dict[object, int] = {}
    size: dict[object, int] = {}
    for item in items:
        slow = 1 if item.get_closest_marker("slow") else 2
        here = 0 if item.get_closest_marker("sglang") else slow
        rank[item.module] = min(here, rank.get(item.module, 2))
        size[item.module] = size.get(item.module, 0) + 1
    items.sort(key=lambda item: (rank[item.module], -size[item.module]))
