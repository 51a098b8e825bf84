"""``gpu-bundle``: which distributions travel, how wheels become a site folder, the size limit.

Downloading is left to the command (it needs the package index); these tests check the
decisions around it on real installed distributions and on wheels built here.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from sglang_cacheflow.gpu import bundle


def test_device_packages_are_canonical_names() -> None:
    have = bundle.device_packages()
    assert {"torch", "triton", "transformers", "xxhash", "numpy", "rich"} <= have
    assert "sglang" not in have and "fastapi" not in have
    assert all(name == name.lower() and "_" not in name for name in have)


def test_closure_follows_requirements_and_stops_at_what_the_device_has() -> None:
    everything = bundle.closure(["fastapi"], frozenset())
    assert {"fastapi", "starlette", "pydantic", "pydantic-core"} <= set(everything)
    from importlib.metadata import version

    assert everything["fastapi"] == version("fastapi")  # pinned to what is tested here
    without = bundle.closure(["fastapi"], frozenset({"starlette", "pydantic"}))
    assert "fastapi" in without
    assert not {"starlette", "pydantic", "pydantic-core"} & set(without)
    assert "torch" not in bundle.closure(["accelerate"], frozenset())  # the device's own


def test_closure_names_what_is_not_installed_here() -> None:
    with pytest.raises(bundle.BundleError, match="no-such-distribution"):
        bundle.closure(["no-such-distribution"], frozenset())


def _wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/__init__.py", "X = 1\n")
        z.writestr("pkg/__pycache__/__init__.cpython-312.pyc", b"\0")
        z.writestr("pkg/tests/test_x.py", "")
        binary = zipfile.ZipInfo("pkg/bin/server")
        binary.external_attr = (stat.S_IFREG | 0o755) << 16
        z.writestr(binary, b"\x7fELF")
        z.writestr("pkg-1.0.data/scripts/tool", "#!/bin/sh\n")
        z.writestr("pkg-1.0.data/purelib/extra.py", "")
        z.writestr("pkg-1.0.data/data/share/man/tool.1", "")
        z.writestr("pkg-1.0.dist-info/entry_points.txt", "[x]\ny = pkg:X\n")
    return path


def test_wheels_unpack_as_pip_places_them(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        added = bundle._add_wheel(tar, wheel, drop=("pkg/tests/",))
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {
        "pkg/__init__.py",
        "pkg/bin/server",
        "bin/tool",
        "extra.py",
        "pkg-1.0.dist-info/entry_points.txt",
    }
    assert members["pkg/bin/server"].mode == 0o755  # the Valkey binary stays executable
    assert members["pkg/__init__.py"].mode == 0o644
    assert added == sum(m.size for m in members.values())


def test_the_size_limit_counts_the_working_tree(tmp_path: Path) -> None:
    made = bundle.Bundle(folder=tmp_path, bundle_bytes=60 * 2**20, working_tree_bytes=2 * 2**20)
    bundle.check_size(made)
    made.working_tree_bytes = 5 * 2**20
    with pytest.raises(bundle.BundleError, match=r"60\.0 MiB \+ working tree 5\.0 MiB exceed"):
        bundle.check_size(made)


def test_the_working_tree_is_what_git_sends(tmp_path: Path) -> None:
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("/big/\n")
    (tmp_path / "a.txt").write_bytes(b"x" * 100)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "blob").write_bytes(b"x" * 10_000)
    assert bundle.working_tree_bytes(tmp_path) == 100 + len("/big/\n")
