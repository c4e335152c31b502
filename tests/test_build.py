"""setup.py decides, probes and writes only in its build command: reading it for metadata
(``python setup.py --name``, ``pip show``) runs no nvcc, prints nothing of the build and writes
no ``_build_info.json``; the build command's decision honours the documented switches."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools import Extension
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent


def fake_toolkit(folder: Path, ran: Path) -> Path:
    """A CUDA toolkit whose ``nvcc`` only records that it ran (and says it is release 12.4)."""
    (folder / "bin").mkdir(parents=True)
    (folder / "include").mkdir()
    (folder / "include" / "cuda.h").write_text("/* fake */\n")
    nvcc = folder / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho \"$@\" >> {ran}\necho 'Cuda compilation tools, release 12.4, V12.4.99'\n")
    nvcc.chmod(0o755)
    return folder


def files_under(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_reading_the_metadata_builds_probes_and_writes_nothing(tmp_path):
    tree = tmp_path / "tree"
    (tree / "zfkernels").mkdir(parents=True)
    (tree / "csrc" / "cpu").mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, tree / name)
    ran = tmp_path / "nvcc-ran.txt"
    toolkit = fake_toolkit(tmp_path / "cuda", ran)
    before = files_under(tree)
    env = dict(os.environ, CUDA_HOME=str(toolkit), PATH=f"{toolkit / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("ZFK_CPU_ONLY", None)
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tree, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "zfkernels"
    assert "[zfkernels build]" not in result.stdout + result.stderr
    assert not ran.exists(), "nvcc ran while setup.py was only read"
    assert files_under(tree) == before  # no _build_info.json, no build folder


@pytest.fixture
def setup_module(monkeypatch):
    """setup.py imported as a module (its setup() call runs only as __main__), with the process
    environment and torch's CUDA_HOME restored afterwards."""
    for name in ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST", "ZFK_CUDA_ARCH_LIST", "ZFK_CPU_ONLY", "ZFK_PTXAS_VERBOSE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    monkeypatch.chdir(ROOT)  # setup.py names its sources relative to the checkout, as pip runs it
    spec = importlib.util.spec_from_file_location("zfkernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    info = ROOT / "zfkernels" / "_build_info.json"
    stamp = info.stat().st_mtime_ns if info.exists() else None
    spec.loader.exec_module(module)
    assert (info.stat().st_mtime_ns if info.exists() else None) == stamp  # importing wrote nothing
    return module


def placeholder() -> Extension:
    return Extension("zfkernels._C", ["csrc/zfkernels.cpp"])


@pytest.mark.parametrize("switch, archs, gencodes", [
    ("ZFK_CUDA_ARCH_LIST", "7.5", ["arch=compute_75,code=sm_75"]),
    ("TORCH_CUDA_ARCH_LIST", "8.6;9.0", ["arch=compute_86,code=sm_86", "arch=compute_90,code=sm_90"]),
    ("ZFK_CUDA_ARCH_LIST", "compute_75", ["arch=compute_75,code=compute_75"]),
    ("ZFK_CUDA_ARCH_LIST", "8.0;9.0+PTX", ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90",
                                          "arch=compute_90,code=compute_90"]),
])
def test_the_build_command_decides_cuda_from_the_toolkit_and_the_switches(switch, archs, gencodes, setup_module,
                                                                          tmp_path, monkeypatch, capsys):
    ran = tmp_path / "nvcc-ran.txt"
    toolkit = fake_toolkit(tmp_path / "cuda", ran)
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.setenv(switch, archs)
    monkeypatch.setenv("ZFK_PTXAS_VERBOSE", "1")
    extension = placeholder()
    info = setup_module.configure(extension)
    assert ran.read_text().split() == ["--version"]  # probed now, when the build runs
    assert info["cuda"] is True and info["cuda_version"] == "12.4" and info["cuda_archs"] == archs.split(";")
    assert cpp_extension.CUDA_HOME == str(toolkit)
    nvcc = extension.extra_compile_args["nvcc"]
    assert [f.split("=", 1)[1] for f in nvcc if f.startswith("-gencode=")] == gencodes
    assert sorted(Path(s).name for s in extension.sources if s.endswith(".cu")) == sorted(
        p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert "-Xptxas=-v" in extension.extra_compile_args["nvcc"]
    assert "CUDA kernels: yes" in capsys.readouterr().out


def test_zfk_cpu_only_builds_the_cpu_kernels_without_asking_nvcc(setup_module, tmp_path, monkeypatch, capsys):
    ran = tmp_path / "nvcc-ran.txt"
    monkeypatch.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "cuda", ran)))
    monkeypatch.setenv("ZFK_CPU_ONLY", "1")
    extension = placeholder()
    info = setup_module.configure(extension)
    assert not ran.exists()
    assert info["cuda"] is False and info["cuda_archs"] == []
    assert not any(s.endswith(".cu") for s in extension.sources)
    assert sorted(Path(s).name for s in extension.sources) == sorted(
        [p.name for p in (ROOT / "csrc").glob("*.cpp")] + [p.name for p in (ROOT / "csrc" / "cpu").glob("*.cpp")])
    assert "CUDA kernels: no (ZFK_CPU_ONLY=1)" in capsys.readouterr().out


def test_without_a_visible_gpu_the_default_is_one_ptx_target(setup_module, tmp_path, monkeypatch):
    """No architecture list and no GPU: one PTX target (compute_75), which the driver of any later
    GPU compiles on first use, instead of machine code for five architectures."""
    monkeypatch.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "cuda", tmp_path / "ran.txt")))
    monkeypatch.setattr(setup_module.torch.cuda, "is_available", lambda: False)
    extension = placeholder()
    info = setup_module.configure(extension)
    assert info["cuda_archs"] == ["compute_75"]
    assert [f for f in extension.extra_compile_args["nvcc"] if f.startswith("-gencode=")] == [
        "-gencode=arch=compute_75,code=compute_75"]


def test_with_a_visible_gpu_the_default_is_its_architecture(setup_module, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "cuda", tmp_path / "ran.txt")))
    monkeypatch.setattr(setup_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(setup_module.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(setup_module.torch.cuda, "get_device_capability", lambda i: (9, 0) if i == 0 else (8, 6))
    info = setup_module.configure(placeholder())
    assert info["cuda_archs"] == ["8.6", "9.0"]


def test_the_library_is_built_on_the_stable_abi_only(setup_module, tmp_path, monkeypatch):
    """Any torch header outside the stable ABI is a compile error (TORCH_STABLE_ONLY), the target
    is torch 2.14 (TORCH_TARGET_VERSION), and libtorch_python is not linked."""
    monkeypatch.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "cuda", tmp_path / "ran.txt")))
    monkeypatch.setenv("ZFK_CUDA_ARCH_LIST", "7.5")
    extension = placeholder()
    info = setup_module.configure(extension)
    for flags in (extension.extra_compile_args["cxx"], extension.extra_compile_args["nvcc"]):
        assert "-DTORCH_STABLE_ONLY" in flags and "-DTORCH_TARGET_VERSION=0x020e000000000000" in flags
    assert "torch_python" not in extension.libraries
    assert info["stable_abi"] == "2.14"


def test_an_unreadable_architecture_is_refused(setup_module, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "cuda", tmp_path / "ran.txt")))
    monkeypatch.setenv("ZFK_CUDA_ARCH_LIST", "sm_90")
    with pytest.raises(SystemExit, match="sm_90"):
        setup_module.configure(placeholder())
