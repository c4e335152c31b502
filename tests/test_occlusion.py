"""zfk occlusion: the batched maps against one forward per position, a constructed model whose
answer is known in closed form, the grid, and the command on real photographs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn as nn

from zfkernels import cli, models
from zfkernels.diagnostics import common
from zfkernels.diagnostics.occlusion import occlusion_grid, occlusion_maps, project_strongest, strongest_map

from _images import SAMPLES


class Tiny(nn.Module):
    """A small zoo-style network (features / avgpool / classifier) for exact comparisons."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
            self.avgpool = nn.AdaptiveAvgPool2d(2)
            self.classifier = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_grid_covers_the_image_with_squares_centred_on_stride_blocks():
    rows, cols = occlusion_grid(224, 224, 50, 8)
    assert rows.shape == (28, 2) and torch.equal(rows, cols)
    assert rows[0].tolist() == [0, 29]  # centred on pixel 4: [4 - 25, 4 + 25) clipped
    assert rows[-1].tolist() == [195, 224]
    assert rows[10].tolist() == [84 - 25, 84 + 25]
    covered = torch.zeros(224, dtype=torch.bool)
    for y0, y1 in rows.tolist():
        covered[y0:y1] = True
    assert covered.all()
    rows, _ = occlusion_grid(30, 30, 7, 4)  # 30 is no multiple of 4: ceil(30 / 4) = 8 cells
    assert rows.shape == (8, 2) and rows[-1].tolist() == [27, 30]


