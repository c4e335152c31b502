"""zfk invariance: what each transform does to the pixels, zero distance at the identity, the
curves of a translation-equivariant constructed model in closed form, and the command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from zfkernels import cli
from zfkernels.job import data as data_mod
from zfkernels.diagnostics.invariance import invariance_curves, resized, transform_images, window_origin

from _images import GRAYSCALE, SAMPLES, imagenet


@pytest.mark.parametrize("path", [SAMPLES / "chelsea_cat.jpg", SAMPLES / GRAYSCALE] + imagenet(["n01443537_goldfish.JPEG"]),
                         ids=lambda p: p.name)
def test_identity_is_the_evaluation_crop(path):
    image = data_mod.normalize(resized(path).unsqueeze(0))[0]
    expected = data_mod.normalize(data_mod.load_crop(path).unsqueeze(0))[0]
    for transform, identity in (("translate", 0), ("scale", 1), ("rotate", 0)):
        assert torch.equal(transform_images(image, transform, [identity])[0], expected)


def test_translation_moves_the_content_down_and_fills_with_the_mean():
    image = torch.zeros(3, 256, 300)
    top, left = window_origin(256, 300)
    image[:, top + 50, left + 7] = 1.0
    out = transform_images(image, "translate", [-30, 0, 30, 200])
    for k, d in enumerate((-30, 0, 30)):
        assert torch.nonzero(out[k, 0]).tolist() == [[50 + d, 7]]
    image[:] = 1.0
    out = transform_images(image, "translate", [40, -40])
    assert (out[0, :, :40 - top] == 0).all() and (out[0, :, 40 - top:] == 1).all()  # rows above the image: mean
    assert (out[1, :, 224 - (40 - (256 - 224 - top)):] == 0).all()


def test_rotation_turns_counter_clockwise_and_scale_magnifies():
    image = torch.randn(3, 250, 250, generator=torch.Generator().manual_seed(0))
    crop = transform_images(image, "rotate", [0])[0]
    quarter = transform_images(image, "rotate", [90])[0]
    torch.testing.assert_close(quarter, torch.rot90(crop, 1, dims=(1, 2)), rtol=1e-4, atol=1e-4)
    # A ramp along the rows (value = distance of the pixel centre from the window's centre):
    # magnified s times, the value at offset r is r / s.
    top, _ = window_origin(250, 250)
    ramp = (torch.arange(250, dtype=torch.float32) + 0.5 - (top + 112)).view(1, 250, 1).expand(3, 250, 250).contiguous()
    scaled = transform_images(ramp, "scale", [1.5])[0]
    expected = (torch.arange(224, dtype=torch.float32) + 0.5 - 112) / 1.5
    torch.testing.assert_close(scaled[0, :, 100], expected, rtol=1e-4, atol=1e-4)


def test_unknown_transform_and_bad_values():
    image = torch.zeros(3, 256, 256)
    with pytest.raises(ValueError, match="unknown transform 'shear'"):
        transform_images(image, "shear", [1])
    with pytest.raises(ValueError, match="whole pixels"):
        transform_images(image, "translate", [0.5])
    with pytest.raises(ValueError, match="smaller than the 224x224 window"):
        transform_images(torch.zeros(3, 200, 256), "rotate", [10])


class Equivariant(nn.Module):
    """Layer 1 is relu(channel mean): translation-equivariant. Layer 7 sees the global average
    of that map: translation-invariant while the content stays in view."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 1, 1, bias=False)
        conv.weight.data.fill_(1 / 3)
        self.features = nn.Sequential(conv, nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
        for module in self.classifier:
            if isinstance(module, nn.Linear):
                module.weight.data.fill_(0.5)
                module.bias.data.fill_(0.1)


def test_translation_curves_of_an_equivariant_model(device):
    side = 20
    image = torch.zeros(3, 260, 300)
    top, left = window_origin(260, 300)
    image[:, top + 100:top + 100 + side, left + 90:left + 90 + side] = 2.0
    shifts = list(range(-40, 41, 5))
    curves = invariance_curves(Equivariant().eval().to(device), [image.to(device)], [1], "translate", shifts,
                               ["conv1", "fc7"], batch_size=6)
    # Shifted by d rows, a side x side square differs from itself on 2 * min(|d|, side) * side pixels.
    expected = torch.tensor([math.sqrt(2 * min(abs(d), side) / side) for d in shifts], dtype=torch.float64)
    torch.testing.assert_close(curves.distance["conv1"][0], expected, rtol=1e-6, atol=1e-6)
    assert curves.distance["conv1"][0, shifts.index(0)] == 0
    torch.testing.assert_close(curves.distance["fc7"][0], torch.zeros(len(shifts), dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.allclose(curves.probability[0], curves.probability[0, shifts.index(0)], atol=1e-6)


def test_zero_distance_at_the_identity_on_a_real_model():
    from zfkernels import models

    model = models.zfnet(seed=0).eval()
    image = data_mod.normalize(resized(SAMPLES / "chelsea_cat.jpg").unsqueeze(0))[0]
    curves = invariance_curves(model, [image], [0], "rotate", [0, 30], ["conv1", "fc7"])
    for layer in ("conv1", "fc7"):
        assert float(curves.distance[layer][0, 0]) < 1e-6
        assert float(curves.distance[layer][0, 1]) > 1e-3
    assert curves.probability.shape == (1, 2)


def test_command_on_a_real_photograph(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["invariance", str(SAMPLES / "coffee.jpg"), "--label", "967", "--transform", "translate",  # 967: espresso
            "--values=-16,0,16", "--out", str(out), "-q"]
    assert cli.main(argv) == 0
    document = json.loads((out / "invariance" / "invariance.json").read_text())
    sweep = document["transforms"]["translate"]
    assert sweep["values"] == [-16.0, 0.0, 16.0]
    assert document["layers"] == {"1": "conv1", "7": "fc7"}
    for layer in ("conv1", "fc7"):
        assert sweep["distance"][layer][0][1] < 1e-6 and sweep["distance"][layer][0][0] > 0
    assert (out / "invariance" / "translate.png").is_file()
    assert "invariance/index.html" in (out / "diagnostics.html").read_text()


def test_command_refuses_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["invariance", "x.jpg", "--transform", "shear"])
    assert stop.value.code == 2
    assert "invalid choice: 'shear'" in capsys.readouterr().err
    for extra, message in ((["--transform", "scale", "rotate", "--values", "1,2"], "--values: give exactly one --transform"),
                           (["--transform", "translate", "--values", "0.5"], "--values: translations are whole pixels"),
                           (["--transform", "scale", "--values", "a,b"], "--values: 'a,b' is not"),
                           ([], "IMAGE: " + str(tmp_path / "n01440764_missing.jpg") + " does not exist")):
        assert cli.main(["invariance", str(tmp_path / "n01440764_missing.jpg"), *extra, "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
