"""Every diagnostic's arguments are checked against what the model and the data allow before
anything is written: a value out of range is one line, ``zfk CMD: error: ...``, exit status 2,
with no traceback and no --out folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
from PIL import Image

from zfkernels import cli
from zfkernels.cli.common import SEED_LIMIT

HUGE = str(2**70)  # 1180591620717411303424: past every 64-bit integer


def zfk(argv: List[object], capsys) -> Tuple[int, str]:
    """``zfk ARGV`` in this process: (exit status, stderr). argparse's refusals end in SystemExit,
    the commands' own in a returned status; both must look the same to the user."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


def assert_one_line_error(status: int, err: str, command: str, argument: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert status == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"zfk {command}: error: ") and argument in lines[0] and message in lines[0], lines[0]


@pytest.fixture
def image(tmp_path) -> Path:
    """A small photograph-like file whose name carries its ImageNet synset (class 0, tench)."""
    path = tmp_path / "n01440764_generated.png"
    gradient = torch.linspace(0, 255, 64).to(torch.uint8)
    pixels = torch.stack([gradient.expand(48, 64), gradient.flip(0).expand(48, 64), torch.full((48, 64), 90, dtype=torch.uint8)], -1)
    Image.fromarray(pixels.numpy()).save(path)
    return path


# -- occlusion ----------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("--size", HUGE, "must be from 1 to 224"),
    ("--stride", HUGE, "must be from 1 to 224"),
    ("--size", "225", "must be from 1 to 224 (pixels of the 224x224 crop)"),
    ("--stride", "0", "must be from 1 to 224"),
    ("--size", "9" * 5000, "expected an integer, got '9999"),
    ("--batch-size", HUGE, "must be from 1 to 1024"),
])
def test_occlusion_refuses_sizes_beyond_the_crop(option, value, message, image, tmp_path, capsys):
    out = tmp_path / "out"
    status, err = zfk(["occlusion", image, option, value, "--out", out, "--device", "cpu"], capsys)
    assert_one_line_error(status, err, "occlusion", f"argument {option}: ", message)
    assert len(err) < 300  # a 5,000-digit number is not echoed whole
    assert not out.exists()


def test_occlusion_takes_the_largest_square_and_stride(image, tmp_path, capsys):
    # The bounds are the crop's side itself: a 224x224 square at one position, which hides the
    # whole crop, so the occluded copy is the fill everywhere.
    out = tmp_path / "out"
    status, err = zfk(["occlusion", image, "--size", "224", "--stride", "224", "--out", out, "--device", "cpu", "-q"], capsys)
    assert status == 0, err
    document = json.loads((out / "occlusion" / "occlusion.json").read_text())
    assert document["grid"]["rows"] == [[0, 224]] and document["grid"]["cols"] == [[0, 224]]


# -- the seed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [str(10**23), str(SEED_LIMIT), "-1"])
def test_a_seed_torch_cannot_take_blames_the_seed(seed, image, tmp_path, capsys):
    # 10^23 used to reach torch.manual_seed and come back as a message about the weights.
    status, err = zfk(["occlusion", image, f"--seed={seed}", "--out", tmp_path / "out"], capsys)
    assert_one_line_error(status, err, "occlusion", "argument --seed: ", "0 <= seed < 2^64")
    assert "weights" not in err


def test_the_largest_seed_builds_the_model_torch_seeds_with_it():
    from zfkernels import models
    from zfkernels.cli.common import seed_int

    seed = seed_int(str(SEED_LIMIT - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED_LIMIT - 1)
        expected = models.ZFNet()
    built = models.zfnet(seed=seed)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), expected.state_dict().values()))
