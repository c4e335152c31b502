"""``zfk probe``: features against a direct computation, class-balanced subsets, the easy task
separated at every layer, shuffled labels at chance, the outputs and page, and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from _train import one_thread  # noqa: F401 (a fixture)
from _train_data import SIZE, disc_folder
from zfkernels import models
from zfkernels.cli import main
from zfkernels.diagnostics import common as diagnostics_common
from zfkernels.diagnostics import probe
from zfkernels.train import data as train_data

QUICK = ["--resize", str(SIZE), "--crop", "64", "--device", "cpu", "--workers", "0", "--quiet"]
LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]


@pytest.fixture(scope="module")
def discs(tmp_path_factory) -> Path:
    return disc_folder(tmp_path_factory.mktemp("discs"), 16, 12)


def test_conv_features_are_the_pooled_post_relu_maps(discs):
    model = models.zfnet(seed=0).eval()
    _, val = train_data.load_folder(discs)
    paths = [p for p, _ in val.samples[:3]]
    images = torch.stack([TF.pil_to_tensor(TF.center_crop(TF.resize(Image.open(p).convert("RGB"), 70), [64, 64]))
                          for p in paths])
    batches = [(images, torch.tensor([0, 1, 2]))]
    extractor = diagnostics_common.FeatureExtractor(model)
    for pool, grid in (("avg", 1), ("max", 2)):
        features, labels = probe.extract_features(extractor, batches, ["conv1"], pool, grid, torch.device("cpu"))
        x = TF.normalize(images.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        conv1 = F.relu(F.conv2d(x, model.features[0].weight, model.features[0].bias, stride=2, padding=1))  # 30x30
        if pool == "avg":
            expected = conv1.mean(dim=(2, 3))
        else:  # 2x2 cells of 15x15
            expected = conv1.unflatten(2, (2, 15)).unflatten(4, (2, 15)).amax(dim=(3, 5)).flatten(1)
        assert features["conv1"].shape == (3, 96 * grid * grid)
        np.testing.assert_allclose(features["conv1"], expected.detach().numpy(), rtol=1e-4, atol=1e-5)
        assert labels.tolist() == [0, 1, 2]


def test_balanced_subsets_hold_n_distinct_images_of_every_class():
    labels = np.repeat(np.arange(4), [5, 7, 6, 9])
    first = probe.balanced_subset(labels, 5, np.random.default_rng(0))
    assert np.bincount(labels[first]).tolist() == [5, 5, 5, 5] and len(set(first)) == 20
    assert not np.array_equal(first, probe.balanced_subset(labels, 5, np.random.default_rng(1)))
    assert np.array_equal(first, probe.balanced_subset(labels, 5, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="fewer than 6"):
        probe.balanced_subset(labels, 6, np.random.default_rng(0))


@pytest.mark.slow
def test_the_easy_task_is_separated_at_every_layer(discs, tmp_path, one_thread):
    assert main(["probe", "--data", str(discs), "--out", str(tmp_path), "--train-per-class", "4", "12", "--splits", "3",
                 *QUICK]) == 0
    document = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert list(document["layers"]) == LAYERS
    for layer, result in document["layers"].items():
        assert result["top1"]["mean"] >= 0.9, (layer, result)
        assert result["top1"] == result["by_train_per_class"]["12"]
        assert len(result["by_train_per_class"]["4"]["splits"]) == 3
        assert result["top1"]["std"] == pytest.approx(np.std(result["top1"]["splits"]))
    assert document["layers"]["conv1"]["features"] == 96 and document["layers"]["fc7"]["features"] == 4096
    assert "global average pooling" in document["pooling"] and document["chance"] == 0.25
    assert document["images"] == {"train": 64, "val": 48}
    page = (tmp_path / "probe" / "index.html").read_text()
    assert "global average pooling" in page and "UNTRAINED" in page and "probe.png" in page
    assert (tmp_path / "probe" / "probe.png").read_bytes()[:4] == b"\x89PNG"
    assert 'href="probe/index.html"' in (tmp_path / "diagnostics.html").read_text()


@pytest.mark.slow
def test_shuffled_labels_stay_near_chance(tmp_path, one_thread):
    data = disc_folder(tmp_path / "data", 16, 24, seed=3, shuffled=True)
    for classifier in ("softmax", "svm"):
        out = tmp_path / classifier
        assert main(["probe", "--data", str(data), "--out", str(out), "--classifier", classifier, "--layers",
                     "conv1,conv5,fc7", *QUICK]) == 0
        document = json.loads((out / "probe" / "probe.json").read_text())
        for layer, result in document["layers"].items():
            # 96 validation images, chance 0.25: 0.45 is more than 4 standard deviations above it.
            assert result["top1"]["mean"] <= 0.45, (classifier, layer, result)


def refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zfk probe: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_refusals(discs, tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    assert "has only 16 images" in refused(capsys, ["probe", "--data", str(discs), "--train-per-class", "17", *out, *QUICK])
    assert "unknown layer 'conv9'" in refused(capsys, ["probe", "--data", str(discs), "--layers", "conv9", *out, *QUICK])
    alexnet = tmp_path / "alexnet.pth"
    torch.save(models.alexnet(seed=0).state_dict(), alexnet)
    assert "do not fit" in refused(capsys, ["probe", "--data", str(discs), "--weights", str(alexnet), *out, *QUICK])
    assert "do not fit" in refused(capsys, ["probe", "--data", str(discs), "--arch", "zfnet-no-fc6-fc7",
                                            "--weights", str(alexnet), *out, *QUICK])
    assert "no val/ folder" in refused(capsys, ["probe", "--data", str(discs / "train"), *out, *QUICK])
    assert "larger than --resize" in refused(capsys, ["probe", "--data", str(discs), *out, *QUICK, "--resize", "60"])
    assert not (tmp_path / "out").exists()
