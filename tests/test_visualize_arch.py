"""``zfk visualize`` and the diagnostics on networks other than the zoo: a torchvision ResNet on
the real sample photographs against a brute-force top-K through torchvision's own
``create_feature_extractor`` (default layers and named ones), a user's ``module.path:callable``
factory with a branching graph (in this process and, sharded, under torchrun), Inception v3 at its
own 299x299 input, every diagnostic on a non-zoo network, and the refusals of what is new.

All networks are randomly initialised; nothing is downloaded."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from zfkernels import models
from zfkernels.engine import Deconvnet

from _images import SAMPLE_PHOTOS
from _visualize import REPO, photo_folder, read_topk, real_folder, subprocess_env, torch_threads, visualize, zfk

BIN = Path(sys.executable).parent
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# -- the independent brute force ------------------------------------------------------------------


def brute_force(model: nn.Module, root: Path, files: Sequence[str], layers: Sequence[str], features: Sequence[int],
                k: int, batch_size: int, resize: int, crop: int) -> Dict[str, List[dict]]:
    """``topk.json``'s ``"layers"`` the plain way: torchvision's ``Resize(resize)`` +
    ``CenterCrop(crop)`` + ``ToTensor`` + ``Normalize`` on Pillow's RGB decoding, a
    ``create_feature_extractor`` forward of the requested nodes, numpy's max and first argmax of
    each map, then per map a Python sort of every image by (-max, index): ties go to the earlier
    image. (Channels-last over batches of ``batch_size`` consecutive files, as pass 1 computes:
    the selection is under test, not the convolution's last bits.) The boxes come from the
    engine's receptive fields at the ``crop`` x ``crop`` input."""
    evaluation = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor(),
                                     transforms.Normalize(MEAN, STD)])
    net = copy.deepcopy(model).float().eval().to(memory_format=torch.channels_last)
    extractor = create_feature_extractor(net, return_nodes=list(layers), suppress_diff_warning=True)
    peaks: Dict[str, List[np.ndarray]] = {name: [] for name in layers}
    where: Dict[str, List[np.ndarray]] = {name: [] for name in layers}
    width: Dict[str, int] = {}
    with torch.no_grad():
        for start in range(0, len(files), batch_size):
            batch = torch.stack([evaluation(Image.open(root / name).convert("RGB"))
                                 for name in files[start:start + batch_size]])
            for name, value in extractor(batch.contiguous(memory_format=torch.channels_last)).items():
                a = value.float().numpy()
                flat = a.reshape(a.shape[0], a.shape[1], -1)
                peaks[name].append(flat.max(axis=2))
                where[name].append(flat.argmax(axis=2))  # the first occurrence of the max
                width[name] = a.shape[3]
    dn = Deconvnet(model)
    out: Dict[str, List[dict]] = {}
    for name in layers:
        values, positions = np.concatenate(peaks[name]), np.concatenate(where[name])
        maps = []
        for c in features:
            order = sorted(range(len(files)), key=lambda n: (-float(values[n, c]), n))[:k]
            entries = []
            for n in order:
                y, x = divmod(int(positions[n, c]), width[name])
                entries.append({"image": files[n], "value": float(values[n, c]), "y": y, "x": x,
                                "box": list(dn.receptive_field(name, y, x, (crop, crop)))})
            maps.append({"channel": c, "top": entries})
        out[name] = maps
    return out


def samples_with_a_twin(root: Path) -> Path:
    """The seven sample photographs (one grayscale) and a byte-identical copy of one, named to
    sort last: exact ties, which the earlier file must win."""
    return real_folder(root, SAMPLE_PHOTOS, twins={"zz_copy_of_coffee.jpg": "coffee.jpg"})


# -- a torchvision ResNet on the real photographs ---------------------------------------------------


RESNET18_STAGES = ["layer1.1.relu_1", "layer2.1.relu_1", "layer3.1.relu_1", "layer4.1.relu_1"]


