"""Every diagnostic's arguments are checked against what the model and the data allow before
anything is written: a value out of range is one line, ``zfk CMD: error: ...``, exit status 2,
with no traceback and no --out folder."""

from __future__ import annotations

import json
import os
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
    # (A check that needs the model comes after the loud warning that it is untrained.)
    lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING: no --weights given")]
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
    ("--size", HUGE, "must be from 1 to 1024"),  # (read as a number: bounded far above any network's crop)
    ("--stride", HUGE, "must be from 1 to 1024"),
    ("--stride", "0", "must be from 1 to 1024"),
    ("--size", "9" * 5000, "expected an integer, got '9999"),
    ("--batch-size", HUGE, "must be from 1 to 1024"),
])
def test_occlusion_refuses_sizes_beyond_the_crop(option, value, message, image, tmp_path, capsys):
    out = tmp_path / "out"
    status, err = zfk(["occlusion", image, option, value, "--out", out, "--device", "cpu"], capsys)
    assert_one_line_error(status, err, "occlusion", f"argument {option}: ", message)
    assert len(err) < 300  # a 5,000-digit number is not echoed whole
    assert not out.exists()


@pytest.mark.parametrize("arch, option, value, crop", [
    ("zfnet", "--size", "225", 224), ("zfnet", "--stride", "225", 224),
    ("inception_v3", "--size", "300", 299), ("inception_v3", "--stride", "300", 299),  # Inception v3 sees 299x299
])
def test_occlusion_squares_are_bounded_by_the_networks_own_crop(arch, option, value, crop, image, tmp_path, capsys):
    out = tmp_path / "out"
    status, err = zfk(["occlusion", image, "--arch", arch, option, value, "--out", out, "--device", "cpu"], capsys)
    assert_one_line_error(status, err, "occlusion", f"{option}: ",
                          f"must be from 1 to {crop} (pixels of the {crop}x{crop} crop this network sees), got {value}")
    assert not out.exists()


def test_a_5000_digit_label_is_a_short_line(image, tmp_path, capsys):
    # int() refuses over 4,300 digits with a ValueError of its own: --label came back as a traceback.
    out = tmp_path / "out"
    status, err = zfk(["occlusion", image, "--label", "9" * 5000, "--out", out], capsys)
    assert_one_line_error(status, err, "occlusion", "argument --label: ", "class index '9999")
    assert "(5000 characters)" in err and len(err) < 300 and not out.exists()


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


# -- invariance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transform, values, message", [
    ("translate", "1e300", "1e+300 is outside -224..224"),
    ("scale", "1e300", "1e+300 is outside 0.004464..224"),
    ("scale", "1e-300", "1e-300 is outside 0.004464..224"),
    ("rotate", "1e300", "1e+300 is outside -360..360"),
    ("rotate", ",".join(["10"] * 20000), "20000 values; at most 100"),
    ("translate", "1e400", "not a comma-separated list of finite numbers"),
    ("translate", "9" * 5000 + ",x", "(5002 characters) is not a comma-separated list of numbers"),
])
def test_invariance_refuses_sweeps_beyond_the_window(transform, values, message, image, tmp_path, capsys):
    out = tmp_path / "out"
    status, err = zfk(["invariance", image, "--transform", transform, f"--values={values}", "--out", out], capsys)
    assert_one_line_error(status, err, "invariance", "--values: ", message)
    assert not out.exists()


@pytest.mark.parametrize("transform, values, message", [
    ("translate", "300", "300 is outside -299..299 for translate (a longer shift moves all of the 299x299 crop"),
    ("scale", "300", "300 is outside 0.003344..299 for scale (past 299 one pixel fills the window"),
])
def test_invariance_sweeps_are_bounded_by_the_networks_own_window(transform, values, message, image, tmp_path, capsys):
    out = tmp_path / "out"
    status, err = zfk(["invariance", image, "--arch", "inception_v3", "--transform", transform, f"--values={values}",
                       "--out", out], capsys)
    assert_one_line_error(status, err, "invariance", "--values: ", message)
    assert not out.exists()


def test_invariance_takes_the_sweeps_at_their_bounds(image, tmp_path, capsys):
    out = tmp_path / "out"
    status, err = zfk(["invariance", image, "--transform", "scale", f"--values={1 / 224},1,224", "--out", out,
                       "--device", "cpu", "-q"], capsys)
    assert status == 0, err
    sweep = json.loads((out / "invariance" / "invariance.json").read_text())["transforms"]["scale"]
    assert sweep["values"] == [1 / 224, 1.0, 224.0]
    distances = sweep["raw_distance"]["conv1"][0]
    assert distances[1] == 0.0 and distances[0] > 0 and distances[2] > 0


# -- correspondence -----------------------------------------------------------------------------


