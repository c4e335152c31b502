"""Real photographs for the engine tests, with the ImageNet evaluation transform."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torchvision import transforms

RESIZE_CROP = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])  # what the network saw, as pixels
EVAL_TRANSFORM = transforms.Compose(
    [
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ]
)


def load(folder: Path, names: Sequence[str]) -> torch.Tensor:
    """(N, 3, 224, 224) from the named files (grayscale and others converted to RGB)."""
    return torch.stack([EVAL_TRANSFORM(Image.open(folder / name).convert("RGB")) for name in names])
