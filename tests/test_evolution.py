"""zfk evolution: the strongest activation per checkpoint against a brute-force search over every
image and position, identical checkpoints giving identical columns, and the command."""

from __future__ import annotations

import json

import pytest
import torch

from zfkernels import cli
from zfkernels.job import data as data_mod
from zfkernels import models
from zfkernels.diagnostics import common
from zfkernels.diagnostics.evolution import feature_evolution, montage

from _images import SAMPLE_PHOTOS, load
from _visualize import real_folder

PHOTOS = SAMPLE_PHOTOS[:5]  # sorted, one grayscale
NAMES = [path.name for path in PHOTOS]


@pytest.fixture
def folder(tmp_path):
    return real_folder(tmp_path / "images", PHOTOS)


def brute_force(act: torch.Tensor):
    """(image index, value, y, x) of the largest of one feature map's activations ``(N, H, W)``
    over all images and positions: ties to the earlier image, then the first position in
    row-major order."""
    best = None
    for n in range(act.shape[0]):
        flat = act[n].flatten()
        value = float(flat.max())
        if best is None or value > best[1]:
            position = int(torch.nonzero(flat == flat.max())[0])
            best = (n, value, position // act.shape[-1], position % act.shape[-1])
    return best


def test_strongest_activation_per_checkpoint(folder):
    images = data_mod.discover(folder)
    checkpoints = [models.zfnet(seed=0).eval(), models.zfnet(seed=1).eval(), models.zfnet(seed=0).eval()]
    channels = {"conv1": torch.tensor([0, 5]), "conv3": torch.tensor([2])}
    result = feature_evolution(iter(checkpoints), images, channels, torch.device("cpu"), batch_size=3)
    assert result.projections["conv1"].shape[:2] == (2, 3) and result.projections["conv3"].shape[:2] == (1, 3)
    crops = load(folder, images.files)  # torchvision's evaluation transform
    activations = [common.FeatureExtractor(model)(crops, list(channels)) for model in checkpoints[:2]]
    for layer, picked in channels.items():
        for j, channel in enumerate(picked.tolist()):
            for k, acts in enumerate(activations):
                image, value, y, x = result.entries[layer][j][k]
                ref = brute_force(acts[layer][:, channel])
                assert (image, y, x) == (ref[0], ref[2], ref[3])
                assert value == pytest.approx(ref[1], rel=1e-4)
        assert result.filled[layer].all()
        # The same weights give the same column, bit for bit; other weights another picture.
        assert (result.projections[layer][:, 0] == result.projections[layer][:, 2]).all()
        assert (result.projections[layer][:, 0] != result.projections[layer][:, 1]).any()
    sheet = montage(result.projections["conv1"], result.filled["conv1"], gap=4)
    tile = result.projections["conv1"].shape[2]
    assert sheet.shape == (2 * tile + 4, 3 * tile + 8, 3)
    assert (sheet[tile + 4:, tile + 4:2 * tile + 4] == result.projections["conv1"][1, 1]).all()


def _save(model, path):
    """A checkpoint in half precision (half the file; loading converts it back to float32)."""
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return str(path)


def test_command(folder, tmp_path, capsys):
    first = _save(models.zfnet(seed=0), tmp_path / "epoch1.pth")
    second = _save(models.zfnet(seed=1), tmp_path / "epoch2.pth")
    out = tmp_path / "out"
    argv = ["evolution", "--checkpoints", first, second, "--data", str(folder), "--layers", "conv1,conv2",
            "--features", "0-1", "--limit", "3", "--out", str(out), "-q"]
    assert cli.main(argv) == 0
    document = json.loads((out / "evolution" / "evolution.json").read_text())
    assert document["images"] == 3
    maps = document["layers"]["conv2"]
    assert [m["channel"] for m in maps] == [0, 1] and len(maps[0]["per_checkpoint"]) == 2
    assert maps[0]["per_checkpoint"][0]["image"] in NAMES[:3]
    for name in ("conv1-projections.png", "conv2-patches.png", "index.html"):
        assert (out / "evolution" / name).is_file()
    assert "evolution/index.html" in (out / "diagnostics.html").read_text()


@pytest.fixture
def one_image(tmp_path):
    from PIL import Image

    root = tmp_path / "one"
    root.mkdir()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(root / "a.png")
    return root


def test_checkpoints_of_another_architecture_are_refused(tmp_path, one_image, capsys):
    foreign = tmp_path / "alexnet-like.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11), "features.0.bias": torch.zeros(64)}, foreign)
    argv = ["evolution", "--checkpoints", str(foreign), "--data", str(one_image), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--checkpoints {foreign}: zfnet: weights {foreign} do not fit the architecture" in err
    assert "mis-shaped: features.0.bias" in err and "Traceback" not in err
    assert cli.main(["evolution", "--checkpoints", str(tmp_path / "nope.pth"), "--data", str(one_image)]) == 2
    assert f"--checkpoints: {tmp_path / 'nope.pth'} does not exist" in capsys.readouterr().err


def test_bad_features_and_data(tmp_path, one_image, capsys):
    checkpoint = str(tmp_path / "never-read.pth")  # the arguments are refused before any checkpoint is read
    for extra, message in ((["--data", str(tmp_path / "none")], "--data"),
                           (["--data", str(one_image), "--features", "300"], "--features: 300 is out of range"),
                           (["--data", str(one_image), "--layers", "conv7"], "--layers: unknown layer 'conv7'")):
        assert cli.main(["evolution", "--checkpoints", checkpoint, *extra, "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
