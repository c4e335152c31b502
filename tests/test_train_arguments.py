"""``zfk train`` and ``zfk probe`` check what they are given before anything is written: every
option's range (one line naming it, exit status 2, no --out folder), the sizes the network takes,
the weights, the data's readable images; and ``train-state.pth`` part by part when a run is
resumed. A run whose loss stops being finite, or whose training images cannot be read, stops
with one line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
import torch

from _train import QUICK, REPO, env, one_thread, single_thread  # noqa: F401 (one_thread: a fixture)
from _train_data import disc_folder
from zfkernels import cli, models
from zfkernels.train import build_network

HUGE = str(10**23)
# A run that would be short if an option were not refused (the option tested comes after: the last wins).
SHORT = ["--epochs", "1", "--batch-size", "4", "--workers", "0", *QUICK]
PROBE_QUICK = ["--resize", "72", "--crop", "64", "--device", "cpu", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return disc_folder(tmp_path_factory.mktemp("data"), 3, 2)


def zfk(argv: List[object], capsys) -> Tuple[int, str]:
    """``zfk ARGV`` in this process: (exit status, stderr), argparse's refusals included."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


def refused(argv: List[object], capsys, *fragments: str) -> str:
    """The one line of a refusal (the untrained-network warning aside), with each fragment in it."""
    status, err = zfk(argv, capsys)
    lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING: no --weights given")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"zfk {argv[0]}: error: "), lines[0]
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


# -- zfk train: options ---------------------------------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "inf", "--lr: must be a finite number > 0"),
    ("--lr", "nan", "--lr: must be a finite number > 0"),
    ("--momentum", "inf", "--momentum: must be a number >= 0 and < 1"),
    ("--momentum", "1", "--momentum: must be a number >= 0 and < 1"),
    ("--weight-decay", "1e400", "--weight-decay: must be a finite number >= 0"),
    ("--init-std", "inf", "--init-std: must be a finite number > 0"),
    ("--renorm", "inf", "--renorm: must be a finite number >= 0"),
    ("--dropout", "5", "--dropout: must be a number >= 0 and < 1"),
    ("--dropout", "1", "--dropout: must be a number >= 0 and < 1"),
    ("--width", "inf", "--width: must be a number > 0 and <= 2"),
    ("--width", "100", "--width: must be a number > 0 and <= 2"),
    ("--seed", str(2**64), "--seed: must be an integer from 0 to 18446744073709551615"),
    ("--seed", HUGE, "--seed: must be an integer from 0 to 18446744073709551615"),
    ("--seed", "-1", "--seed: must be an integer from 0"),
    ("--epochs", "1000", "--epochs: must be an integer from 1 to 999"),
    ("--batch-size", "0", "--batch-size: must be an integer from 1"),
    ("--resize", "1000000", "--resize: must be an integer from 1 to 2048"),
    ("--crop", "9" * 5000, "--crop: expected an integer, got '9999"),
    ("--warmup", "-1", "--warmup: must be an integer from 0"),
    ("--workers", "100", "--workers: must be from 0 to"),
])
def test_train_refuses_values_out_of_range(option, value, message, data, tmp_path, capsys):
    refused(["train", "--data", data, "--out", tmp_path / "out", *SHORT, option, value], capsys, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("crop", ["1", "32", "62"])
def test_train_refuses_crops_smaller_than_the_network_takes(crop, data, tmp_path, capsys):
    # ZFNet's pool5 (3x3, stride 2, no ceiling) needs conv5's maps at least 3x3, which a 63-pixel image gives.
    refused(["train", "--data", data, "--out", tmp_path / "out", *SHORT, "--resize", "64", "--crop", crop], capsys,
            f"--crop {crop}: zfnet", "at least 63x63 pixels")
    assert not (tmp_path / "out").exists()


def test_the_smallest_crop_is_the_smallest_the_network_takes(data, tmp_path):
    network = build_network("zfnet", width=0.25)
    network(torch.zeros(1, 3, 63, 63))  # the bound itself runs
    with pytest.raises(RuntimeError, match="too small"):
        network(torch.zeros(1, 3, 62, 62))


def test_train_refuses_weights_holding_nan(data, tmp_path, capsys):
    weights = build_network("zfnet", width=0.25).state_dict()
    weights["features.4.weight"][0, 0, 0, 0] = math.nan
    torch.save(weights, tmp_path / "nan.pth")
    refused(["train", "--data", data, "--out", tmp_path / "out", "--weights", tmp_path / "nan.pth", *SHORT], capsys,
            "--weights", "features.4.weight holds NaN")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_largest_seed_trains(data, tmp_path, capsys, one_thread):
    """Every stream the run derives from its seed (dropout's, each epoch's order and crops) stays
    in torch's range: 2^64 - 1 trains, as 0 does."""
    status, err = zfk(["train", "--data", data, "--out", tmp_path / "run", "--seed", 2**64 - 1, "--epochs", "2",
                       "--batch-size", "6", "--workers", "0", *QUICK, "--quiet"], capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]["seed"] == 2**64 - 1


def test_default_workers_fit_the_cpus(data, tmp_path):
    """On one CPU the default is one data-loading process: no PyTorch warning about too many
    workers, even under --quiet."""
    program = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
               "from zfkernels.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", program, "train", "--data", str(data), "--out", str(tmp_path / "run"),
                             "--epochs", "1", "--batch-size", "3", *QUICK, "--quiet"],
                            env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "worker" not in result.stderr and "Warning" not in result.stderr, result.stderr


