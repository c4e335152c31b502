"""Image folders (``zfkernels.job.data``): discovery, decoding of odd files to RGB, failures, the
uint8 evaluation transform against torchvision's, and the DataLoader."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zfkernels.job import data as data_mod

from _images import GRAYSCALE, RESIZE_CROP, SAMPLES, load, load_files, photographs
from _visualize import jpeg_bytes, jpeg_decoding_device, photo, write_broken_files, write_photo


# -- discovery ---------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path) -> Path:
    """Images at several depths (a flat part and class folders), hidden files and folders, other
    files, links to a file, a broken link, a link loop, and a zfk output folder inside."""
    root = tmp_path / "data"
    for rel in ["z.jpg", "a.png", "n01/x.JPEG", "n01/b.jpeg", "n02/deep/c.webp", "n02/d.bmp", "n02/e.tif",
                ".hidden/h.jpg", "n01/.cache/i.png", "zfk-out/layers/f0000.png", "outside/o.png"]:
        write_photo(root / rel, len(rel))
    (root / "n01/.x.jpg").write_bytes((root / "a.png").read_bytes())  # a hidden file
    (root / "notes.txt").write_text("hello")
    (root / "n02/labels.csv").write_text("a,b")
    (root / "README").write_text("no extension")
    os.symlink("a.png", root / "link.png")  # a second name for a.png: listed once
    os.symlink("nowhere.png", root / "broken.png")  # a broken link
    os.symlink("..", root / "n02/loop")  # a link to a folder (a cycle): not entered (nor any other)
    os.symlink(root / "outside", root / "n01/elsewhere")
    return root


def test_discovery_finds_images_recursively_sorted(tree):
    found = data_mod.discover(tree, exclude=tree / "zfk-out")
    expected = ["a.png", "n01/b.jpeg", "n01/x.JPEG", "n02/d.bmp", "n02/deep/c.webp", "n02/e.tif", "outside/o.png",
                "z.jpg"]
    assert found.files == sorted(expected)
    ignored = dict(found.ignored)
    assert ignored["notes.txt"] == ignored["n02/labels.csv"] == ignored["README"] == "not an image file (extension)"
    assert ignored["n01/.x.jpg"] == "hidden file"
    assert ignored["broken.png"].startswith("not a regular file")
    assert ignored["link.png"] == "the same file as a.png"
    assert ignored["n02/loop"] == ignored["n01/elsewhere"] == "a link to a folder (not followed)"
    assert not any(".hidden" in f or ".cache" in f or "zfk-out" in f or "loop" in f for f in found.files)
    assert found.path(0) == tree / "a.png"


def test_discovery_limit_and_the_output_folder(tree):
    assert data_mod.discover(tree, limit=3).files == ["a.png", "n01/b.jpeg", "n01/x.JPEG"]
    # Without the exclusion, the output folder's PNGs would be taken for images.
    assert "zfk-out/layers/f0000.png" in data_mod.discover(tree).files
    assert "zfk-out/layers/f0000.png" not in data_mod.discover(tree, exclude=tree / "zfk-out").files
    # Also when --out is named by another path to the same folder.
    assert "zfk-out/layers/f0000.png" not in data_mod.discover(tree, exclude=tree / "n01" / ".." / "zfk-out").files


def test_sample_photographs_are_installed():
    images = data_mod.sample_images()
    assert len(images.files) == 7 and all(f.endswith(".jpg") for f in images.files)
    modes = {Image.open(images.path(i)).mode for i in range(len(images.files))}
    assert modes == {"RGB", "L"}  # one grayscale
    assert (images.root / "LICENSES.txt").is_file()


# -- decoding odd files --------------------------------------------------------------------------


def saved(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def pixels(path: Path) -> np.ndarray:
    image = data_mod.decode(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_grayscale_and_bilevel_become_gray_rgb(tmp_path):
    gray = np.array([[0, 77], [200, 255]], dtype=np.uint8)
    got = pixels(saved(Image.fromarray(gray, "L"), tmp_path / "g.png"))
    assert (got == gray[..., None]).all()
    bilevel = Image.fromarray(np.array([[0, 255]], dtype=np.uint8), "L").convert("1")
    assert pixels(saved(bilevel, tmp_path / "b.png")).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    # Left half pure cyan (C=255), right half pure yellow (Y=255); Pillow writes Adobe CMYK JPEGs.
    cmyk = np.zeros((16, 32, 4), dtype=np.uint8)
    cmyk[:, :16, 0] = 255
    cmyk[:, 16:, 2] = 255
    path = saved(Image.fromarray(cmyk, "CMYK"), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    got = pixels(path)
    assert np.abs(got[4:12, 2:12] - [0, 255, 255]).max() <= 6  # cyan
    assert np.abs(got[4:12, 20:30] - [255, 255, 0]).max() <= 6  # yellow


def test_palette_with_transparency_is_composited_over_white(tmp_path):
    image = Image.new("P", (4, 1))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    image.putdata([0, 1, 2, 0])
    image.info["transparency"] = 0  # palette entry 0 (black) is transparent
    path = saved(image, tmp_path / "p.png", transparency=0)
    assert Image.open(path).mode == "P"
    assert pixels(path).tolist() == [[[255, 255, 255], [255, 0, 0], [0, 0, 255], [255, 255, 255]]]
    gif = saved(image, tmp_path / "p.gif", transparency=0)
    assert pixels(gif).tolist() == [[[255, 255, 255], [255, 0, 0], [0, 0, 255], [255, 255, 255]]]


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 255, 0, 128]]], dtype=np.uint8)
    got = pixels(saved(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"))
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [0, 0, 255]
    assert np.abs(got[0, 2] - [127, 255, 127]).max() <= 1  # half-transparent green over white
    la = np.array([[[0, 0], [0, 255], [100, 51]]], dtype=np.uint8)
    got = pixels(saved(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    assert got[0, 0].tolist() == [255] * 3 and got[0, 1].tolist() == [0] * 3
    assert np.abs(got[0, 2] - (100 * 0.2 + 255 * 0.8)).max() <= 1


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    path = saved(Image.fromarray(values), tmp_path / "i16.png")
    assert Image.open(path).mode.startswith("I")
    assert pixels(path)[0, :, 0].tolist() == [0, 100, 255, 4]


def test_tiny_image_is_scaled_up_like_torchvision(tmp_path):
    path = write_photo(tmp_path / "tiny.png", 3, size=(5, 7))
    crop = data_mod.load_crop(path)
    assert crop.shape == (3, 224, 224) and crop.dtype == torch.uint8
    want = torch.from_numpy(np.array(RESIZE_CROP(Image.open(path).convert("RGB")))).permute(2, 0, 1)
    assert torch.equal(crop, want)


@pytest.mark.parametrize("size", [(2000, 60), (60, 2000), (3, 300)])
def test_extreme_aspect_ratio_samples_like_torchvision(tmp_path, size):
    """Beyond 16:1 the crop is resized straight from the source box Resize(256) + CenterCrop(224)
    would sample: the same positions and filter, rounded once instead of twice, so within one
    level of torchvision's result."""
    path = write_photo(tmp_path / "strip.png", 4, size=size)
    crop = data_mod.load_crop(path).permute(1, 2, 0).numpy().astype(int)
    want = np.asarray(RESIZE_CROP(Image.open(path).convert("RGB"))).astype(int)
    assert crop.shape == want.shape == (224, 224, 3)
    assert np.abs(crop - want).max() <= 1 and np.abs(crop - want).mean() < 0.5


