"""The CI hook of ``_skips``: under ``CI=true`` only CUDA skips pass, run in a separate pytest
over a generated test file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SAMPLE = '''
import pytest

def test_missing_folder():
    pytest.skip("real images not available: ../shared is absent")

@pytest.mark.skipif(True, reason="no CUDA GPU visible, or the CUDA kernels were not compiled")
def test_cuda_reason():
    pass

@pytest.mark.cuda
def test_cuda_marked():
    pytest.skip("torchvision cannot decode JPEGs here")

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False

def test_passes():
    pass
'''


def run_pytest(folder: Path, ci: str) -> subprocess.CompletedProcess:
    (folder / "test_sample.py").write_text(SAMPLE)
    (folder / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: a CUDA test\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(CI=ci, PYTHONPATH=str(TESTS))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "_skips", "-p", "no:cacheprovider", "-q", "-rA", "test_sample.py"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci, summary", [("true", "1 failed, 1 passed, 2 skipped, 1 xfailed"),
                                         ("", "1 passed, 3 skipped, 1 xfailed")])
def test_only_cuda_skips_pass_under_ci(tmp_path, ci, summary):
    result = run_pytest(tmp_path, ci)
    assert summary in result.stdout, result.stdout + result.stderr
    if ci:
        assert "FAILED test_sample.py::test_missing_folder" in result.stdout
        assert "only CUDA tests may skip, but this one skipped: real images not available" in result.stdout
