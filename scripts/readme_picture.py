"""Make docs/images/gallery-cell.png, the README's picture: three gallery cells, one above the
other, each made by ``zfk visualize`` on the 7 photographs shipped with the package and a seeded
random, untrained network (no weights are downloaded):

  * ZFNet, conv5, feature map 170 (the paper's network);
  * ResNet-50, ``layer2``'s output (``layer2.3.relu_2``), feature map 6 (any ReLU CNN);
  * ConvNeXt-Tiny, ``features.3``'s output (``features.3.2.add``, a residual block's output),
    feature map 6 (GELU, LayerNorm, layer scale: issue #18's rules).

    python scripts/readme_picture.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
PICTURE = ROOT / "docs" / "images" / "gallery-cell.png"
CELLS = [  # (caption, visualize arguments, the cell PNG inside its gallery)
    ("ZFNet conv5, feature map 170", ["--arch", "zfnet", "--layers", "conv5", "--features", "170"],
     "layers/conv5/f0170.png"),
    ("ResNet-50 layer2 (layer2.3.relu_2), feature map 6", ["--arch", "resnet50", "--layers", "layer2", "--features", "6"],
     "layers/layer2.3.relu_2/f0006.png"),
    ("ConvNeXt-Tiny features.3 (features.3.2.add, a block output), feature map 6",
     ["--arch", "convnext_tiny", "--layers", "features.3", "--features", "6"], "layers/features.3.2.add/f0006.png"),
]
CAPTION_HEIGHT = 18


def main() -> None:
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (caption, options, cell) in enumerate(CELLS):
            out = Path(tmp) / f"gallery{k}"
            subprocess.run([sys.executable, "-m", "zfkernels", "visualize", "--out", str(out), "--quiet",
                            "--workers", "0", *options], check=True)
            cells.append((caption, Image.open(out / cell).convert("RGB")))
    width = max(image.width for _, image in cells)
    picture = Image.new("RGB", (width, sum(CAPTION_HEIGHT + image.height for _, image in cells)), "white")
    draw, y = ImageDraw.Draw(picture), 0
    for caption, image in cells:
        draw.text((4, y + 3), caption, fill="black")
        picture.paste(image, (0, y + CAPTION_HEIGHT))
        y += CAPTION_HEIGHT + image.height
    PICTURE.parent.mkdir(parents=True, exist_ok=True)
    picture.save(PICTURE, optimize=True)
    print(f"wrote {PICTURE}")


if __name__ == "__main__":
    main()