@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_unreadable_files_raise(tmp_path, kind):
    names = {v: k for k, v in write_broken_files(tmp_path).items()}
    with pytest.raises(Exception) as caught:
        data_mod.load_crop(tmp_path / names[kind])
    reason = data_mod.describe_error(caught.value)
    assert "\n" not in reason and reason
    if kind != "truncated":
        assert reason == "not an image Pillow can read"
    else:
        assert "truncated" in reason or "OSError" in reason


# -- the transform against torchvision ---------------------------------------------------------------


def test_uint8_crops_then_normalize_equal_torchvision_bitwise():
    paths = photographs(extra=5)  # the package's seven, and five ImageNet ones where present
    assert Image.open(SAMPLES / GRAYSCALE).mode == "L"
    crops = torch.stack([data_mod.load_crop(path) for path in paths])
    ours = data_mod.normalize(crops)
    want = load_files(paths)
    assert ours.dtype == want.dtype == torch.float32
    assert torch.equal(ours, want)  # bitwise: the same roundings in the same order
    # What the network saw, back to pixels.
    assert torch.equal(data_mod.denormalize(ours), crops)


def test_normalize_on_generated_pictures_equals_torchvision_bitwise(tmp_path, device):
    """On every device: pass 1 normalises on the device the network runs on."""
    paths = [write_photo(tmp_path / f"{i}.png", i, size=(90 + 7 * i, 60)) for i in range(4)]
    crops = torch.stack([data_mod.load_crop(p) for p in paths])
    want = load(tmp_path, [p.name for p in paths])
    ours = data_mod.normalize(crops.to(device))
    assert ours.device.type == device
    assert torch.equal(ours.cpu(), want)
    assert torch.equal(data_mod.denormalize(ours).cpu(), crops)