def test_maps_equal_one_forward_per_position(device):
    model = Tiny().eval()
    image = torch.randn(3, 20, 18, generator=torch.Generator().manual_seed(1))
    fill = torch.tensor([0.3, -0.2, 0.1])
    size, stride, channel, target = 7, 5, 3, 2
    maps = occlusion_maps(Tiny().eval().to(device), image.to(device), layer="conv2", channel=channel, target=target,
                          size=size, stride=stride, fill=fill, batch_size=4)
    n_rows, n_cols = math.ceil(20 / stride), math.ceil(18 / stride)
    assert maps.activation.shape == (n_rows, n_cols)
    for i in range(n_rows):
        for j in range(n_cols):
            y0, x0 = i * stride + stride // 2 - size // 2, j * stride + stride // 2 - size // 2
            y1, x1 = min(20, y0 + size), min(18, x0 + size)
            y0, x0 = max(0, y0), max(0, x0)
            assert maps.rows[i].tolist() == [y0, y1] and maps.cols[j].tolist() == [x0, x1]
            copy = image.clone()
            copy[:, y0:y1, x0:x1] = fill[:, None, None]
            with torch.no_grad():
                total = model.features(copy[None])[0, channel].sum()
                p = torch.softmax(model(copy[None])[0], 0)
            torch.testing.assert_close(maps.activation[i, j], total, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(maps.probability[i, j], p[target], rtol=1e-5, atol=1e-6)
            assert int(maps.top_class[i, j]) == int(p.argmax())
            torch.testing.assert_close(maps.top_probability[i, j], p.max(), rtol=1e-5, atol=1e-6)


class RegionModel(nn.Module):
    """Logit 0 = 10 x the visible fraction of a region R of a 32x32 all-ones image, logit 1 = 5:
    p(class 0) = 1 / (1 + exp(5 - 10 v)) is known for every occluder position."""

    def __init__(self, region: tuple) -> None:
        super().__init__()
        y0, y1, x0, x1 = region
        conv = nn.Conv2d(3, 1, 1, bias=False)
        conv.weight.data.fill_(1 / 3)  # the channel mean: 1 where visible, 0 where occluded
        self.features = nn.Sequential(conv, nn.ReLU())
        self.avgpool = nn.Identity()
        linear = nn.Linear(32 * 32, 2)
        linear.weight.data.zero_()
        mask = torch.zeros(32, 32)
        mask[y0:y1, x0:x1] = 1
        linear.weight.data[0] = 10 * mask.flatten() / mask.sum()
        linear.bias.data = torch.tensor([0.0, 5.0])
        self.classifier = nn.Sequential(linear)


def test_probability_map_falls_where_the_region_is_covered():
    region = (8, 16, 20, 28)
    model = RegionModel(region).eval()
    image = torch.ones(3, 32, 32)
    maps = occlusion_maps(model, image, layer="conv1", channel=0, target=0, size=10, stride=4, batch_size=16)
    area = (region[1] - region[0]) * (region[3] - region[2])
    expected = torch.empty_like(maps.probability)
    visible = torch.empty_like(maps.probability)
    for i, (y0, y1) in enumerate(maps.rows.tolist()):
        for j, (x0, x1) in enumerate(maps.cols.tolist()):
            overlap = max(0, min(y1, region[1]) - max(y0, region[0])) * max(0, min(x1, region[3]) - max(x0, region[2]))
            visible[i, j] = 1 - overlap / area
            expected[i, j] = 1 / (1 + math.exp(5 - 10 * visible[i, j]))
            # The activation map is the count of unoccluded pixels.
            assert float(maps.activation[i, j]) == pytest.approx(32 * 32 - (y1 - y0) * (x1 - x0))
    torch.testing.assert_close(maps.probability, expected, rtol=1e-5, atol=1e-6)
    lowest = divmod(int(maps.probability.argmin()), maps.probability.shape[1])
    assert float(visible[lowest]) == float(visible.min())
    y0, y1 = maps.rows[lowest[0]].tolist()
    x0, x1 = maps.cols[lowest[1]].tolist()
    assert y0 < region[1] and region[0] < y1 and x0 < region[3] and region[2] < x1  # over the region
    clear = (visible - 0.5).abs() > 1e-6
    assert torch.equal(maps.top_class[clear], torch.where(visible > 0.5, 0, 1)[clear])
    assert (maps.top_class == 1).any() and (maps.top_class == 0).any()


def test_strongest_map_and_its_projection():
    model = Tiny().eval()
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
    strongest = strongest_map(model, image, "conv2")
    with torch.no_grad():
        act = model.features(image[None])[0]
    peaks = act.flatten(1).max(dim=1).values
    assert strongest.channel == int(torch.nonzero(peaks == peaks.max())[0])
    assert strongest.value == pytest.approx(float(peaks.max()))
    assert float(act[strongest.channel, strongest.y, strongest.x]) == strongest.value
    assert strongest.total == pytest.approx(float(act[strongest.channel].sum()), rel=1e-5)
    projection, (x0, y0, x1, y1) = project_strongest(model, image, "conv2", strongest)
    assert projection.shape == (3, 16, 16)
    outside = projection.clone()
    outside[:, y0:y1, x0:x1] = 0
    assert projection.abs().sum() > 0 and outside.abs().sum() == 0  # all inside the receptive field


def test_fill_values():
    assert torch.equal(common.fill_value("mean"), torch.zeros(3))
    grey = common.fill_value("grey")
    torch.testing.assert_close(grey, (128 / 255 - torch.tensor(common.data_mod.IMAGENET_MEAN)) / torch.tensor(common.data_mod.IMAGENET_STD))
    assert torch.equal(common.fill_value("128"), grey)


def test_command_on_a_real_photograph(tmp_path, capsys):
    source = SAMPLES / "chelsea_cat.jpg"  # named below as a tench: the file name gives the true class
    odd = tmp_path / "in" / 'n01440764_<b>&"$\\q{$x.JPEG'  # HTML and matplotlib's mathtext both stay out
    odd.parent.mkdir()
    shutil.copy(source, odd)
    out = tmp_path / "out"
    status = cli.main(["occlusion", str(odd), "--stride", "56", "--size", "60", "--batch-size", "5", "--out", str(out), "-q"])
    assert status == 0
    assert "UNTRAINED" in capsys.readouterr().err
    document = json.loads((out / "occlusion" / "occlusion.json").read_text())
    entry = document["images"][0]
    assert entry["true_class"] == {"index": 0, "synset": "n01440764", "name": "tench"}
    assert len(entry["p_true"]) == 4 and len(entry["p_true"][0]) == 4
    assert document["grid"]["rows"][0] == [0, 58]
    # The unoccluded image's strongest conv5 map and class probabilities, computed on their own.
    model = models.zfnet(seed=0).eval()
    image = common.data_mod.normalize(common.data_mod.load_crop(odd).unsqueeze(0))[0]
    strongest = strongest_map(model, image, "conv5")
    assert entry["strongest"]["channel"] == strongest.channel and entry["strongest"]["value"] == strongest.value
    assert (entry["strongest"]["y"], entry["strongest"]["x"]) == (strongest.y, strongest.x)
    with torch.no_grad():
        p = torch.softmax(model(image.unsqueeze(0))[0], 0)
    assert entry["unoccluded"]["p_true"] == pytest.approx(float(p[0]), rel=1e-5)
    assert entry["unoccluded"]["top_class"] == int(p.argmax())
    assert (out / "occlusion" / entry["figure"]).stat().st_size > 0
    page = (out / "occlusion" / "index.html").read_text()
    assert "n01440764_&lt;b&gt;&amp;" in page and "<b>&" not in page and '&amp;"' not in page  # the quote escaped too
    assert "occlusion/index.html" in (out / "diagnostics.html").read_text()


@pytest.mark.parametrize("argv, message", [
    (["occlusion", "/nonexistent/n01440764_x.JPEG"], "IMAGE: /nonexistent/n01440764_x.JPEG does not exist"),
    (["occlusion", "{image}", "--fill", "purple"], "--fill: 'purple' is not mean, grey or a grey level"),
    (["occlusion", "{plain}"], "no ImageNet synset"),
    (["occlusion", "{image}", "--label", "1000"], "--label: class index 1000 is out of range"),
    (["occlusion", "{image}", "--layer", "fc7"], "--layer: 'fc7' is not a conv layer"),
])
def test_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    image = tmp_path / "n01440764_tiny.png"
    plain = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 100, 50)).save(image)
    Image.new("RGB", (40, 30), (200, 100, 50)).save(plain)
    argv = [a.format(image=image, plain=plain) for a in argv] + ["--out", str(tmp_path / "out"), "--stride", "112"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
