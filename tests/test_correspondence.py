"""zfk correspondence: the Hamming statistic against a plain loop, a case with known answer 0,
random boxes, parts.json validation, and the command on real photographs."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn as nn

from zfkernels import cli
from zfkernels.errors import UsageError
from zfkernels.diagnostics.correspondence import (
    correspondence,
    crop_box,
    pairwise_hamming,
    random_boxes,
    read_parts,
    sign_change,
)

from _images import SAMPLES

PHOTOS = [SAMPLES / name for name in ("astronaut.jpg", "cameraman.jpg", "grace_hopper.jpg")]  # three faces, one grayscale
NAMES = [path.name for path in PHOTOS]


def naive_delta(eps: torch.Tensor) -> int:
    """sum over i < j of the number of components whose signs differ, one by one."""
    signs = [[(v > 0) - (v < 0) for v in row.flatten().tolist()] for row in eps]
    total = 0
    for i, j in itertools.combinations(range(len(signs)), 2):
        total += sum(a != b for a, b in zip(signs[i], signs[j]))
    return total


def test_hamming_statistic_equals_a_plain_loop():
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(5, 3, 4, 4, generator=gen)
    eps[eps.abs() < 0.4] = 0  # plenty of zeros: sign 0 is a value of its own
    result = sign_change(eps)
    assert result.delta == naive_delta(eps)
    assert result.dimension == 48 and result.pairs == 10
    assert result.mean == pytest.approx(naive_delta(eps) / (10 * 48))
    signs = torch.sign(eps.flatten(1))
    h = pairwise_hamming(signs)
    for i in range(5):
        for j in range(5):
            assert int(h[i, j]) == int((signs[i] != signs[j]).sum())
    per_pair = torch.tensor([int(h[i, j]) / 48 for i, j in itertools.combinations(range(5), 2)], dtype=torch.float64)
    assert result.std == pytest.approx(float(per_pair.std()))


def test_zero_counts_against_both_signs():
    eps = torch.tensor([[1.0, 0.0, -1.0, 2.0], [1.0, 3.0, 0.0, 0.0]])
    assert sign_change(eps).delta == 3


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU())
            self.avgpool = nn.AdaptiveAvgPool2d(2)
            self.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_identical_sign_patterns_give_zero(device):
    """The same image four times, occluded at the same place: every eps is the same, Delta = 0;
    a different place in one image breaks it."""
    model = Tiny().eval().to(device)
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(3))
    images = image.expand(4, -1, -1, -1).contiguous().to(device)
    same = torch.tensor([[2, 3, 8, 9]] * 4)
    moved = same.clone()
    moved[0] = torch.tensor([8, 8, 14, 14])
    result = correspondence(model, images, {"same": same, "moved": moved}, ["conv2", "fc7"], trials=3, batch_size=5)
    for layer in ("conv2", "fc7"):
        assert result.parts["same"][layer].delta == 0 and result.parts["same"][layer].mean == 0.0
        assert result.parts["moved"][layer].delta > 0
    assert result.parts["same"]["conv2"].dimension == 4 * 6 * 6 and result.parts["same"]["fc7"].dimension == 8
    assert result.random is not None and len(result.random["fc7"].values) == 3


def test_correspondence_equals_the_definition():
    model = Tiny().eval()
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    boxes = torch.tensor([[0, 0, 5, 5], [4, 6, 9, 11], [10, 10, 16, 16]])
    result = correspondence(model, images, {"part": boxes}, ["conv1"], trials=0)
    with torch.no_grad():
        base = torch.relu(model.features[0](images))
        occluded = images.clone()
        for n, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            occluded[n, :, y0:y1, x0:x1] = 0
        eps = base - torch.relu(model.features[0](occluded))
    assert result.parts["part"]["conv1"].delta == naive_delta(eps)
    assert result.random is None


def test_random_boxes_are_inside_and_seeded():
    sizes = torch.tensor([[10, 20], [224, 5]])
    boxes = random_boxes(sizes, 224, 224, 50, torch.Generator().manual_seed(0))
    assert boxes.shape == (50, 2, 4)
    assert (boxes[..., :2] >= 0).all() and (boxes[..., 2] <= 224).all() and (boxes[..., 3] <= 224).all()
    assert torch.equal(boxes[..., 3] - boxes[..., 1], sizes[:, 0].expand(50, 2))
    assert torch.equal(boxes[..., 2] - boxes[..., 0], sizes[:, 1].expand(50, 2))
    assert torch.equal(boxes, random_boxes(sizes, 224, 224, 50, torch.Generator().manual_seed(0)))
    assert len(set(boxes[:, 0, 0].tolist())) > 10  # they do move


def test_original_coordinates_map_into_the_crop():
    # 512x384: Resize(256) -> 341x256, CenterCrop(224) starts at x = round(58.5) = 58, y = 16.
    assert crop_box([0, 0, 512, 384], (512, 384)) == (0, 0, 224, 224)
    assert crop_box([300, 100, 310, 120], (512, 384)) == (199 - 58, 66 - 16, 207 - 58, 80 - 16)
    with pytest.raises(ValueError, match="outside the 224x224 centre crop"):
        crop_box([0, 0, 40, 40], (512, 384))


def _write(tmp_path, document) -> str:
    path = tmp_path / "parts.json"
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return path


@pytest.mark.parametrize("document, message", [
    ({"parts": {"eye": {"a.jpg": [0, 0, 10, 10]}}}, "part 'eye' has no box for image 'b.jpg'"),
    ({"parts": {"eye": {"a.jpg": [0, 0, 10, 10], "b.jpg": [200, 0, 230, 10]}}}, "box [200, 0, 230, 10] is not inside the 224x224"),
    ({"parts": {"eye": {"a.jpg": [0, 0, 10, 10], "b.jpg": [5, 5, 5, 10]}}}, "not inside"),
    ({"parts": {"eye": {"a.jpg": [0, 0, 10], "b.jpg": [0, 0, 1, 1]}}}, "4 numbers"),
    ({"parts": {"eye": {"a.jpg": [0, 0, 10, 10], "b.jpg": [0, 0, 1, 1], "c.jpg": [0, 0, 1, 1]}}}, "'c.jpg', which is not among --images"),
    ({"coordinates": "original", "parts": {"eye": {"a.jpg": [300, 200, 320, 220], "b.jpg": [0, 0, 700, 10]}}},
     "image 'b.jpg': box [0, 0, 700, 10] is not inside the 640x480 image"),
    ({"coordinates": "original", "parts": {"eye": {"a.jpg": [0, 0, 10, 10], "b.jpg": [0, 0, 1, 1]}}},
     "image 'a.jpg': the box lies outside the 224x224 centre crop"),
    ({"coordinates": "pixels", "parts": {}}, "expected"),
    ({"coordinates": "pixels", "parts": {"eye": {}}}, "\"coordinates\" must be one of crop, original"),
    ("{not json", "not a readable JSON file"),
])
def test_bad_parts_files(tmp_path, document, message):
    path = _write(tmp_path, document)
    from pathlib import Path

    with pytest.raises(UsageError) as error:
        read_parts(path, [Path("x/a.jpg"), Path("y/b.jpg")], [(640, 480), (640, 480)])
    assert message in str(error.value) and str(path) in str(error.value)


def test_command_on_real_photographs(tmp_path, capsys):
    parts = {"centre": {NAMES[0]: [90, 90, 130, 130], NAMES[1]: [80, 80, 120, 120], NAMES[2]: [100, 90, 140, 130]},
             "corner": {NAMES[0]: [0, 0, 40, 40], NAMES[1]: [10, 10, 50, 50], NAMES[2]: [0, 0, 40, 40]}}
    path = _write(tmp_path, {"parts": parts})
    out = tmp_path / "out"
    argv = ["correspondence", "--images", *map(str, PHOTOS), "--parts", str(path),
            "--trials", "2", "--out", str(out), "-q"]
    assert cli.main(argv) == 0
    document = json.loads((out / "correspondence" / "correspondence.json").read_text())
    assert document["layers"] == ["conv5", "fc7"]
    assert document["parts"]["centre"]["conv5"]["dimension"] == 256 * 13 * 13
    assert document["parts"]["centre"]["fc7"]["pairs"] == 3
    assert len(document["random"]["boxes"]) == 2 and len(document["random"]["fc7"]["values"]) == 2
    for name in ("centre", "corner"):
        assert 0 <= document["parts"][name]["conv5"]["mean"] <= 1
    page = (out / "correspondence" / "index.html").read_text()
    assert "<td>Random</td>" in page and "<td>centre</td>" in page
    assert (out / "correspondence" / "table.png").is_file()
    capsys.readouterr()
    assert cli.main(argv[:-3] + ["--layers", "conv9", "--out", str(out)]) == 2
    assert "--layers: unknown layer 'conv9'" in capsys.readouterr().err


def test_command_refuses_missing_images_and_single_images(tmp_path, capsys):
    path = _write(tmp_path, {"parts": {"eye": {"a.jpg": [0, 0, 1, 1]}}})
    assert cli.main(["correspondence", "--images", str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "--parts", str(path),
                     "--out", str(tmp_path / "out")]) == 2
    assert "--images: " + str(tmp_path / "a.jpg") + " does not exist" in capsys.readouterr().err
    assert cli.main(["correspondence", "--images", str(tmp_path / "a.jpg"), "--parts", str(path),
                     "--out", str(tmp_path / "out")]) == 2
    assert "at least two" in capsys.readouterr().err