@pytest.mark.slow
@pytest.mark.parametrize("layers_option, layers", [
    (None, RESNET18_STAGES),  # the default: each stage's output
    # a ReLU inside a block, and a stage named by its module (its last node)
    ("layer1.0.relu,layer3", ["layer1.0.relu", "layer3.1.relu_1"]),
])
def test_resnet18_on_the_sample_photographs_equals_create_feature_extractor(layers_option, layers, tmp_path, capsys):
    data = samples_with_a_twin(tmp_path / "data")
    out = tmp_path / "out"
    extra = [] if layers_option is None else ["--layers", layers_option]
    status, _, err = zfk(visualize(data, out, "--arch", "resnet18", *extra, "--features", "0-1", "--top", "4",
                                   "--batch-size", "3", "--decoder", "pillow"), capsys)
    assert status == 0, err
    document = read_topk(out)
    assert list(document["layers"]) == layers
    files = sorted(p.name for p in data.iterdir())
    want = brute_force(models.build("resnet18", seed=0).eval(), data, files, layers, [0, 1], 4, 3, 256, 224)
    assert document["layers"] == want
    # The exact ties were there to be broken: the copy never comes before its original.
    names = [[e["image"] for e in m["top"]] for maps in document["layers"].values() for m in maps]
    tied = [n for n in names if "coffee.jpg" in n and "zz_copy_of_coffee.jpg" in n]
    assert tied and all(n.index("coffee.jpg") < n.index("zz_copy_of_coffee.jpg") for n in tied)
    assert document["preprocess"]["resize"] == 256 and document["preprocess"]["crop"] == 224
    assert set(layers) <= set(get_graph_node_names(models.build("resnet18"), suppress_diff_warning=True)[1])
    for layer in layers:  # a page per layer, under its node name
        assert (out / f"layer-{layer}.html").is_file()


# -- a user's factory: module.path:callable ----------------------------------------------------------


FACTORY_SOURCE = '''
"""A branching network of the tests' own: a stem, two branches concatenated, a residual add."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.left = nn.Conv2d(8, 4, 1)
        self.right = nn.Conv2d(8, 4, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.stem(x)))                                  # relu: 112x112, then 56x56
        y = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], 1)      # relu_1, relu_2, cat
        z = F.relu(self.mix(y) + y)                                          # add, relu_3
        return self.head(z.mean((2, 3)))


def build():
    return Branching()
'''


@pytest.fixture
def factory(tmp_path, monkeypatch) -> Path:
    """``mypkg.mymodel:build`` importable from a folder of its own (on ``sys.path`` here, on
    ``PYTHONPATH`` for subprocesses); returns that folder."""
    root = tmp_path / "userlib"
    (root / "mypkg").mkdir(parents=True)
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "mymodel.py").write_text(textwrap.dedent(FACTORY_SOURCE))
    monkeypatch.syspath_prepend(str(root))
    for name in ("mypkg", "mypkg.mymodel"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield root
    for name in ("mypkg", "mypkg.mymodel"):
        sys.modules.pop(name, None)


FACTORY = "mypkg.mymodel:build"
# No family: the last projectable node at each resolution (hand-derived from the forward above).
FACTORY_DEFAULTS = ["relu", "relu_3"]


@pytest.mark.slow
def test_a_factory_with_a_branching_graph_gives_a_gallery(factory, tmp_path, capsys):
    data = photo_folder(tmp_path / "data", 6)
    out = tmp_path / "out"
    status, _, err = zfk(visualize(data, out, "--arch", FACTORY, "--top", "3", "--batch-size", "4",
                                   "--features", "0-3"), capsys)
    assert status == 0, err
    document = read_topk(out)
    assert list(document["layers"]) == FACTORY_DEFAULTS and document["arch"] == FACTORY
    files = sorted(p.name for p in data.iterdir())
    want = brute_force(models.build(FACTORY, seed=0).eval(), data, files, FACTORY_DEFAULTS, range(4), 3, 4, 256, 224)
    assert document["layers"] == want
    index = (out / "index.html").read_text("utf-8")
    for layer in FACTORY_DEFAULTS:
        assert f"layer-{layer}.html" in index and (out / f"layer-{layer}.html").is_file()
        cells = sorted((out / "layers" / layer).glob("*.png"))
        assert len(cells) == 4 and all(Image.open(cell).size[0] > 0 for cell in cells)
    # The concatenation is a layer too, and its maps are the two branches' side by side.
    status, _, err = zfk(visualize(data, tmp_path / "cat", "--arch", FACTORY, "--layers", "cat", "--top", "2",
                                   "--features", "3,4"), capsys)
    assert status == 0, err
    want = brute_force(models.build(FACTORY, seed=0).eval(), data, files, ["cat"], [3, 4], 2, 64, 256, 224)
    assert read_topk(tmp_path / "cat")["layers"] == want


@pytest.mark.slow
def test_two_processes_under_torchrun_equal_one_on_a_branching_factory(factory, tmp_path, capsys):
    torchrun = BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"{torchrun} is absent")
    data = photo_folder(tmp_path / "data", 11, seed=40)
    args = ["--arch", FACTORY, "--features", "0-5", "--top", "3", "--batch-size", "3"]  # 4 slots: 2 + 2
    single = tmp_path / "single"
    with torch_threads(1):
        assert zfk(visualize(data, single, *args), capsys)[0] == 0
    double = tmp_path / "double"
    env = subprocess_env(threads=1)
    env["PYTHONPATH"] = f"{factory}:{env['PYTHONPATH']}"
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "zfkernels", "visualize", "--data",
               str(data), "--out", str(double), "--device", "cpu", "--workers", "0", "--quiet", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(read_topk(single)["layers"]) == FACTORY_DEFAULTS
    assert read_topk(double) == read_topk(single)
    assert json.loads((double / "run.json").read_text())["processes"] == 2


