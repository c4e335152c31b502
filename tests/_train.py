"""Helpers for the training tests: the small, quick CPU runs they share, and subprocess runs of
``zfk train`` (one thread each: 2 cores are shared, and runs compared bit for bit must use the
same thread count)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Dict, Iterator, List, Sequence

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The knobs every quick run uses: tiny images (72 px, 64-px crops, see _train_data.SIZE) and a
# quarter-width ZFNet, so that an epoch takes seconds on a shared CPU.
QUICK = ["--resize", "72", "--crop", "64", "--width", "0.25", "--device", "cpu"]


@contextmanager
def single_thread() -> Iterator[None]:
    """In-process work on one thread (2 cores are shared; it is also what the subprocesses use,
    and runs compared bit for bit must use the same thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """:func:`single_thread` as a fixture (import it into a test module to use it)."""
    with single_thread():
        yield


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, emptied after the test: full-size runs write 250 MB a checkpoint, and pytest
    keeps the last runs' folders."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def env() -> Dict[str, str]:
    environment = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    environment.pop("WORLD_SIZE", None)
    return environment


def popen(args: Sequence[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zfkernels", *args], env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def free_port() -> int:
    """A TCP port nobody listens on now (torchrun's rendezvous does not take port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_bits(a: Path, b: Path) -> None:
    first, second = load(a), load(b)
    assert list(first) == list(second)
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"{a.name}: tensors differ: {different}"


def epochs(metrics: Dict[str, object], *keys: str) -> List[List[object]]:
    return [[row[k] for k in keys] for row in metrics["epochs"]]
