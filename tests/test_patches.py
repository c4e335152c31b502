"""Pass 2 (``zfkernels.job.project``): every gallery tile against an independent reference. The
patch is the image's own pixels over the whole (unclipped) receptive field, grey outside the
image; the projection is the float64 autograd oracle's, cut out the same way and scaled for
display (zero at mid-grey, the largest magnitude at full scale). Two layers: conv1, whose 7-pixel
field is enlarged 7 times by pixel replication, and conv3, shown at its 75 pixels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from zfkernels import models
from zfkernels.engine import Deconvnet
from zfkernels.job.project import project_selections
from zfkernels.job.scan import run_scan

from _images import EVAL_TRANSFORM, RESIZE_CROP
from _oracle import oracle
from _visualize import photo_folder, scan_plan

# (size, stride, offset) of each layer's receptive field, by hand from ZFNet's Figure 3:
# conv1 7x7/2 pad 1; pool1 3x3/2 and conv2 5x5/2 widen it by 2*2 + 4*4; pool2 3x3/2 and conv3
# 3x3/1 pad 1 by 2*8 + 2*16, shifting it by one conv3 step (16 pixels).
FIELDS = {"conv1": (7, 2, -1), "conv3": (75, 16, -17)}
ENLARGE = {"conv1": 7, "conv3": 1}  # tiles are at least 48 pixels: 7 * 7 = 49
GREY = 128


def window(image: np.ndarray, y: int, x: int, layer: str, fill: float) -> np.ndarray:
    """``image`` (H, W, C) over activation (y, x)'s receptive field, ``fill`` outside it."""
    size, stride, offset = FIELDS[layer]
    y0, x0 = y * stride + offset, x * stride + offset
    out = np.full((size, size, image.shape[2]), fill, dtype=image.dtype)
    h, w = image.shape[:2]
    top, left, bottom, right = max(y0, 0), max(x0, 0), min(y0 + size, h), min(x0 + size, w)
    out[top - y0:bottom - y0, left - x0:right - x0] = image[top:bottom, left:right]
    return out


def enlarge(tile: np.ndarray, layer: str) -> np.ndarray:
    factor = ENLARGE[layer]
    return np.repeat(np.repeat(tile, factor, axis=0), factor, axis=1)


@pytest.mark.parametrize("mode", ["deconvnet", "guided"])
def test_tiles_equal_the_image_patch_and_the_oracle_projection(tmp_path, device, mode):
    root = photo_folder(tmp_path / "data", 6, ext=".png")
    model = models.zfnet(seed=0).eval()
    layers = list(FIELDS)
    channels = {"conv1": torch.tensor([0, 5, 40]), "conv3": torch.tensor([2, 100, 301])}
    plan = scan_plan(root, layers, channels, top=3, batch_size=4)
    images = plan.images
    net = copy.deepcopy(model).to(device)
    scan = run_scan(net, plan, torch.device(device))
    result = project_selections(net, scan.layers, images, torch.device(device), batch_size=64, mode=mode)

    pictures = [Image.open(images.path(i)).convert("RGB") for i in range(len(images.files))]
    pixels = [np.asarray(RESIZE_CROP(p)) for p in pictures]  # (224, 224, 3) uint8: what the network saw
    # The switches the oracle routes through come from one recording of the selected images, the
    # batch pass 2 records (on a GPU another batch could break a near-tie in a pooling window
    # differently).
    selected = sorted({e[0] for top in scan.layers.values() for j in range(len(top.channels)) for e in top.entries(j)})
    row_of = {image: n for n, image in enumerate(selected)}
    normalised = torch.stack([EVAL_TRANSFORM(pictures[i]) for i in selected]).to(device)
    dn = Deconvnet(net)
    rec = dn.record(normalised)
    checked = drawn = 0
    for layer in layers:
        tiles, top = result.tiles[layer], scan.layers[layer]
        for j, channel in enumerate(top.channels.tolist()):
            entries = top.entries(j)
            assert len(entries) == 3 and tiles.filled[j].all()
            rows = torch.tensor([row_of[e[0]] for e in entries])
            positions = torch.tensor([[e[2], e[3]] for e in entries])
            projected = oracle(dn, rec, normalised, layer, rows, torch.full((3,), channel), positions, mode=mode).cpu()
            for r, (image, _, y, x) in enumerate(entries):
                patch = enlarge(window(pixels[image], y, x, layer, GREY), layer)
                assert np.array_equal(tiles.patches[j, r], patch), (layer, channel, r)

                cut = window(projected[r].permute(1, 2, 0).numpy(), y, x, layer, 0.0)
                scale = max(np.abs(cut).max(), 1e-30)
                shown = enlarge(np.round(np.clip(0.5 + 0.5 * cut / scale, 0, 1) * 255), layer)
                difference = np.abs(tiles.projections[j, r].astype(np.float64) - shown)
                assert difference.max() <= 1, (layer, channel, r)  # float32 engine vs float64 oracle: rounding
                checked += 1
                drawn += int(np.ptp(shown) > 100)  # a projection with something in it, not a grey tile
    assert drawn >= 12, drawn
    assert checked == 18 and result.projections == 18 and result.failures == []
