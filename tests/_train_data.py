"""Generated ImageNet-layout folders for the training and probe tests: the colour of a disc on
noise, one class per colour (an easy task), and the same images under shuffled labels."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import Image

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "blue": (40, 60, 230), "green": (40, 200, 60), "red": (230, 40, 40), "yellow": (230, 220, 40),
}
SIZE = 72  # tests train with --resize 72 --crop 64


def disc_image(colour: Tuple[int, int, int], rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """Uniform grey-level noise with a disc of ``colour`` (radius and centre random, always
    inside the central crop, so every training crop shows most of it)."""
    pixels = rng.integers(0, 256, size=(size, size, 1), dtype=np.uint8).repeat(3, axis=2)
    radius = rng.uniform(0.18, 0.26) * size
    cy, cx = rng.uniform(0.4, 0.6, size=2) * size
    yy, xx = np.mgrid[0:size, 0:size]
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    pixels[inside] = colour
    return Image.fromarray(pixels, "RGB")


def disc_folder(root: Path, train_per_class: int, val_per_class: int, *, seed: int = 0,
                classes: Sequence[str] = tuple(COLOURS), shuffled: bool = False) -> Path:
    """``root/train/<colour>/*.png`` and ``root/val/<colour>/*.png``. With ``shuffled``, each
    image's colour is drawn at random, independently of the folder it is put in (labels carry
    no information about the pixels)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour = COLOURS[classes[rng.integers(len(classes))]] if shuffled else COLOURS[name]
                disc_image(colour, rng).save(folder / f"{i:03d}.png")
    return root
