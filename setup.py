"""Builds zfkernels._C: the CPU kernels always, the CUDA kernels whenever a CUDA toolkit is found
(also on a machine with no visible GPU, so CI compiles them).

The library uses PyTorch's stable ABI only (-DTORCH_STABLE_ONLY makes any other torch header a
compile error) and targets torch 2.14 (-DTORCH_TARGET_VERSION): built against 2.14, it loads in
2.14 and every later torch, so one build (and one wheel) serves them all.

Environment switches:
  ZFK_CPU_ONLY=1            build the CPU kernels only, even where a toolkit exists
  ZFK_CUDA_ARCH_LIST="9.0"  the CUDA architectures to build, ';'-separated: "8.6" (machine code
                            for sm_86), "9.0+PTX" (machine code and PTX), "compute_75" (PTX only,
                            compiled by the driver on first use). Default: the visible GPUs'
                            architectures, or without a visible GPU "compute_75" (one PTX target,
                            which any GPU from Turing on runs). A wheel meant for other machines
                            names its list, e.g. "7.5;8.0;8.6;8.9;9.0+PTX". TORCH_CUDA_ARCH_LIST
                            is honoured when ZFK_CUDA_ARCH_LIST is unset
  ZFK_PTXAS_VERBOSE=1       print each CUDA kernel's registers and spills (-Xptxas -v)
  CUDA_HOME                 the toolkit; otherwise the real toolkit behind `nvcc`, then /usr/local/cuda
  MAX_JOBS                  parallel compile jobs (ninja)
  CXX                       the C++ compiler (torch's choice otherwise); it must link libstdc++
                            dynamically, which the build checks

pip install . builds against torch 2.14 in an isolated environment (pyproject.toml) and keeps the
installed torch; pip install --no-build-isolation . builds against the installed torch (2.14 or
later). python -m build --wheel makes a wheel.

Everything above is decided, printed and written (zfkernels/_build_info.json) when the build
command runs; reading this file for metadata (python setup.py --version, pip show) does none of it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Optional

import torch
from setuptools import Extension, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
# Without a visible GPU: one PTX target for the oldest architecture CUDA 13 supports (Turing).
DEFAULT_ARCHS_WITHOUT_GPU = "compute_75"
# The stable ABI version the library targets: the oldest torch it loads in (pyproject.toml's
# build requirement and the lower bound of its runtime one).
TORCH_TARGET = (2, 14)
STABLE_FLAGS = ["-DTORCH_STABLE_ONLY", f"-DTORCH_TARGET_VERSION=0x{TORCH_TARGET[0]:02x}{TORCH_TARGET[1]:02x}000000000000"]


def say(message: str) -> None:
    print(f"[zfkernels build] {message}", flush=True)


def _is_toolkit(path: Optional[str]) -> bool:
    return bool(path) and (Path(path) / "bin" / "nvcc").is_file() and (Path(path) / "include" / "cuda.h").is_file()


def resolve_cuda_home() -> Optional[str]:
    """$CUDA_HOME, then the toolkit behind `nvcc` on PATH (a symlink or a wrapper script: nvcc's
    own dry run names its TOP), then /usr/local/cuda. torch's own guess takes the parent of the
    PATH entry, which is wrong for a wrapper in /usr/local/bin."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(variable)):
            return os.environ[variable]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(os.path.realpath(nvcc)).parent.parent
        if _is_toolkit(str(real)):
            return str(real)
        try:
            dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
            match = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
            if match and _is_toolkit(os.path.realpath(match.group(1))):
                return os.path.realpath(match.group(1))
        except (OSError, subprocess.SubprocessError):
            pass
    return "/usr/local/cuda" if _is_toolkit("/usr/local/cuda") else None


def pip_cuda_includes(cuda_home: str) -> list:
    """torch's CUDA headers include cuSPARSE / cuBLAS headers that a minimal toolkit may lack; the
    CUDA build of torch brings them as pip packages (site-packages/nvidia/*/include)."""
    if (Path(cuda_home) / "include" / "cusparse.h").is_file():
        return []
    try:
        import nvidia  # namespace package installed with torch's CUDA build
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += sorted(str(p.parent) for p in Path(base).glob("*/include/cusparse.h"))
    return found


def nvcc_version(cuda_home: str) -> str:
    out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def default_archs() -> str:
    """The visible GPUs' architectures, or one PTX target without a GPU."""
    try:
        if torch.cuda.is_available():
            found = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            if found:
                return ";".join(found)
    except RuntimeError:  # a driver that cannot answer: as without a GPU
        pass
    return DEFAULT_ARCHS_WITHOUT_GPU


