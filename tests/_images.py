"""Photographs for the tests, with the ImageNet evaluation transform.

Every test that needs photographs uses the seven the package ships (``zfkernels/sample_images``,
one of them grayscale), so that a clean clone runs every test. The ImageNet sample photographs
beside the repository (``../shared/data/imagenet-sample``, or ``$ZFK_SAMPLE_IMAGES``) only add
breadth: :func:`imagenet` names those present, and is empty where the folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence

import torch
from PIL import Image
from torchvision import transforms

from zfkernels.job import data as data_mod

RESIZE_CROP = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])  # what the network saw, as pixels
EVAL_TRANSFORM = transforms.Compose(
    [
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ]
)

# The package's photographs, sorted: astronaut, cameraman (grayscale), chelsea_cat, coffee,
# grace_hopper, hubble_deep_field, rocket.
SAMPLES = data_mod.sample_images().root
SAMPLE_NAMES: List[str] = list(data_mod.sample_images().files)
GRAYSCALE = "cameraman.jpg"
SAMPLE_PHOTOS: List[Path] = [SAMPLES / name for name in SAMPLE_NAMES]

# ZFK_SAMPLE_IMAGES points elsewhere (e.g. a copy on a GPU machine that has no ../shared).
IMAGENET = Path(os.environ.get("ZFK_SAMPLE_IMAGES") or Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample")
# ImageNet sample photographs the tests add when they are there; the Airedale is grayscale.
IMAGENET_NAMES = ["n01440764_tench.JPEG", "n01443537_goldfish.JPEG", "n01484850_great_white_shark.JPEG",
                  "n01491361_tiger_shark.JPEG", "n01496331_electric_ray.JPEG", "n01498041_stingray.JPEG",
                  "n01514668_cock.JPEG", "n01514859_hen.JPEG", "n02096051_Airedale.JPEG",
                  "n02676566_acoustic_guitar.JPEG", "n04254680_soccer_ball.JPEG", "n01530575_brambling.JPEG"]


def imagenet(names: Sequence[str] = IMAGENET_NAMES) -> List[Path]:
    """The named ImageNet sample photographs that are present (none without the folder)."""
    return [IMAGENET / name for name in names if (IMAGENET / name).is_file()]


def imagenet_folder_present() -> bool:
    return IMAGENET.is_dir()


def photographs(extra: int = 0) -> List[Path]:
    """The seven sample photographs, then the first ``extra`` ImageNet ones of
    :data:`IMAGENET_NAMES` where the folder is present (breadth, never required)."""
    return SAMPLE_PHOTOS + imagenet(IMAGENET_NAMES[:extra])


def load_files(paths: Sequence[Path]) -> torch.Tensor:
    """(N, 3, 224, 224) from the files (grayscale and others converted to RGB), by torchvision's
    evaluation transform on Pillow's decoding."""
    return torch.stack([EVAL_TRANSFORM(Image.open(path).convert("RGB")) for path in paths])


def load(folder: Path, names: Sequence[str]) -> torch.Tensor:
    """:func:`load_files` of the named files in ``folder``."""
    return load_files([Path(folder) / name for name in names])
