"""``sglang-cacheflow patch-sglang [--check|--revert]``: a native ``--enable-cacheflow``.

Applies ``patches/sglang-0.5.23-enable-cacheflow.patch`` to an installed SGLang 0.5.23: it adds
the server arguments ``--enable-cacheflow``, ``--cacheflow-policy`` and ``--cacheflow-config``
(``ServerArgs`` fields, so they show in ``--help`` and work from ``sglang.Engine(...)``) and one
resolution step that validates them and turns on what they imply
(:func:`sglang_cacheflow.sglang.flags.resolve_server_args`).

The patch is applied hunk by hunk by exact text: a hunk applies where its old text occurs
exactly once, so applying twice, or reverting an unpatched tree, changes nothing and says so.
Another SGLang version is refused before any file is touched.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PATCH_NAME", "SGLANG_VERSION", "PatchError", "add_arguments", "apply", "run", "status"]

SGLANG_VERSION = "0.5.23"
PATCH_NAME = f"sglang-{SGLANG_VERSION}-enable-cacheflow.patch"


class PatchError(RuntimeError):
    """The patch cannot be applied or reverted; the message says why."""


@dataclass
class Hunk:
    path: str
    old: str
    new: str


def default_patch_file() -> Path:
    """``patches/`` of a source checkout, else the copy a wheel installs under
    ``<prefix>/share/sglang-cacheflow/patches``."""
    checkout = Path(__file__).resolve().parents[2] / "patches" / PATCH_NAME
    if checkout.exists():
        return checkout
    return Path(sys.prefix) / "share" / "sglang-cacheflow" / "patches" / PATCH_NAME


def parse_patch(text: str) -> list[Hunk]:
    """Hunks of a unified diff (paths relative to the directory holding ``sglang/``)."""
    hunks: list[Hunk] = []
    path: str | None = None
    old: list[str] = []
    new: list[str] = []
    in_hunk = False

    def flush() -> None:
        if in_hunk and path is not None:
            hunks.append(Hunk(path, "".join(old), "".join(new)))

    for line in text.splitlines(keepends=True):
        if line.startswith("+++ "):
            flush()
            in_hunk = False
            path = line[4:].strip().split("\t")[0].removeprefix("b/")
        elif line.startswith(("--- ", "diff ")):
            flush()
            in_hunk = False
        elif line.startswith("@@"):
            flush()
            in_hunk, old, new = True, [], []
        elif in_hunk:
            body = line[1:] if line[:1] in (" ", "-", "+") else line
            if line.startswith("-"):
                old.append(body)
            elif line.startswith("+"):
                new.append(body)
            elif line.startswith("\\"):
                continue
            else:
                old.append(body)
                new.append(body)
    flush()
    if not hunks:
        raise PatchError("the patch file has no hunks")
    return hunks


def sglang_root() -> Path:
    """The directory that holds the installed ``sglang`` package."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("SGLang is not installed in this environment (pip install sglang==0.5.23)")
    return Path(next(iter(spec.submodule_search_locations))).parent


def check_version(version: str | None = None) -> str:
    if version is None:
        try:
            version = importlib.metadata.version("sglang")
        except importlib.metadata.PackageNotFoundError:
            raise PatchError("SGLang is not installed (pip install sglang==0.5.23)") from None
    if version != SGLANG_VERSION:
        raise PatchError(
            f"the installed SGLang is {version}; this patch is for SGLang {SGLANG_VERSION} only. "
            f"Install sglang=={SGLANG_VERSION}, or run without the patch: the plugin route "
            "handles --enable-cacheflow on any launch_server command line (see docs/sglang.md)"
        )
    return version


def status(root: Path, hunks: list[Hunk]) -> str:
    """``applied``, ``not applied`` or ``conflict`` (a hunk matches neither side exactly)."""
    states = set()
    for h in hunks:
        text = (root / h.path).read_text()
        old, new = text.count(h.old), text.count(h.new)
        if new == 1 and old == 0:
            states.add("applied")
        elif old == 1 and new == 0:
            states.add("not applied")
        else:
            states.add("conflict")
    return states.pop() if len(states) == 1 else "conflict"


def apply(root: Path, hunks: list[Hunk], *, revert: bool = False) -> str:
    """Apply (or revert) every hunk under ``root``; returns what was done."""
    state = status(root, hunks)
    if state == "conflict":
        raise PatchError(
            f"SGLang under {root} matches neither the original nor the patched files "
            "(edited by hand?); reinstall sglang==0.5.23 and run patch-sglang again"
        )
    if (state == "applied") != revert:
        return "already applied" if not revert else "not applied, nothing to revert"
    files: dict[str, str] = {}
    for h in hunks:
        text = files.get(h.path) or (root / h.path).read_text()
        src, dst = (h.new, h.old) if revert else (h.old, h.new)
        if text.count(src) != 1:
            raise PatchError(f"{h.path}: hunk does not match exactly once")
        files[h.path] = text.replace(src, dst)
    for path, text in files.items():
        target = root / path
        tmp = target.with_suffix(target.suffix + ".cacheflow-tmp")
        tmp.write_text(text)
        tmp.replace(target)
        for cached in target.parent.glob(f"__pycache__/{target.stem}.*.pyc"):
            cached.unlink(missing_ok=True)
    return "reverted" if revert else "applied"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report whether the patch is applied")
    mode.add_argument("--revert", action="store_true", help="remove the patch")
    parser.add_argument(
        "--sglang-root",
        type=Path,
        default=None,
        help="directory holding the sglang package (default: the installed one)",
    )
    parser.add_argument(
        "--patch-file", type=Path, default=None, help=f"the patch (default: patches/{PATCH_NAME})"
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.sglang_root is None:
            check_version()
        root = args.sglang_root or sglang_root()
        patch_file = args.patch_file or default_patch_file()
        if not patch_file.exists():
            raise PatchError(f"patch file {patch_file} not found; pass --patch-file")
        hunks = parse_patch(patch_file.read_text())
        if args.check:
            state = status(root, hunks)
            print(f"sglang {SGLANG_VERSION} at {root}: cacheflow patch {state}")
            return 0 if state == "applied" else 1
        outcome = apply(root, hunks, revert=args.revert)
    except (PatchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sglang at {root}: cacheflow patch {outcome}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sglang-cacheflow patch-sglang", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
