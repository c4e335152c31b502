"""zfk filters: per-filter normalisation, the grid layout, the two models' layer-1 geometry, and
the command with a second model and layer-2 projections."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zfkernels import cli, models
from zfkernels.errors import UsageError
from zfkernels.diagnostics.common import FeatureExtractor, paper_layers
from zfkernels.diagnostics.filters import filter_grid, first_conv, layer2_sheet, normalise_filters, parse_compare

from _images import SAMPLES
from _visualize import brute_force_topk, real_folder


def test_each_filter_is_normalised_on_its_own():
    weight = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1, 10, 0.1, 3, 1]).view(5, 1, 1, 1)
    weight[4] = 0.7  # a constant filter
    out = normalise_filters(weight)
    for c in range(4):
        w = weight[c].double().numpy()
        expected = (w - w.min()) / (w.max() - w.min())
        np.testing.assert_allclose(out[c].numpy(), expected, rtol=1e-6, atol=1e-7)
        assert float(out[c].min()) == 0.0 and float(out[c].max()) == 1.0
    assert (out[4] == 0.5).all()


def test_grid_places_filter_c_at_row_c_over_columns():
    weight = torch.randn(7, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    grid = filter_grid(weight, columns=3, gap=2)
    assert grid.shape == (3 * 5 + 2 * 2, 3 * 5 + 2 * 2, 3) and grid.dtype == np.uint8
    pixels = (normalise_filters(weight) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for c in range(7):
        y, x = (c // 3) * 7, (c % 3) * 7
        assert (grid[y:y + 5, x:x + 5] == pixels[c]).all()
    assert (grid[14:, 7:] == 255).all()  # cells 7 and 8 are empty
    with pytest.raises(ValueError, match="RGB filters"):
        filter_grid(torch.zeros(4, 2, 3, 3))


def test_layer1_geometry_of_the_two_models():
    zf, alex = first_conv(models.zfnet(seed=0)), first_conv(models.alexnet(seed=0))
    assert (zf.kernel_size, zf.stride, zf.out_channels) == ((7, 7), (2, 2), 96)
    assert (alex.kernel_size, alex.stride, alex.out_channels) == ((11, 11), (4, 4), 64)
    assert filter_grid(zf.weight).shape == (10 * 7 + 9, 10 * 7 + 9, 3)  # 96 filters: 10 columns


def test_the_papers_layers_on_the_zoo():
    """Layers 1, 2, 5, 7 of each architecture, and fc7 = the classifier's second ReLU output."""
    expected = {"zfnet": ("conv1", "conv2", "conv5", "fc7"), "alexnet": ("conv1", "conv2", "conv5", "fc7"),
                "vgg16": ("conv1_1", "conv1_2", "conv5_3", "fc7")}
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for arch, names in expected.items():
        model = models.build(arch, seed=0).eval()
        layers = paper_layers(model)
        assert (layers.layer1, layers.layer2, layers.layer5, layers.layer7) == names
        if arch == "alexnet":
            out = FeatureExtractor(model)(x, ["conv5", "fc7", "logits"])
            with torch.no_grad():
                flat = torch.flatten(model.avgpool(model.features(x)), 1)
                fc7 = model.classifier[:6](flat)
                torch.testing.assert_close(out["fc7"], fc7)
                torch.testing.assert_close(out["logits"], model(x))
                torch.testing.assert_close(out["conv5"], model.features[:12](x))


def test_compare_argument():
    assert parse_compare("alexnet").arch == "alexnet" and parse_compare("alexnet").weights is None
    assert parse_compare("alexnet:torchvision").weights == "torchvision"
    assert parse_compare("vgg16:/w/v.pth").weights == "/w/v.pth"
    with pytest.raises(UsageError, match="--compare: unknown architecture 'resnet'"):
        parse_compare("resnet:x.pth")


def test_layer2_sheet():
    tiles = np.zeros((3, 4, 6, 6, 3), dtype=np.uint8)
    filled = np.ones((3, 4), dtype=bool)
    filled[2, 3] = False
    sheet = layer2_sheet(tiles, filled, columns=2)
    cell = 2 * 6 + 1
    assert sheet.shape == (2 * cell + 6, 2 * cell + 6, 3)
    assert (sheet[cell + 6 + 7:cell + 6 + 13, 7:13] == 255).all()  # the missing entry of map 2 is blank


def test_command_two_models_and_layer2(tmp_path, capsys):
    photos = [SAMPLES / name for name in ("cameraman.jpg", "chelsea_cat.jpg", "coffee.jpg")]  # one grayscale
    names = [path.name for path in photos]
    data = real_folder(tmp_path / "images", photos)
    out = tmp_path / "out"
    argv = ["filters", "--compare", "alexnet", "--data", str(data), "--features", "0-1", "--top", "2", "--out", str(out), "-q"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err.count("UNTRAINED") == 2
    document = json.loads((out / "filters" / "filters.json").read_text())
    zf, alex = document["models"]
    assert zf["layer1"]["kernel"] == [7, 7] and zf["layer1"]["stride"] == [2, 2]
    assert alex["layer1"]["kernel"] == [11, 11] and alex["layer1"]["stride"] == [4, 4]
    assert len(zf["layer1"]["min"]) == 96 and len(alex["layer1"]["max"]) == 64
    assert zf["layer2"]["layer"] == "conv2" and [m["channel"] for m in zf["layer2"]["maps"]] == [0, 1]
    assert len(zf["layer2"]["maps"][0]["top"]) == 2
    # Each model's own selections (both call layer 2 conv2, so a mix-up shows only in the values).
    for entry, model in ((zf, models.zfnet(seed=0)), (alex, models.alexnet(seed=0))):
        want = brute_force_topk(model.eval(), data, names, ["conv2"], [0, 1], 2, 32)["conv2"]
        got = entry["layer2"]["maps"]
        assert [[(t["image"], t["y"], t["x"]) for t in m["top"]] for m in got] == \
            [[(t["image"], t["y"], t["x"]) for t in m["top"]] for m in want]
        np.testing.assert_allclose([[t["value"] for t in m["top"]] for m in got],
                                   [[t["value"] for t in m["top"]] for m in want], rtol=1e-5)
    for name in ("layer1.png", "layer2-0-zfnet.png", "layer2-1-alexnet.png", "index.html"):
        assert (out / "filters" / name).is_file()
    assert cli.main(["filters", "--compare", "lenet", "--out", str(out)]) == 2
    assert "--compare: unknown architecture 'lenet'" in capsys.readouterr().err
    assert cli.main(["filters", "--weights", str(tmp_path / "missing.pth"), "--out", str(out)]) == 2
    assert "missing.pth does not exist" in capsys.readouterr().err