# -- zfk train: a run that cannot go on ----------------------------------------------------------


@pytest.mark.slow
def test_a_diverged_run_stops_with_one_line_and_is_not_resumed(data, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    status, err = zfk(["train", "--data", data, "--out", out, "--lr", "1e6", "--epochs", "3", "--batch-size", "6",
                       "--workers", "0", *QUICK, "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "the training loss stopped being finite in epoch" in lines[0] and "diverged" in lines[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["diverged"]["epoch"] == len(metrics["epochs"]) + 1
    assert all(math.isfinite(row["train_loss"]) for row in metrics["epochs"])
    refused(["train", "--resume", "--out", out], capsys, "the run diverged", "nothing to continue")


@pytest.mark.slow
def test_training_images_that_cannot_be_read_stop_the_run_with_one_line(tmp_path, capsys, one_thread):
    folder = disc_folder(tmp_path / "data", 2, 1)
    for picture in (folder / "train").rglob("*.png"):
        picture.write_bytes(b"not an image")
    status, err = zfk(["train", "--data", folder, "--out", tmp_path / "run", "--epochs", "2", "--batch-size", "4",
                       "--workers", "0", *QUICK, "--quiet"], capsys)
    lines = [line for line in err.strip().splitlines() if not line.startswith("skipped ")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "no image of train/ could be read in epoch 1" in lines[0]


# -- zfk train: the state a resumed run reads ------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(data, tmp_path_factory) -> Path:
    """A quarter-width run stopped after its first epoch of two (its state says epoch 1, step 0)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    with single_thread():
        assert cli.main(["train", "--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "4",
                         "--workers", "0", *QUICK, "--quiet"]) == 0
    state = torch.load(out / "train-state.pth", weights_only=True)
    state["progress"]["epoch"] = 1
    state["progress"]["metrics"] = state["progress"]["metrics"][:1]
    torch.save(state, out / "train-state.pth")
    return out


def set_path(state: Dict[str, object], path: str, value: object) -> None:
    """``state["a"]["b"][0] = value`` for ``"a.b.0"`` (numbers index lists and the optimizer's state)."""

    def key(container: object, name: str) -> object:
        return int(name) if name.isdigit() and (isinstance(container, list) or int(name) in container) else name

    *parents, last = path.split(".")
    for name in parents:
        state = state[key(state, name)]
    state[key(state, last)] = value


ALEXNET = models.alexnet(seed=0).state_dict()
EDITS: List[Tuple[str, Callable[[Dict[str, object]], None], str]] = [
    ("negative epoch", lambda s: set_path(s, "progress.epoch", -1), "progress: epoch -1 is not from 0 to 2"),
    ("epoch past the last", lambda s: set_path(s, "progress.epoch", 7), "progress: epoch 7 is not from 0 to 2"),
    ("negative step", lambda s: set_path(s, "progress.step", -5), "progress: step -5 is not from 0 to 3"),
    ("step past the epoch", lambda s: set_path(s, "progress.step", 10**6), "progress: step 1000000 is not from 0 to 3"),
    ("batch size 0", lambda s: set_path(s, "config.recipe.batch_size", 0), "config: batch_size must be an integer from 1"),
    ("NaN lr", lambda s: set_path(s, "config.recipe.lr", math.nan), "config: lr must be a finite number > 0"),
    ("config a string", lambda s: set_path(s, "config", "zfnet"), "config is a str, not a dict"),
    ("crop 10^6", lambda s: set_path(s, "config.crop", 10**6), "config: crop must be an integer from 1 to 2048"),
    ("unknown arch", lambda s: set_path(s, "config.arch", "resnet"), "config: arch must be one of zfnet"),
    ("extra recipe field", lambda s: set_path(s, "config.recipe.colour", "red"), "config: recipe: unexpected 'colour'"),
    ("AlexNet weights", lambda s: set_path(s, "model", ALEXNET), "model: the tensors do not fit the network: missing"),
    ("NaN weight", lambda s: s["model"]["features.0.weight"].view(-1).__setitem__(0, math.nan),
     "model: features.0.weight holds NaN"),
    ("classes None", lambda s: set_path(s, "classes", None), "classes None is not a list of class names"),
    ("progress None", lambda s: set_path(s, "progress", None), "progress is a NoneType, not a dict"),
    ("metrics a string", lambda s: set_path(s, "progress.metrics", "x"), "progress: metrics is not a list of 1 epochs"),
    ("loss NaN", lambda s: set_path(s, "progress.loss_sum", math.nan), "progress: loss_sum nan is not a finite number"),
    ("optimizer lr inf", lambda s: set_path(s, "optimizer.param_groups.0.lr", math.inf), "optimizer: lr inf is not > 0"),
    ("momentum changed", lambda s: set_path(s, "optimizer.param_groups.0.momentum", 5.0),
     "optimizer: momentum 5.0 is not the recipe's 0.9"),
    ("momentum buffer mis-shaped", lambda s: set_path(s, "optimizer.state.0.momentum_buffer", torch.zeros(3)),
     "optimizer: momentum_buffer: the tensors do not fit the network: mis-shaped 0 ((3,)"),
    ("schedule drops negative", lambda s: set_path(s, "schedule.drops", -1), "schedule: drops -1 is not from 0 to 2"),
    ("schedule missing", lambda s: s.pop("schedule"), "schedule is a NoneType, not a dict"),
    ("rng a short tensor", lambda s: set_path(s, "rng.0.cpu", torch.zeros(3, dtype=torch.uint8)),
     "rng of process 0: cpu is not a generator state"),
    ("rng of 2 processes", lambda s: set_path(s, "rng", s["rng"] * 2), "the run used 2 process(es), this one 1"),
    ("device a number", lambda s: set_path(s, "device", 5), "device '5' is neither cpu nor cuda"),
    ("diverged", lambda s: set_path(s, "progress.diverged", {"epoch": 1, "step": 2}), "the run diverged"),
    ("another version", lambda s: set_path(s, "version", 1), "is of another version"),
]


@pytest.mark.parametrize("edit, message", [(e, m) for _, e, m in EDITS], ids=[name for name, _, _ in EDITS])
def test_a_hand_edited_state_is_refused_saying_what_is_wrong(saved_run, edit, message, tmp_path, capsys):
    state = torch.load(saved_run / "train-state.pth", weights_only=True)
    edit(state)
    out = tmp_path / "run"
    out.mkdir()
    torch.save(state, out / "train-state.pth")
    line = refused(["train", "--resume", "--out", out, "--workers", "0"], capsys, message)
    assert "--resume" in line
    assert sorted(p.name for p in out.iterdir()) == ["train-state.pth"]  # nothing written


@pytest.mark.slow
def test_the_unedited_state_resumes(saved_run, tmp_path, capsys, one_thread):
    """(The refusals above come from the edits, not from the saved run.)"""
    out = tmp_path / "run"
    out.mkdir()
    (out / "train-state.pth").write_bytes((saved_run / "train-state.pth").read_bytes())
    status, err = zfk(["train", "--resume", "--out", out, "--workers", "0", "--quiet"], capsys)
    assert status == 0, err
    assert (out / "epoch-002.pth").is_file()


# -- zfk probe -------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("--seed", "-1", "--seed: must be from 0 to 18446744073709551615"),
    ("--seed", HUGE, "--seed: must be from 0 to 18446744073709551615"),
    ("--width", "inf", "--width: must be a number > 0 and <= 2"),
    ("--resize", "1000000", "--resize: must be an integer from 1 to 2048"),
    ("--workers", "100", "--workers: must be from 0 to"),
])
def test_probe_refuses_values_out_of_range(option, value, message, data, tmp_path, capsys):
    refused(["probe", "--data", data, "--out", tmp_path / "out", "--layers", "conv1", *PROBE_QUICK, option, value], capsys,
            message)
    assert not (tmp_path / "out").exists()


def test_probe_refuses_a_grid_finer_than_the_maps(data, tmp_path, capsys):
    # conv3's to conv5's maps are 3x3 at a 64-pixel crop: at most 3 x 3 cells (100000 x 100000: 30 TB).
    for grid in ("4", "100000"):
        refused(["probe", "--data", data, "--out", tmp_path / "out", "--grid", grid, *PROBE_QUICK], capsys,
                f"--grid {grid}: conv3's maps are 3x3 at --crop 64", "at most 3 x 3 cells")
    refused(["probe", "--data", data, "--out", tmp_path / "out", "--grid", "16", "--layers", "conv1,conv2",
             *PROBE_QUICK], capsys, "--grid 16: conv2's maps are 6x6 at --crop 64", "at most 6 x 6 cells")
    assert not (tmp_path / "out").exists()


def test_probe_names_the_crop_when_the_images_are_too_small(data, tmp_path, capsys):
    refused(["probe", "--data", data, "--out", tmp_path / "out", *PROBE_QUICK, "--resize", "30", "--crop", "30"], capsys,
            "--crop 30: zfnet takes images of at least 63x63 pixels")
    assert not (tmp_path / "out").exists()


def test_probe_refuses_one_class(tmp_path, capsys):
    folder = disc_folder(tmp_path / "data", 2, 1, classes=("red",))
    refused(["probe", "--data", folder, "--out", tmp_path / "out", *PROBE_QUICK], capsys,
            "one class (red); a classifier needs two")
    assert not (tmp_path / "out").exists()


def test_probe_refuses_weights_holding_nan(data, tmp_path, capsys):
    weights = models.zfnet(seed=0).state_dict()
    weights["classifier.1.weight"][3, 3] = math.inf
    torch.save(weights, tmp_path / "inf.pth")
    refused(["probe", "--data", data, "--out", tmp_path / "out", "--weights", tmp_path / "inf.pth", *PROBE_QUICK],
            capsys, "--weights", "classifier.1.weight holds NaN or infinite values")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_probe_counts_only_readable_training_images(tmp_path, capsys, one_thread):
    folder = disc_folder(tmp_path / "data", 3, 2)
    (folder / "train" / "red" / "000.png").write_bytes(b"broken")
    refused(["probe", "--data", folder, "--out", tmp_path / "out", "--layers", "conv1", "--train-per-class", "3",
             *PROBE_QUICK], capsys, "--train-per-class 3: train/red/ has only 2 readable images",
            "1 of its 3 images could not be read")
    for picture in (folder / "train" / "red").iterdir():
        picture.write_bytes(b"broken")
    refused(["probe", "--data", folder, "--out", tmp_path / "out", "--layers", "conv1", *PROBE_QUICK], capsys,
            "train/red/ has no readable image", "needs every class")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_probe_takes_a_checkpoint_of_another_width(data, tmp_path, capsys, one_thread):
    """zfk train --width 0.25's checkpoints load into zfk probe --width 0.25 (and only at that
    width); the largest seed is taken too (scikit-learn's seeds are 32-bit)."""
    run = tmp_path / "run"
    assert zfk(["train", "--data", data, "--out", run, "--epochs", "1", "--batch-size", "6", "--workers", "0", *QUICK,
                "--quiet"], capsys)[0] == 0
    weights = run / "epoch-001.pth"
    refused(["probe", "--data", data, "--out", tmp_path / "out", "--weights", weights, *PROBE_QUICK], capsys,
            "do not fit the architecture")
    refused(["probe", "--data", data, "--out", tmp_path / "out", "--arch", "alexnet", "--width", "0.25",
             *PROBE_QUICK], capsys, "--width 0.25: alexnet has one width")
    status, err = zfk(["probe", "--data", data, "--out", tmp_path / "look", "--weights", weights, "--width", "0.25",
                       "--layers", "conv1,fc7", "--classifier", "svm", "--seed", 2**64 - 1, *PROBE_QUICK], capsys)
    assert status == 0, err
    document = json.loads((tmp_path / "look" / "probe" / "probe.json").read_text())
    assert document["layers"]["conv1"]["features"] == 24 and document["layers"]["fc7"]["features"] == 1024
