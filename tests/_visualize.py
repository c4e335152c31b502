"""Helpers for the ``zfk visualize`` tests: generated photographs, an independent brute-force
top-K (a plain ``model.features`` forward with hooks on the ReLUs, numpy's argmax, a Python
sort), and running the command in this process or in a subprocess."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from zfkernels import cli
from zfkernels.job import data as data_mod
from zfkernels.engine import Deconvnet
from zfkernels.job.scan import ScanPlan

from _images import load as load_pillow, photographs

REPO = Path(__file__).resolve().parents[1]


# -- images --------------------------------------------------------------------------------------


def photo(seed: int, size: Tuple[int, int] = (72, 56)) -> np.ndarray:
    """A (H, W, 3) uint8 picture with structure (gradients, a disc, noise) that differs per seed,
    so that a random network's activations differ between pictures."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0.15, 0.4) * min(h, w)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)[..., None]
    base = rng.uniform(0, 255, 3) * (xx / w)[..., None] + rng.uniform(0, 255, 3) * (yy / h)[..., None]
    picture = np.where(disc, rng.uniform(0, 255, 3), base / 2) + rng.normal(0, 12, (h, w, 3))
    return np.clip(picture, 0, 255).astype(np.uint8)


def write_photo(path: Path, seed: int, size: Tuple[int, int] = (72, 56)) -> Path:
    """Save :func:`photo` as ``path`` (format from the extension; PNG when Pillow does not know it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(photo(seed, size), "RGB")
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with open(path, "wb") as handle:  # (an open handle: names with any characters)
        image.save(handle, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return path


def photo_folder(root: Path, count: int, *, seed: int = 0, ext: str = ".png") -> Path:
    """``count`` generated pictures ``img000.png`` ... in ``root``."""
    for i in range(count):
        write_photo(root / f"img{i:03d}{ext}", seed + i)
    return root


def real_folder(root: Path, photos: Optional[Sequence[Path]] = None, twins: Optional[Dict[str, str]] = None) -> Path:
    """Copies of real photographs in ``root`` (a test may add to it): ``photos``, by default the
    package's seven (one grayscale) and, where present, three ImageNet ones; ``twins`` maps
    further names to the copied photograph each is a byte-identical copy of (exact ties between
    images)."""
    root.mkdir(parents=True, exist_ok=True)
    for path in photographs(extra=3) if photos is None else photos:
        shutil.copyfile(path, root / path.name)
    for twin, name in (twins or {}).items():
        shutil.copyfile(root / name, root / twin)
    return root


def jpeg_bytes(seed: int = 0, size: Tuple[int, int] = (64, 48), **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo(seed, size), "RGB").save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def write_broken_files(root: Path) -> Dict[str, str]:
    """A truncated JPEG, a zero-byte file and a text file named .jpg; returns name -> kind."""
    data = jpeg_bytes(5, (160, 120))
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a picture\n")
    return {"truncated.jpg": "truncated", "empty.png": "empty", "text.jpg": "text"}


# -- the independent brute force -------------------------------------------------------------------


def conv_names(model: nn.Module) -> Dict[int, str]:
    """``features`` index of each ReLU that follows a conv -> ``conv1``, ``conv2``, ... (ZFNet and
    AlexNet naming: one conv per block)."""
    children = list(model.features.children())
    names, count = {}, 0
    for i, module in enumerate(children):
        if isinstance(module, nn.Conv2d):
            count += 1
            assert isinstance(children[i + 1], nn.ReLU)
            names[i + 1] = f"conv{count}"
    return names


def brute_force_topk(model: nn.Module, root: Path, files: Sequence[str], layers: Sequence[str],
                     features: Optional[Sequence[int]], k: int, batch_size: int, device: str = "cpu",
                     load: Optional[Callable[[Path, Sequence[str]], torch.Tensor]] = None) -> Dict[str, List[dict]]:
    """``topk.json``'s ``"layers"`` computed the plain way: torchvision's evaluation transform on
    ``Image.open(...).convert("RGB")``, a ``model.features`` forward with hooks on the ReLUs,
    numpy's max and first argmax of every map, then per map a Python sort of all images by
    (-max, image index).

    The forward runs channels-last over batches of ``batch_size`` consecutive files, which is
    the arithmetic pass 1 uses (channels-last and NCHW convolutions differ in the last bits at
    conv2 and above, so a strict comparison needs the same layout; what is under test is the
    selection, not the convolution; on ``device`` for the same reason). ``load(root, files)``
    gives a batch's normalised images when they come from another decoder than Pillow's."""
    net = copy.deepcopy(model).float().eval().to(device, memory_format=torch.channels_last)
    names = conv_names(net)
    peaks: Dict[str, List[np.ndarray]] = {name: [] for name in layers}
    where: Dict[str, List[np.ndarray]] = {name: [] for name in layers}
    sizes: Dict[str, Tuple[int, int]] = {}

    def hook(index: int):
        def record(module, inputs, output):
            name = names[index]
            if name in peaks:
                a = output.detach().float().cpu().numpy()
                n, c, h, w = a.shape
                flat = a.reshape(n, c, h * w)
                peaks[name].append(flat.max(axis=2))
                where[name].append(flat.argmax(axis=2))  # numpy: the first occurrence of the max
                sizes[name] = (h, w)
        return record

    handles = [net.features[i].register_forward_hook(hook(i)) for i in names]
    try:
        with torch.no_grad():
            for start in range(0, len(files), batch_size):
                batch = (load or load_pillow)(root, files[start:start + batch_size])
                net.features(batch.to(device).contiguous(memory_format=torch.channels_last))
    finally:
        for handle in handles:
            handle.remove()
    dn = Deconvnet(model)
    out: Dict[str, List[dict]] = {}
    for name in layers:
        values, positions = np.concatenate(peaks[name]), np.concatenate(where[name])
        h, w = sizes[name]
        maps = []
        for c in (range(values.shape[1]) if features is None else features):
            order = sorted(range(len(files)), key=lambda n: (-float(values[n, c]), n))[:k]
            entries = []
            for n in order:
                y, x = divmod(int(positions[n, c]), w)
                entries.append({"image": files[n], "value": float(values[n, c]), "y": y, "x": x,
                                "box": list(dn.receptive_field(name, y, x, (224, 224)))})
            maps.append({"channel": c, "top": entries})
        out[name] = maps
    return out


def jpeg_decoding_device(device: str) -> torch.device:
    """``device`` for the batched JPEG decoding path, skipping on a GPU torchvision cannot
    decode JPEGs on (the CPU decodes the same batches with libjpeg: the GPU's code path)."""
    from zfkernels.job import data as data_mod

    device = torch.device(device)
    if device.type == "cuda" and not data_mod.gpu_jpeg_available(device):
        pytest.skip("torchvision cannot decode JPEGs on this GPU")
    return device


def torchvision_decoded(device: str) -> Callable[[Path, Sequence[str]], torch.Tensor]:
    """A batch loader for :func:`brute_force_topk` that decodes the way torchvision documents
    (for the GPU, nvjpeg): ``decode_jpeg`` of the files' bytes as one batch on ``device``, then
    the evaluation transform on the tensors (``resize`` antialiased, ``center_crop``,
    ``normalize``)."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as TF

    def load(root: Path, files: Sequence[str]) -> torch.Tensor:
        decoded = decode_jpeg([read_file(str(root / f)) for f in files], mode=ImageReadMode.RGB, device=device)
        crops = torch.stack([TF.center_crop(TF.resize(image, [256], antialias=True), [224, 224]) for image in decoded])
        # ToTensor's arithmetic, on the CPU as torchvision's transform does it
        return TF.normalize(crops.cpu().float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

    return load


# -- running zfk ----------------------------------------------------------------------------------


def zfk(args: Sequence[str], capsys=None) -> Tuple[int, str, str]:
    """``zfk ARGS`` in this process; returns (status, stdout, stderr) when ``capsys`` is given."""
    status = cli.main([str(a) for a in args])
    if capsys is None:
        return status, "", ""
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def subprocess_env(threads: Optional[int] = None) -> Dict[str, str]:
    """The environment for ``zfk`` subprocesses: this interpreter's package, and the same number
    of threads as this process (so convolutions add in the same order)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = str(threads or torch.get_num_threads())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def zfk_command(*args: object) -> List[str]:
    return [sys.executable, "-m", "zfkernels", *map(str, args)]


def run_zfk(*args: object, timeout: float = 300, threads: Optional[int] = None) -> subprocess.CompletedProcess:
    return subprocess.run(zfk_command(*args), env=subprocess_env(threads), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_topk(out: Path) -> dict:
    return json.loads((Path(out) / "topk.json").read_text(encoding="ascii"))


def html_pages(out: Path) -> List[Path]:
    return sorted(Path(out).glob("*.html"))


def scan_plan(root: Path, layers: Sequence[str], channels: Dict[str, torch.Tensor], top: int, batch_size: int) -> ScanPlan:
    """Pass 1's plan for the images under ``root``."""
    images = data_mod.discover(root)
    return ScanPlan(images, data_mod.Slots(len(images.files), batch_size), list(layers),
                    {name: channels[name] for name in layers}, top, {"test": 1})


def visualize(data, out, *extra, device: str = "cpu") -> list:
    """``zfk visualize`` arguments for a test run: in this process, quiet, ``extra`` added."""
    return ["visualize", "--data", data, "--out", out, "--device", device, "--workers", "0", "--quiet", *extra]
