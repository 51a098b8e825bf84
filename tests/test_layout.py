"""The import rules of sglang_cacheflow/README.md, checked on every module of the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sglang_cacheflow"

# folder -> (project folders it must not import, third-party packages it must not import)
FORBIDDEN: dict[str, tuple[set[str], set[str]]] = {
    "planner": (
        {"tiers", "blend", "runtime", "sglang", "bench", "testing", "models", "cli"},
        {"torch", "sglang", "redis", "transformers"},
    ),
    "tiers": ({"blend", "runtime", "sglang", "bench", "testing", "models", "cli"}, {"sglang"}),
    "blend": ({"runtime", "sglang", "bench", "testing", "models", "cli"}, {"sglang"}),
    "runtime": ({"sglang", "bench", "testing", "cli"}, {"sglang"}),
    "sglang": ({"runtime", "bench", "testing", "cli"}, set()),
    "testing": ({"planner", "tiers", "blend", "runtime", "sglang", "bench", "cli"}, set()),
    "bench": ({"cli", "gpu"}, set()),
    "gpu": ({"cli"}, set()),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def violations(folder: str, package: Path = PACKAGE) -> list[str]:
    own, external = FORBIDDEN[folder]
    found = []
    for path in sorted((package / folder).rglob("*.py")):
        for line, name in _imports(path):
            parts = name.split(".")
            project = parts[0] == "sglang_cacheflow" and len(parts) > 1 and parts[1] in own
            if project or parts[0] in external:
                found.append(f"{path.relative_to(package)}:{line} imports {name}")
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_point_down_only(folder: str) -> None:
    assert violations(folder) == []


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    (tmp_path / "planner").mkdir()
    (tmp_path / "planner" / "bad.py").write_text(
        "import numpy\nimport torch.nn\nfrom sglang_cacheflow.sglang import hooks\n"
        "from . import cost\nfrom sglang_cacheflow.planner import plan\n"
    )
    assert violations("planner", tmp_path) == [
        "planner/bad.py:2 imports torch.nn",
        "planner/bad.py:3 imports sglang_cacheflow.sglang",
    ]
