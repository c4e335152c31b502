"""An earlier revision's CPU kernels, built beside the current ones, for before/after figures in
one benchmark run.

``build_baseline(rev, folder)`` takes ``csrc/`` as it was at git revision ``rev``, renames its
operator namespace (and C++ namespace) from ``zfkernels`` to ``zfkernels_old`` so both builds load
into one process, compiles the CPU sources with ``torch.utils.cpp_extension`` and returns the
library's path; ``torch.ops.load_library(path)`` then registers ``torch.ops.zfkernels_old.*``
with that revision's schemas.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def _sources_at(rev: str, folder: Path) -> list:
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", rev, "csrc"],
                             check=True, capture_output=True, text=True).stdout.split()
    sources = []
    for name in listing:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], check=True, capture_output=True,
                              text=True).stdout
        # One rename covers TORCH_LIBRARY(zfkernels, ...), TORCH_LIBRARY_IMPL(zfkernels, ...) and the
        # C++ namespace, so no symbol or operator of the two builds collides.
        text = re.sub(r"\bzfkernels\b", "zfkernels_old", text)
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if name.endswith(".cpp") and "/cuda/" not in name:
            sources.append(str(path))
    return sources


def commit_of(rev: str) -> str:
    """The full commit hash ``rev`` names (a branch, tag, HEAD~3 or a short hash)."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()


def default_folder(rev: str) -> Path:
    """A build folder per commit in the temporary directory, so a second run reuses the build
    (ninja recompiles nothing when the sources are unchanged)."""
    return Path(tempfile.gettempdir()) / f"zfk-baseline-{commit_of(rev)[:12]}"


def build_baseline(rev: str, folder: Optional[Path] = None) -> str:
    """Build ``rev``'s CPU kernels as ``torch.ops.zfkernels_old`` in ``folder`` (default:
    :func:`default_folder`); the library's path."""
    from torch.utils import cpp_extension

    folder = Path(folder) if folder is not None else default_folder(rev)
    sources = _sources_at(rev, folder / "src")
    build = folder / "build"
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load("zfkernels_old", sources, extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       build_directory=str(build), is_python_module=False, verbose=False)
    return str(build / "zfkernels_old.so")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="git revision whose csrc/ to build, e.g. HEAD~3")
    parser.add_argument("folder", type=Path, nargs="?", help="where to put its sources and build (default: a folder "
                        "per commit in the temporary directory, reused by later runs)")
    args = parser.parse_args()
    print(build_baseline(args.rev, args.folder))
