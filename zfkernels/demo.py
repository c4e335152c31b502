"""A short demo of the kernels on a real photograph: ``python -m zfkernels.demo [--image PATH]``.

Runs a seeded random ZFNet conv1 (96 filters, 7x7, stride 2) over the image, pools it with
switches, projects the strongest feature map back to pixels (unpool -> rectify -> transposed
filters), checks every step against the pure-PyTorch reference and prints what it saw.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

import zfkernels
from zfkernels import reference

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_image_path() -> Path:
    """A freely licensed photograph shipped with matplotlib (Grace Hopper)."""
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def load_image(path: Path) -> torch.Tensor:
    """ImageNet evaluation transform: short side to 256, centre crop 224, normalise."""
    from torchvision.transforms import functional as TF

    image = Image.open(path).convert("RGB")
    image = TF.center_crop(TF.resize(image, 256), 224)
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD).unsqueeze(0)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=None, help="a photograph (default: matplotlib's sample)")
    parser.add_argument("--device", default="cuda" if zfkernels.has_cuda() else "cpu")
    args = parser.parse_args(argv)
    path = args.image or sample_image_path()
    device = torch.device(args.device)
    print(f"zfkernels {zfkernels.build_info()}")
    print(f"image: {path} on {device}")

    x = load_image(path).to(device)
    conv1 = torch.nn.Conv2d(3, 96, 7, stride=2, padding=1).to(device)
    torch.manual_seed(0)
    torch.nn.init.normal_(conv1.weight, std=0.05)
    with torch.no_grad():
        act = torch.relu(conv1(x))  # (1, 96, 110, 110)

        start = time.perf_counter()
        pooled, switches = zfkernels.maxpool_switches(act, 3, 2, 0, ceil_mode=True)
        ref_pooled, ref_indices = F.max_pool2d(act, 3, 2, 0, ceil_mode=True, return_indices=True)
        indices = zfkernels.switches_to_indices(switches, act.shape[-2:], 3, 2, 0)
        print(f"maxpool_switches: {tuple(act.shape)} -> {tuple(pooled.shape)}, equals F.max_pool2d: "
              f"{torch.equal(pooled, ref_pooled)}, switches -> indices exact: {torch.equal(indices, ref_indices)}")
        print(f"  switch memory {switches.numel() * switches.element_size():,} bytes vs "
              f"{ref_indices.numel() * ref_indices.element_size():,} for int64 indices")
        flat = indices.flatten(2)
        shared = 1.0 - sum(len(torch.unique(row)) for row in flat[0]) / flat[0].numel()
        print(f"  {shared:.0%} of the switches share their argmax with another window (overlapping 3x3/2)")

        strongest = int(pooled.amax(dim=(2, 3))[0].argmax())
        seed = torch.zeros_like(pooled)
        seed[0, strongest] = pooled[0, strongest]
        unpooled = zfkernels.unpool(seed, switches, act.shape[-2:], 3, 2, 0, rectify=True)
        ref_unpooled = reference.unpool(seed, switches, act.shape[-2:], 3, 2, 0, rectify=True)
        channels = torch.tensor([strongest], device=device)
        pixels = zfkernels.project(unpooled[:, strongest:strongest + 1], conv1.weight, 2, 1, (224, 224),
                                   channels=channels)
        ref_pixels = reference.project(ref_unpooled, conv1.weight, 2, 1, (224, 224))
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        error = (pixels - ref_pixels).norm() / ref_pixels.norm().clamp_min(1e-30)
        print(f"projection of feature map {strongest} to pixels: {tuple(pixels.shape)}, relative error vs "
              f"reference {error:.2e}, unpool exact: {torch.equal(unpooled, ref_unpooled)}")
        print(f"demo ops took {elapsed * 1e3:.1f} ms (including the reference checks)")


if __name__ == "__main__":
    main()
