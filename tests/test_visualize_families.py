"""``zfk visualize`` end to end on families issue #18 adds, at random init (the CLI's ``--seed``;
nothing downloaded): EfficientNet-B0 (SiLU, squeeze-excitation gates), Swin-T (channels-last
maps) and ViT-B/16 (a token grid), on real photographs (the package's seven, three ImageNet ones
where ``../shared`` has them) padded with generated pictures to twelve, so that a top-9 is a real
choice.

``topk.json`` must equal an independent brute-force scan: torchvision's own evaluation preset for
the builder's default weights (Pillow decoding, ``Resize`` with the preset's interpolation,
``CenterCrop``, ``Normalize``), a ``create_feature_extractor`` forward of the requested nodes,
Swin's maps permuted from channels-last and the ViT's tokens presented on the 14x14 patch grid
without the class token (``_oracle.present``), numpy's max and first argmax of each map, and per
map a Python sort of every image by (-max, index): ties go to the earlier image. A ViT activation
sees the whole image, so its boxes are the whole crop. A network with an operation no rule covers
is refused in one line naming the node.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms
from torchvision.models.feature_extraction import create_feature_extractor

from zfkernels import models

from _oracle import present
from _visualize import read_topk, real_folder, visualize, write_photo, zfk

SEED = 5  # not the default 0: the run must build the network --seed names
IMAGES = 12
FEATURES = [0, 1, 2]
TOP = 9
BATCH = 5  # 12 images: batches of 5, 5 and 2


def photo_folder_of(root: Path) -> Path:
    """The package's photographs (one grayscale) and up to three ImageNet ones, then generated
    pictures up to :data:`IMAGES`."""
    real_folder(root)
    present_count = len(list(root.iterdir()))
    for i in range(IMAGES - present_count):
        write_photo(root / f"generated{i:02d}.png", 100 + i, size=(96, 80))
    return root


def brute_force(arch: str, root: Path, files: Sequence[str], layouts: Dict[str, str]) -> Dict[str, List[dict]]:
    """``topk.json``'s ``"layers"`` without boxes, the plain way (module docstring). The forward
    runs channels-last over batches of :data:`BATCH` consecutive files, as pass 1 does: what is
    under test is the selection, not the convolution's last bits."""
    preset = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    evaluation = transforms.Compose([
        transforms.Resize(preset.resize_size[0], interpolation=preset.interpolation),
        transforms.CenterCrop(preset.crop_size[0]),
        transforms.ToTensor(),
        transforms.Normalize(preset.mean, preset.std),
    ])
    model = copy.deepcopy(models.build(arch, seed=SEED)).float().eval().to(memory_format=torch.channels_last)
    extractor = create_feature_extractor(model, return_nodes=list(layouts), suppress_diff_warning=True)
    peaks: Dict[str, List[np.ndarray]] = {name: [] for name in layouts}
    where: Dict[str, List[np.ndarray]] = {name: [] for name in layouts}
    width: Dict[str, int] = {}
    with torch.no_grad():
        for start in range(0, len(files), BATCH):
            batch = torch.stack([evaluation(Image.open(root / name).convert("RGB")) for name in files[start:start + BATCH]])
            for name, value in extractor(batch.contiguous(memory_format=torch.channels_last)).items():
                shown = present(value, layouts[name]).float().numpy()  # (B, C, H, W): patch (y, x), no class token
                flat = shown.reshape(shown.shape[0], shown.shape[1], -1)
                peaks[name].append(flat.max(axis=2))
                where[name].append(flat.argmax(axis=2))  # the first occurrence of the max
                width[name] = shown.shape[3]
    out: Dict[str, List[dict]] = {}
    for name in layouts:
        values, positions = np.concatenate(peaks[name]), np.concatenate(where[name])
        maps = []
        for c in FEATURES:
            order = sorted(range(len(files)), key=lambda n: (-float(values[n, c]), n))[:TOP]
            entries = []
            for n in order:
                y, x = divmod(int(positions[n, c]), width[name])
                entries.append({"image": files[n], "value": float(values[n, c]), "y": y, "x": x})
            maps.append({"channel": c, "top": entries})
        out[name] = maps
    return out


def without_boxes(document: dict) -> Dict[str, List[dict]]:
    return {name: [{"channel": m["channel"], "top": [{k: e[k] for k in ("image", "value", "y", "x")} for e in m["top"]]}
                   for m in maps] for name, maps in document["layers"].items()}


# arch -> --layers (a node, and a block named by its module: its last node), the nodes they
# resolve to with their raw layouts
CASES = {
    "efficientnet_b0": ("features.2.0.block.1,features.4", {"features.2.0.block.1": "NCHW", "features.4.2.add": "NCHW"}),
    # channels-last (B, H, W, C) maps: read in the wrong layout they would still be 4-D, and wrong
    "swin_t": ("features.1.0.add_1,features.3", {"features.1.0.add_1": "NHWC", "features.3.1.add_1": "NHWC"}),
    # (slow: 20 s on 2 cores; the other two take 4 s)
    "vit_b_16": ("encoder.layers.encoder_layer_1.add_1,encoder.layers.encoder_layer_3",
                 {"encoder.layers.encoder_layer_1.add_1": "tokens", "encoder.layers.encoder_layer_3.add_1": "tokens"}),
}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "vit_b_16" else a for a in CASES])
def test_visualize_equals_a_brute_force_scan(arch, tmp_path, capsys):
    option, layouts = CASES[arch]
    data = photo_folder_of(tmp_path / "data")
    out = tmp_path / "out"
    status, _, err = zfk(visualize(data, out, "--arch", arch, "--seed", SEED, "--layers", option, "--top", TOP,
                                   "--features", f"{FEATURES[0]}-{FEATURES[-1]}", "--batch-size", BATCH,
                                   "--decoder", "pillow"), capsys)
    assert status == 0, err
    document = read_topk(out)
    assert document["arch"] == arch and list(document["layers"]) == list(layouts)
    preset = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    assert (document["preprocess"]["resize"], document["preprocess"]["crop"]) == (preset.resize_size[0], preset.crop_size[0])
    files = sorted(p.name for p in data.iterdir())
    assert len(files) == IMAGES
    assert without_boxes(document) == brute_force(arch, data, files, layouts)
    crop = preset.crop_size[0]
    for name, layout in layouts.items():
        assert (out / f"layer-{name}.html").is_file()
        if layout == "tokens":  # attention mixes every patch: each activation sees the whole crop
            boxes = {tuple(e["box"]) for m in document["layers"][name] for e in m["top"]}
            assert boxes == {(0, 0, crop, crop)}, boxes


@pytest.mark.parametrize("factory, node", [("softplus_module", "part"), ("data_dependent_branch", "part.gt"),
                                           ("bilinear", "part.mul")])
def test_a_network_with_an_uncovered_operation_is_refused_in_one_line(factory, node, tmp_path, capsys):
    out = tmp_path / "out"
    status, _, err = zfk(["visualize", "--arch", f"_arch_factory:{factory}", "--out", out, "--device", "cpu",
                          "--workers", "0", "--quiet"], capsys)
    lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING: no --weights given")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    prefix = f"zfk visualize: error: --arch _arch_factory:{factory}: the deconvnet cannot run this network: "
    assert lines[0].startswith(prefix), lines[0]
    assert re.search(rf"(?<![\w.]){re.escape(node)}(?![\w.])", lines[0]), lines[0]
    assert not out.exists()