def gencode_flags(archs: str) -> list:
    """nvcc's -gencode flags for an architecture list ("8.6;9.0+PTX", "compute_75"; entries
    separated by ';' or spaces, as torch's TORCH_CUDA_ARCH_LIST)."""
    flags = []
    for entry in re.split(r"[;\s]+", archs.strip()):
        match = re.fullmatch(r"compute_(\d+)|(\d+)\.(\d+)(\+PTX)?", entry)
        if not match:
            raise SystemExit(f"[zfkernels build] error: cannot read {entry!r} in the CUDA architecture list {archs!r} "
                             "(expected entries such as 8.6, 9.0+PTX or compute_75)")
        if match.group(1):
            flags.append(f"-gencode=arch=compute_{match.group(1)},code=compute_{match.group(1)}")
            continue
        number = match.group(2) + match.group(3)
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if match.group(4):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def configure(extension: Extension) -> Dict[str, object]:
    """Decide CUDA or CPU-only now, when the build command runs, and print the decision: fill
    ``extension`` in (the sources, flags and libraries torch's ``CUDAExtension`` or
    ``CppExtension`` gives) and return what ``zfkernels/_build_info.json`` records."""
    cpu_only = os.environ.get("ZFK_CPU_ONLY") == "1"
    cuda_home = None if cpu_only else resolve_cuda_home()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # torch picks the C++ standard (C++20 for 2.14). No contraction into fused multiply-adds: the
    # CPU loops' vector clones (kernels/common.h) must round as the baseline build does.
    # Hidden visibility: torch's stable types are hidden, and the library exports PyInit__C only.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden"] + STABLE_FLAGS
    info = {"cpu": True, "cuda": False, "cuda_version": None, "cuda_archs": [], "torch": torch.__version__,
            "stable_abi": "%d.%d" % TORCH_TARGET}
    if cuda_home:
        # torch read $CUDA_HOME once, when cpp_extension was imported, and guessed from PATH
        # where it was unset; its compile and link steps use this module global.
        os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = cuda_home
        archs = os.environ.get("ZFK_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST") or default_archs()
        version = nvcc_version(cuda_home)
        # Our own -gencode flags (torch then adds none): torch's list has no PTX-only entry.
        # USE_CUDA declares the CUDA parts of the stable C shim (the current stream).
        nvcc_flags = (["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler=-fvisibility=hidden", "-DUSE_CUDA"]
                      + STABLE_FLAGS + gencode_flags(archs))
        if os.environ.get("ZFK_PTXAS_VERBOSE") == "1":
            nvcc_flags.append("-Xptxas=-v")
        include_dirs = pip_cuda_includes(cuda_home)
        if include_dirs:
            say(f"toolkit lacks cuSPARSE/cuBLAS headers; using torch's pip-installed ones: {', '.join(include_dirs)}")
        info.update(cuda=True, cuda_version=version, cuda_archs=re.split(r"[;\s]+", archs.strip()))
        say(f"CUDA kernels: yes (toolkit {cuda_home}, nvcc {version}, architectures {archs})")
        built = cpp_extension.CUDAExtension(
            extension.name,
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DUSE_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    else:
        say(f"CUDA kernels: no ({'ZFK_CPU_ONLY=1' if cpu_only else 'no CUDA toolkit found'}); building the CPU kernels only")
        built = cpp_extension.CppExtension(extension.name, sources, extra_compile_args={"cxx": cxx_flags},
                                           extra_link_args=["-fopenmp"])
    # Nothing of libtorch_python is used (the stable ABI lives in libtorch): not linked.
    built.libraries = [name for name in built.libraries if name != "torch_python"]
    # setuptools has already finalised ``extension`` (its output file name, its stub flags: the
    # underscored attributes); it keeps those and takes the build settings decided here.
    for key, value in vars(built).items():
        if not key.startswith("_"):
            setattr(extension, key, value)
    say(f"torch {torch.__version__}; sources: {', '.join(extension.sources)}")
    return info


def check_shared_cxx_runtime(library: Path) -> None:
    """Fails the build when ``library`` does not load a shared C++ runtime.

    The kernels refuse bad input by throwing C++ exceptions that torch's dispatcher turns into
    Python ones. That needs one C++ runtime for both: a compiler that links libstdc++ statically
    (seen: a g++ wrapper whose -B folder holds only libstdc++.a) turns every refusal into a
    segfault. ELF platforms only, and only where binutils' readelf is at hand."""
    readelf = shutil.which("readelf")
    if not readelf or not library.is_file():
        return
    dynamic = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True).stdout
    if "(NEEDED)" not in dynamic or re.search(r"\[(libstdc\+\+|libc\+\+)\.so", dynamic):
        return
    compiler = os.environ.get("CXX") or "c++"
    raise SystemExit(
        f"[zfkernels build] error: {library.name} links the C++ runtime statically (compiler: {compiler}), "
        "so its errors on bad input would crash Python instead of raising. Rebuild with a compiler that "
        "links libstdc++ dynamically, e.g. CXX=/usr/bin/g++ pip install --no-build-isolation ."
    )


class BuildAndCheck(cpp_extension.BuildExtension):
    """torch's ``BuildExtension``, deciding CUDA or CPU-only (:func:`configure`) and recording it
    in ``zfkernels/_build_info.json`` when it runs, and checking what it built with
    :func:`check_shared_cxx_runtime`. Nothing happens when setup.py is only read for metadata
    (``python setup.py --version``, ``pip show``, an sdist)."""

    def run(self) -> None:
        text = json.dumps(configure(self.extensions[0]), indent=2) + "\n"
        super().run()
        # Written once the library is built, so that it always describes the library present.
        (ROOT / "zfkernels" / "_build_info.json").write_text(text)
        if not self.inplace:  # build_py has copied the package already; the wheel takes this copy
            built = Path(self.build_lib) / "zfkernels"
            built.mkdir(parents=True, exist_ok=True)
            (built / "_build_info.json").write_text(text)

    def build_extension(self, ext) -> None:
        super().build_extension(ext)
        check_shared_cxx_runtime(Path(self.get_ext_fullpath(ext.name)))


if __name__ == "__main__":  # (pip and setuptools run this file as __main__; tests import it)
    setup(
        # What to build is decided by BuildAndCheck when it runs; until then, the CPU sources.
        ext_modules=[Extension("zfkernels._C", [str(Path("csrc") / "zfkernels.cpp")])],
        cmdclass={"build_ext": BuildAndCheck},
    )