def images_and_parts(folder: Path, count: int) -> Tuple[List[Path], Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(count):
        files.append(folder / f"img{k:03d}.png")
        Image.new("RGB", (40, 30), (10 * k % 256, 100, 50)).save(files[-1])
    parts = folder / "parts.json"
    parts.write_text(json.dumps({"parts": {"corner": {f.name: [0, 0, 40, 40] for f in files}}}))
    return files, parts


@pytest.mark.parametrize("option, value, message", [
    ("--trials", str(10**8), "must be from 0 to 1000"),
    ("--trials", "-1", "must be from 0 to 1000"),
    ("--trial-seed", str(10**23), "0 <= seed < 2^64"),
])
def test_correspondence_refuses_trials_and_seeds_out_of_range(option, value, message, tmp_path, capsys):
    files, parts = images_and_parts(tmp_path / "data", 2)
    out = tmp_path / "out"
    status, err = zfk(["correspondence", "--images", *files, "--parts", parts, f"{option}={value}", "--out", out], capsys)
    assert_one_line_error(status, err, "correspondence", f"argument {option}: ", message)
    assert not out.exists()


def test_correspondence_refuses_sign_patterns_beyond_memory(tmp_path, capsys):
    # zfnet's conv5 and fc7 hold 256*13*13 + 4096 = 47,360 features an image: 1,001 occlusions
    # (one part, 1,000 trials) of 46 images need 2,183,073,760 sign bytes, past the 2 GiB bound;
    # 45 images would fit.
    files, parts = images_and_parts(tmp_path / "data", 46)
    out = tmp_path / "out"
    status, err = zfk(["correspondence", "--images", *files, "--parts", parts, "--trials", "1000", "--out", out,
                       "--device", "cpu"], capsys)
    expected_fit = 2 * 2**30 // (46 * 47360)
    assert expected_fit == 985
    assert_one_line_error(status, err, "correspondence", "--trials: ", "1001 occlusions (parts and trials) of 46 images")
    assert "(47360 features each)" in err and f"({expected_fit} occlusions) fit" in err
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    ('{"parts": {"corner": {"img000.png": [%s, 0, 40, 40], "img001.png": [0, 0, 40, 40]}}}' % ("1" * 5000),
     "a number of 5000 characters (at most 32)"),
    ("[" * 100000 + "]" * 100000, "nested 100000 deep (at most 16"),
    ('{"parts": {"corner": {"img000.png": [NaN, 0, 40, 40], "img001.png": [0, 0, 40, 40]}}}', "NaN is not a pixel coordinate"),
    (" " * (2**20 + 1), "larger than 1 MiB"),
])
def test_a_hostile_parts_file_is_one_line(content, message, tmp_path, capsys):
    files, parts = images_and_parts(tmp_path / "data", 2)
    parts.write_text(content)
    out = tmp_path / "out"
    status, err = zfk(["correspondence", "--images", *files, "--parts", parts, "--out", out], capsys)
    assert_one_line_error(status, err, "correspondence", f"--parts {parts}: ", message)
    assert not out.exists()


def test_brackets_inside_names_are_not_nesting(tmp_path):
    from zfkernels.diagnostics.correspondence import json_depth, read_parts

    assert json_depth('{"a": "[[[{{", "b": [[1, "]]"]], "c": "\\\\"}') == 3
    files, parts = images_and_parts(tmp_path / "data", 2)
    name = "[" * 40 + '"{'
    parts.write_text(json.dumps({"parts": {name: {f.name: [0, 0, 40, 40] for f in files}}}))
    assert read_parts(parts, files, [(40, 30)] * 2)[name].tolist() == [[0, 0, 40, 40]] * 2


# -- filters and evolution ----------------------------------------------------------------------


def test_filters_refuses_a_top_beyond_a_sheet(tmp_path, capsys):
    out = tmp_path / "out"
    status, err = zfk(["filters", "--top", "1000000000", "--out", out], capsys)
    assert_one_line_error(status, err, "filters", "argument --top: ", "must be from 1 to 100")
    assert not out.exists()


def test_evolution_refuses_a_huge_batch(tmp_path, capsys):
    files, _ = images_and_parts(tmp_path / "data", 1)
    out = tmp_path / "out"
    status, err = zfk(["evolution", "--checkpoints", "a.pth", "--data", tmp_path / "data", "--batch-size", HUGE,
                       "--out", out], capsys)
    assert_one_line_error(status, err, "evolution", "argument --batch-size: ", "must be from 1 to 1024")
    assert not out.exists()


# -- files that are not regular files -----------------------------------------------------------


@pytest.fixture
def pipe(tmp_path) -> Path:
    """A named pipe: opening it for reading would wait for a writer forever."""
    path = tmp_path / "n01440764_pipe.png"
    os.mkfifo(path)
    return path


def test_a_named_pipe_as_an_image_is_not_a_regular_file(pipe, tmp_path, capsys):
    for command in (["occlusion", pipe], ["invariance", pipe]):
        out = tmp_path / "out"
        status, err = zfk([*command, "--out", out], capsys)
        assert_one_line_error(status, err, command[0], f"IMAGE: {pipe} ", "is a named pipe (FIFO), not a regular file")
        assert "does not exist" not in err and not out.exists()


def test_a_named_pipe_as_checkpoint_weights_or_parts_is_not_a_regular_file(pipe, image, tmp_path, capsys):
    out = tmp_path / "out"
    files, _ = images_and_parts(tmp_path / "data", 2)  # (a folder without the pipe)
    status, err = zfk(["evolution", "--checkpoints", pipe, "--data", tmp_path / "data", "--out", out], capsys)
    assert_one_line_error(status, err, "evolution", f"--checkpoints: {pipe} ", "is a named pipe (FIFO), not a regular file")
    status, err = zfk(["occlusion", image, "--weights", pipe, "--out", out], capsys)
    assert_one_line_error(status, err, "occlusion", f"weights {pipe} ", "is not a regular file")
    status, err = zfk(["correspondence", "--images", *files, "--parts", pipe, "--out", out], capsys)
    assert_one_line_error(status, err, "correspondence", f"--parts: {pipe} ", "is a named pipe (FIFO), not a regular file")
    assert not out.exists()


def test_a_folder_or_a_device_as_an_image_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    status, err = zfk(["occlusion", tmp_path, "--out", out], capsys)
    assert_one_line_error(status, err, "occlusion", f"IMAGE: {tmp_path} ", "is a folder, not a file")
    status, err = zfk(["occlusion", "/dev/null", "--out", out], capsys)
    assert_one_line_error(status, err, "occlusion", "IMAGE: /dev/null ", "is a device or a socket, not a regular file")