# -- the loader ----------------------------------------------------------------------------------


@pytest.fixture
def mixed_folder(tmp_path) -> data_mod.ImageList:
    root = tmp_path / "data"
    for i in range(7):
        write_photo(root / f"img{i}.png", i)
    write_broken_files(root)
    return data_mod.discover(root)


def load_all(images: data_mod.ImageList, workers: int, size: int = 3, gpu_jpeg: bool = False):
    slots = data_mod.Slots(len(images.files), size)
    loader = data_mod.make_loader(images, slots.batches(range(slots.num_slots)), workers, pin_memory=False,
                                  gpu_jpeg=gpu_jpeg)
    return list(loader)


def test_loader_with_workers_yields_what_one_process_does(mixed_folder):
    serial = load_all(mixed_folder, 0)
    parallel = load_all(mixed_folder, 2)
    assert [b.slot for b in serial] == [b.slot for b in parallel] == [0, 1, 2, 3]
    for a, b in zip(serial, parallel):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
        assert a.failures == b.failures
    files = mixed_folder.files
    failed = {files[i]: reason for batch in serial for i, reason in batch.failures}
    assert set(failed) == {"truncated.jpg", "empty.png", "text.jpg"}
    decoded = [files[i] for batch in serial for i in batch.indices.tolist()]
    assert decoded == [f for f in files if f not in failed]
    # Each decoded crop is that file's own crop, in slot order.
    for batch in serial:
        for row, index in enumerate(batch.indices.tolist()):
            assert torch.equal(batch.images[row], data_mod.load_crop(mixed_folder.path(index)))


# -- GPU JPEG decoding -------------------------------------------------------------------------------