# -- input size follows the model ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["inception_v3", "resnet50", "zfnet"])
def test_the_loaders_crop_at_the_networks_own_sizes(arch, tmp_path):
    from zfkernels.job import data as data_mod

    preset = models.eval_transform(arch)
    root = real_folder(tmp_path / "data", SAMPLE_PHOTOS[:2])
    images = data_mod.discover(root).seen_as(preset)
    assert images.size == (preset.crop, preset.crop)
    batch = data_mod.make_loader(images, [(0, [0, 1])], 0, pin_memory=False).dataset[0]
    theirs = transforms.Compose([transforms.Resize(preset.resize), transforms.CenterCrop(preset.crop),
                                 transforms.PILToTensor()])
    want = torch.stack([theirs(Image.open(root / name).convert("RGB")) for name in images.files])
    assert batch.images.shape == (2, 3, preset.crop, preset.crop) and torch.equal(batch.images, want)


def test_batched_jpeg_decoding_crops_at_the_networks_own_sizes(tmp_path, device):
    """The batched (nvjpeg) path resizes on the device to the network's sizes too: as
    torchvision's tensor transform does it, ``resize`` antialiased then ``center_crop``."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    from zfkernels.job import data as data_mod
    from _visualize import jpeg_decoding_device

    device = jpeg_decoding_device(device)
    preset = models.eval_transform("inception_v3")
    root = real_folder(tmp_path / "data", SAMPLE_PHOTOS[:3])
    images = data_mod.discover(root).seen_as(preset)
    batch = data_mod.make_loader(images, [(0, [0, 1, 2])], 0, pin_memory=False, gpu_jpeg=True).dataset[0]
    assert len(batch.encoded) == 3  # all three went to the batched decoder
    indices, crops, failures = data_mod.decode_on_device(batch, device)
    assert failures == [] and indices.tolist() == [0, 1, 2] and crops.shape == (3, 3, 299, 299)
    for row, name in enumerate(images.files):
        decoded = decode_jpeg(torch.frombuffer(bytearray((root / name).read_bytes()), dtype=torch.uint8),
                              mode=ImageReadMode.RGB, device=device)
        want = TF.center_crop(TF.resize(decoded, [342], antialias=True), [299, 299])
        assert torch.equal(crops[row], want), name


@pytest.mark.slow
def test_inception_v3_sees_its_own_299_pixel_crop(tmp_path, capsys):
    data = real_folder(tmp_path / "data", SAMPLE_PHOTOS[:3])
    out = tmp_path / "out"
    layer = "Conv2d_2a_3x3.relu"  # 299 -> 149 -> 147 (at 224 it would be 109x109)
    status, _, err = zfk(visualize(data, out, "--arch", "inception_v3", "--layers", layer, "--features", "0-1",
                                   "--top", "2", "--batch-size", "3"), capsys)
    assert status == 0, err
    document = read_topk(out)
    assert (document["preprocess"]["resize"], document["preprocess"]["crop"]) == (342, 299)
    assert "Resize(342) -> CenterCrop(299)" in document["preprocess"]["transform"]
    files = sorted(p.name for p in data.iterdir())
    model = models.build("inception_v3", seed=0).eval()
    assert document["layers"] == brute_force(model, data, files, [layer], [0, 1], 2, 3, 342, 299)
    page = (out / f"layer-{layer}.html").read_text("utf-8")
    assert "of the 299×299 crop" in page and "Feature map 147×147" in page


@pytest.mark.slow
def test_occlusion_on_inception_v3_covers_its_299_pixel_crop(tmp_path, capsys):
    image = SAMPLE_PHOTOS[3]
    out = tmp_path / "out"
    status, _, err = zfk(["occlusion", image, "--arch", "inception_v3", "--label", "0", "--size", "299", "--stride", "299",
                          "--layer", "Conv2d_1a_3x3.relu", "--out", out, "--device", "cpu", "-q"], capsys)
    assert status == 0, err
    document = json.loads((out / "occlusion" / "occlusion.json").read_text())
    assert document["grid"]["rows"] == [[0, 299]] and document["grid"]["cols"] == [[0, 299]]
    assert "299x299 crop" in document["grid"]["rule"]


# -- every diagnostic on a network of the user's -------------------------------------------------------


@pytest.mark.slow
def test_every_diagnostic_runs_on_a_factory(factory, tmp_path, capsys):
    photos = [tmp_path / f"n01440764_{n}.png" for n in range(2)]
    for n, path in enumerate(photos):
        Image.fromarray(np.asarray(Image.open(SAMPLE_PHOTOS[n]).convert("RGB").resize((64, 48)))).save(path)
    out = tmp_path / "out"
    common = ["--arch", FACTORY, "--out", out, "--device", "cpu", "-q"]

    assert zfk(["occlusion", photos[0], "--size", "112", "--stride", "112", *common], capsys)[0] == 0
    occlusion = json.loads((out / "occlusion" / "occlusion.json").read_text())
    assert occlusion["layer"] == "relu_3" and occlusion["images"][0]["strongest"]["layer"] == "relu_3"  # the deepest map

    assert zfk(["invariance", *map(str, photos), "--transform", "rotate", "--values=0,90", *common], capsys)[0] == 0
    invariance = json.loads((out / "invariance" / "invariance.json").read_text())
    assert invariance["layers"] == {"1": "relu", "7": "relu_3"}  # no fc7: the deepest feature map
    assert invariance["transforms"]["rotate"]["raw_distance"]["relu"][0][0] == 0.0

    parts = tmp_path / "parts.json"
    parts.write_text(json.dumps({"parts": {"corner": {p.name: [0, 0, 60, 60] for p in photos}}}))
    status, _, err = zfk(["correspondence", "--images", *map(str, photos), "--parts", parts, "--trials", "1",
                          "--layers", "cat,relu_3", *common], capsys)
    assert status == 0, err
    assert json.loads((out / "correspondence" / "correspondence.json").read_text())["layers"] == ["cat", "relu_3"]

    assert zfk(["filters", "--compare", "zfnet", *common], capsys)[0] == 0
    filters = json.loads((out / "filters" / "filters.json").read_text())
    assert [(m["arch"], m["layer1"]["kernel"], m["layer1"]["stride"]) for m in filters["models"]] == [
        (FACTORY, [5, 5], [2, 2]), ("zfnet", [7, 7], [2, 2])]  # the stem, found in the traced graph

    checkpoints = []
    for seed in (1, 2):
        checkpoints.append(tmp_path / f"step{seed}.pth")
        torch.save(models.build(FACTORY, seed=seed).state_dict(), checkpoints[-1])
    status, _, err = zfk(["evolution", "--checkpoints", *map(str, checkpoints), "--data", tmp_path, "--features", "0-1",
                          "--arch", FACTORY, "--out", out, "--device", "cpu", "-q"], capsys)
    assert status == 0, err
    evolution = json.loads((out / "evolution" / "evolution.json").read_text())
    assert list(evolution["layers"]) == FACTORY_DEFAULTS and evolution["arch"] == FACTORY
    for page in ("occlusion", "invariance", "correspondence", "filters", "evolution"):
        assert (out / page / "index.html").is_file()


# -- refusals ---------------------------------------------------------------------------------------


def one_line_error(argv: List[object], capsys) -> str:
    """Run ``zfk ARGV``: it must refuse with one line, exit status 2 and no traceback; the line.
    (argparse's refusals end in SystemExit, the commands' own in a returned status.)"""
    try:
        status, _, err = zfk(argv, capsys)
    except SystemExit as stop:
        status, err = stop.code, capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING: no --weights given")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def photo(tmp_path) -> Path:
    """Two small pictures, ``n01440764_photo.png`` (returned) and ``n01440764_other.png``."""
    for name, level in (("photo", 90), ("other", 160)):
        Image.fromarray(np.full((40, 40, 3), level, dtype=np.uint8)).save(tmp_path / f"n01440764_{name}.png")
    return tmp_path / "n01440764_photo.png"


@pytest.mark.parametrize("argv, message", [
    (["visualize", "--arch", "resnet18", "--layers", "layer1.0.relu_3"],
     "zfk visualize: error: --layers: unknown layer 'layer1.0.relu_3'; did you mean layer1.0.relu_1, layer1.0.relu"),
    (["visualize", "--arch", "resnet18", "--layers", "layer9"], "zfk visualize: error: --layers: unknown layer 'layer9'"),
    (["evolution", "--arch", "resnt50", "--checkpoints", "c.pth", "--data", "."],
     "zfk evolution: error: argument --arch: unknown architecture 'resnt50'; did you mean resnet50"),
    (["filters", "--compare", "resnt50"], "zfk filters: error: --compare: unknown architecture 'resnt50'; did you mean resnet50"),
    (["filters", "--compare", "resnt50:torchvision"], "zfk filters: error: --compare: unknown architecture 'resnt50'"),
    (["filters", "--compare", "_no_such_module:build"],
     "zfk filters: error: --compare: _no_such_module:build: cannot import module '_no_such_module'"),
    (["occlusion", "{photo}", "--arch", "resnet18", "--layer", "layer4.1.relu_9"],
     "zfk occlusion: error: --layer: 'layer4.1.relu_9' is not a conv layer of resnet18 (unknown layer 'layer4.1.relu_9'; "
     "did you mean layer4.1.relu_1"),
    (["invariance", "{photo}", "--layers", "conv1"], "zfk invariance: error: --layers: give two layers (the figure compares two), got conv1"),
    (["invariance", "{photo}", "--arch", "resnet18", "--layers", "relu,fc7"], "zfk invariance: error: --layers: unknown layer 'fc7'"),
    (["correspondence", "--images", "{photo}", "{other}", "--parts", "{parts}", "--arch", "resnet18", "--layers", "fc7"],
     "zfk correspondence: error: --layers: unknown layer 'fc7'"),
])
def test_new_bad_inputs_are_one_line(argv, message, photo, tmp_path, capsys):
    parts = tmp_path / "parts.json"
    other = photo.with_name("n01440764_other.png")
    parts.write_text(json.dumps({"parts": {"all": {photo.name: [0, 0, 10, 10], other.name: [0, 0, 10, 10]}}}))
    out = tmp_path / "out"
    argv = [str(a).format(photo=photo, other=other, parts=parts) for a in argv] + ["--out", out, "--device", "cpu"]
    if argv[0] == "visualize":
        argv += ["--workers", "0"]
    line = one_line_error(argv, capsys)
    assert line.startswith(message), line
    assert not out.exists()