def test_only_whole_rgb_or_gray_jpegs_are_left_to_the_gpu_decoder():
    whole = jpeg_bytes(1, (120, 90))
    assert data_mod._gpu_decodable(whole)
    assert data_mod._gpu_decodable(whole + b"\x00" * 300)  # padding after the end marker
    for cut in (len(whole) // 3, len(whole) - 2, len(whole) - 1):
        assert not data_mod._gpu_decodable(whole[:cut])  # truncated: Pillow must refuse it
    gray, cmyk, png = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(photo(2, (40, 30))[..., 0], "L").save(gray, format="JPEG")
    Image.fromarray(np.full((30, 40, 4), 60, np.uint8), "CMYK").save(cmyk, format="JPEG")
    Image.fromarray(photo(2, (40, 30)), "RGB").save(png, format="PNG")
    assert data_mod._gpu_decodable(gray.getvalue())
    assert not data_mod._gpu_decodable(cmyk.getvalue()) and not data_mod._gpu_decodable(png.getvalue())


def encoded_folder(root: Path) -> data_mod.ImageList:
    """JPEGs for the batched decoder (RGB of several sizes, progressive, grayscale) and files it
    must leave to Pillow (CMYK, PNG, broken ones); a PNG sorts between two JPEGs, so a batch
    interleaves the two decoders' images."""
    root.mkdir()
    for i in range(5):
        (root / f"rgb{i}.jpg").write_bytes(jpeg_bytes(i, (300 + 20 * i, 200)))
    write_photo(root / "rgb1b.png", 21, size=(230, 250))
    (root / "progressive.jpg").write_bytes(jpeg_bytes(9, (260, 300), progressive=True))
    Image.fromarray(photo(7, (280, 210))[..., 0], "L").save(root / "gray.jpg")
    Image.fromarray(np.full((40, 60, 4), 60, np.uint8), "CMYK").save(root / "cmyk.jpg")
    write_broken_files(root)
    return data_mod.discover(root)


def test_batched_jpeg_decoding_matches_pillow_and_falls_back(tmp_path, device):
    device = jpeg_decoding_device(device)
    images = encoded_folder(tmp_path / "data")
    cpu_batches = load_all(images, 0, size=4)
    gpu_batches = load_all(images, 0, size=4, gpu_jpeg=True)
    assert any(b.encoded for b in gpu_batches)
    cpu_failed = sorted(f for b in cpu_batches for f in b.failures)
    gpu_failed, gpu_ok = [], {}
    for batch in gpu_batches:
        indices, crops, failures = data_mod.decode_on_device(batch, device)
        gpu_failed += batch.failures + failures
        assert crops.device.type == device.type and crops.dtype == torch.uint8
        assert indices.tolist() == sorted(indices.tolist())  # slot order
        gpu_ok.update({i: c.cpu() for i, c in zip(indices.tolist(), crops)})
    assert sorted(i for i, _ in gpu_failed) == sorted(i for i, _ in cpu_failed)  # truncated too
    cpu_ok = {i: c for b in cpu_batches for i, c in zip(b.indices.tolist(), b.images)}
    assert sorted(gpu_ok) == sorted(cpu_ok)
    for i, crop in cpu_ok.items():
        diff = (gpu_ok[i].int() - crop.int()).abs().float()
        # nvjpeg's IDCT and upsampling, and torchvision's tensor resize, differ from Pillow's.
        assert diff.mean() < 3.0 and diff.max() <= 64, images.files[i]


def test_a_jpeg_the_batched_decoder_refuses_is_decoded_by_pillow(tmp_path, device, monkeypatch):
    """A file the batched decoder refuses (as nvjpeg does some JPEGs Pillow reads) fails the
    whole batched call: each file is then tried alone, and the refused one goes to Pillow,
    giving exactly the CPU path's crop, in slot order with the others."""
    import torchvision.io

    device = jpeg_decoding_device(device)
    images = encoded_folder(tmp_path / "data")
    refused = (tmp_path / "data" / "progressive.jpg").read_bytes()
    real_decode = torchvision.io.decode_jpeg
    calls = []

    def refusing_decode(data, *args, **kwargs):
        batch = data if isinstance(data, list) else [data]
        calls.append(len(batch))
        if any(bytes(d.numpy().tobytes()) == refused for d in batch):
            raise RuntimeError("refused")
        return real_decode(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refusing_decode)
    cpu = {i: c for b in load_all(images, 0, size=4) for i, c in zip(b.indices.tolist(), b.images)}
    target = images.files.index("progressive.jpg")
    seen = {}
    for batch in load_all(images, 0, size=4, gpu_jpeg=True):
        indices, crops, failures = data_mod.decode_on_device(batch, device)
        assert indices.tolist() == sorted(indices.tolist()) and failures == []
        seen.update({i: c.cpu() for i, c in zip(indices.tolist(), crops)})
    assert torch.equal(seen[target], cpu[target])  # Pillow's crop, bit for bit
    assert sorted(seen) == sorted(cpu)
    assert any(n > 1 for n in calls) and calls.count(1) >= 2  # batched first, then one at a time


def test_decoding_workers_run_at_a_lower_priority():
    """A worker ignores SIGINT/SIGTERM (the main process checkpoints and stops it) and decodes
    at a lower priority than the forward (a child process, so this one keeps its own)."""
    import subprocess
    import sys

    probe = ("import os, signal; from zfkernels.job import data; before = os.nice(0); import multiprocessing; data._worker_init(multiprocessing.Semaphore(0), 0); "
             "print(os.nice(0) - before, signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "
             "signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    before = os.nice(0)
    assert out == [str(min(data_mod.WORKER_NICENESS, 19 - before)), "True", "True"]
