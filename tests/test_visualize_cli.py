"""``zfk visualize`` end to end: ``topk.json`` against an independent brute-force scan, the sample
photographs, odd and broken files, resuming after SIGKILL/SIGINT/SIGTERM, two processes under
torchrun, and every bad invocation of issue #4."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import zfkernels
from zfkernels import models
from zfkernels.job.checkpoint import CHECKPOINT_VERSION, ScanState

from conftest import CUDA_REASON
from _visualize import (REPO, brute_force_topk, jpeg_decoding_device, photo, photo_folder, read_topk, real_folder,
                        run_zfk, subprocess_env, torch_threads, torchvision_decoded, visualize, write_broken_files,
                        write_photo, zfk, zfk_command)

BIN = Path(sys.executable).parent
SAMPLES = sorted(p.name for p in (Path(zfkernels.__file__).parent / "sample_images").glob("*.jpg"))


# -- the result against a brute-force scan --------------------------------------------------------


@pytest.fixture(params=["real", "generated"])
def folder(request, tmp_path) -> Path:
    if request.param == "real":
        # exact ties: the earlier file wins
        root = real_folder(tmp_path / "data", twins={"zz_copy_of_coffee.jpg": "coffee.jpg"})
    else:
        root = photo_folder(tmp_path / "data", 12)
        shutil.copyfile(root / "img004.png", root / "img004_copy.png")
    return root


def test_topk_json_equals_a_brute_force_scan(folder, tmp_path, capsys, device):
    out = tmp_path / "out"
    features = [0, 1, 2, 3, 90]
    status, _, err = zfk(visualize(folder, out, "--layers", "conv3,conv1", "--features", "0-3,90", "--top", "5",
                                   "--batch-size", "4", "--decoder", "pillow", device=device), capsys)
    assert status == 0, err
    document = read_topk(out)
    files = sorted(p.name for p in folder.iterdir())
    want = brute_force_topk(models.zfnet(seed=0).eval(), folder, files, ["conv1", "conv3"], features, 5, 4, device)
    assert document["layers"] == want

    # The schema of issue #4, in network order, best first.
    assert {"arch", "weights", "preprocess", "layers"} <= set(document)
    assert document["arch"] == "zfnet" and document["weights"] is None and document["untrained"] is True
    pre = document["preprocess"]
    assert (pre["resize"], pre["crop"], pre["mean"], pre["std"]) == (256, 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert list(document["layers"]) == ["conv1", "conv3"]
    for maps in document["layers"].values():
        assert [m["channel"] for m in maps] == features and all(set(m) == {"channel", "top"} for m in maps)
        for m in maps:
            assert len(m["top"]) == 5 and len({e["image"] for e in m["top"]}) == 5  # one entry per image
            assert all(set(e) == {"image", "value", "y", "x", "box"} for e in m["top"])
            values = [e["value"] for e in m["top"]]
            assert values == sorted(values, reverse=True)
    # conv1 is 7x7, stride 2, padding 1: its boxes by hand.
    for m in document["layers"]["conv1"]:
        for e in m["top"]:
            y, x = e["y"], e["x"]
            assert e["box"] == [max(2 * x - 1, 0), max(2 * y - 1, 0), min(2 * x + 6, 224), min(2 * y + 6, 224)]
    # The pages name the same images with their values.
    page = (out / "layer-conv1.html").read_text("utf-8")
    for e in document["layers"]["conv1"][0]["top"]:
        assert f"{e['value']:.4g}</span> <span class=\"f\" title=\"{e['image']}\">" in page


@pytest.mark.cuda
@pytest.mark.skipif(not zfkernels.has_cuda(), reason=CUDA_REASON)
def test_nvjpeg_run_equals_a_brute_force_scan_of_gpu_decoded_images(tmp_path, capsys):
    jpeg_decoding_device("cuda")
    root = real_folder(tmp_path / "data")  # JPEGs only (one grayscale): all decoded on the GPU
    out = tmp_path / "out"
    status, _, err = zfk(visualize(root, out, "--layers", "conv2,conv5", "--features", "0-7", "--top", "4",
                                   "--batch-size", "4", "--decoder", "nvjpeg", device="cuda"), capsys)
    assert status == 0, err
    document = read_topk(out)
    assert document["preprocess"]["decoder"] == "nvjpeg"
    files = sorted(p.name for p in root.iterdir())
    want = brute_force_topk(models.zfnet(seed=0).eval(), root, files, ["conv2", "conv5"], list(range(8)), 4, 4,
                            "cuda", load=torchvision_decoded("cuda"))
    assert document["layers"] == want


def test_sample_photographs_without_data(tmp_path, capsys):
    out = tmp_path / "out"
    status, stdout, err = zfk(["visualize", "--out", out, "--layers", "conv1", "--features", "0-1", "--top", "3",
                               "--workers", "0", "--device", "cpu"], capsys)
    assert status == 0, err
    assert "WARNING" in err and "UNTRAINED" in err  # said loudly
    assert "pass 1 (scan)" in err and "pass 2 (project)" in err and "img/s" in err  # progress bars
    assert "7 images scanned, 0 skipped" in stdout and "UNTRAINED" in stdout
    for stage in ("pass 1", "pass 2", "render", "total"):
        assert f"{stage} " in stdout
    document = read_topk(out)
    entries = [e for m in document["layers"]["conv1"] for e in m["top"]]
    assert len(entries) == 6 and {e["image"] for e in entries} <= set(SAMPLES)
    assert document["untrained"] is True and document["weights"] is None
    index = (out / "index.html").read_text("utf-8")
    assert 'class="warn"' in index and "UNTRAINED" in index and "not ImageNet" in index


def odd_but_valid(root: Path) -> list:
    """Files that must decode: CMYK, palette with transparency, RGBA, LA, 16-bit, grayscale,
    tiny, a long strip, a GIF, a WebP."""
    root.mkdir(parents=True, exist_ok=True)
    rgb = photo(11, (60, 44))
    Image.fromarray(np.dstack([rgb, 255 - rgb[..., :1]]), "CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rgb, "RGB").quantize(16).save(root / "palette.png", transparency=0)
    Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA").save(root / "alpha.png")
    Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), "LA").save(root / "gray_alpha.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(root / "sixteen.png")
    Image.fromarray(rgb[..., 2], "L").save(root / "gray.jpg")
    write_photo(root / "tiny.png", 12, size=(5, 7))
    write_photo(root / "strip.png", 13, size=(1200, 40))
    Image.fromarray(rgb, "RGB").quantize(32).save(root / "anim.gif")
    Image.fromarray(rgb, "RGB").save(root / "photo.webp")
    return sorted(p.name for p in root.iterdir())


def test_broken_and_odd_files_are_skipped_or_decoded(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    valid = odd_but_valid(data)
    write_photo(data / "class_a" / "a.png", 1)
    valid = sorted(valid + ["class_a/a.png"])
    broken = write_broken_files(data)
    (data / "notes.txt").write_text("not an image")
    status, stdout, err = zfk(visualize(data, out, "--layers", "conv1", "--features", "0-1", "--top", "14",
                                        "--batch-size", "4", "--workers", "2"), capsys)
    assert status == 0, err
    document = read_topk(out)
    for m in document["layers"]["conv1"]:
        assert sorted(e["image"] for e in m["top"]) == valid  # every decodable file, nothing else
    lines = (out / "skipped.txt").read_text("utf-8").splitlines()[1:]
    logged = dict(line.split("\t") for line in lines)
    assert set(logged) == set(broken) | {"notes.txt"}
    assert logged["empty.png"] == logged["text.jpg"] == "not an image Pillow can read"
    assert "truncated" in logged["truncated.jpg"]
    assert logged["notes.txt"] == "not an image file (extension)"
    run = json.loads((out / "run.json").read_text())
    assert (run["images"], run["scanned"], run["skipped"]) == (len(valid) + 3, len(valid), 4)
    assert f"{len(valid)} images scanned, 4 skipped" in stdout


# -- resuming ------------------------------------------------------------------------------------

RESUMABLE = ["--layers", "conv1,conv2", "--features", "0-3", "--top", "3", "--batch-size", "1", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """40 pictures (40 batch slots of 30-100 ms each here, a checkpoint after each) and the
    uninterrupted result."""
    work = tmp_path_factory.mktemp("resume")
    data = photo_folder(work / "data", 40, seed=100)
    reference = work / "reference"
    status, _, _ = zfk(visualize(data, reference, *RESUMABLE))
    assert status == 0
    return data, read_topk(reference)


def complete_checkpoint(out: Path) -> bool:
    """Whether pass 1's final (complete) checkpoint exists: pass 2 is starting."""
    try:
        return ScanState.load(out / "checkpoint.pt").complete
    except ValueError:  # not written yet
        return False


def start_and_wait_for_checkpoint(data: Path, out: Path,
                                  ready: Callable[[Path], bool] = lambda out: (out / "checkpoint.pt").exists(),
                                  what: str = "no checkpoint appeared") -> subprocess.Popen:
    """``zfk visualize`` in a subprocess, returned once ``ready(out)`` (by default: its first
    checkpoint exists, so pass 1 is under way with most of its 40 slots still ahead)."""
    process = subprocess.Popen(zfk_command(*visualize(data, out, *RESUMABLE)), env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 120
    while not ready(out):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            _, err = process.communicate()
            pytest.fail(f"{what} (exit {process.returncode}): {err[-2000:]}")
        time.sleep(0.005)
    return process


def assert_interrupted_checkpoint(out: Path) -> ScanState:
    state = ScanState.load(out / "checkpoint.pt")
    assert not state.complete and 0 < len(state.done) < 40, state.done
    assert state.done == list(range(len(state.done)))  # one process: the slots in order
    assert state.scanned == len(state.done)
    # Nothing that looks like a finished gallery.
    assert not (out / "index.html").exists() and not (out / "topk.json").exists()
    return state


def resume_and_compare(data: Path, out: Path, reference: dict, capsys) -> None:
    status, _, err = zfk(visualize(data, out, *RESUMABLE, "--resume"), capsys)
    assert status == 0, err
    assert read_topk(out) == reference
    assert ScanState.load(out / "checkpoint.pt").complete


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(resumable, tmp_path, capsys):
    data, reference = resumable
    out = tmp_path / "out"
    process = start_and_wait_for_checkpoint(data, out)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    if process.returncode == 0:
        pytest.fail("the run finished before it could be killed: give it more images")
    assert process.returncode == -signal.SIGKILL
    assert_interrupted_checkpoint(out)
    resume_and_compare(data, out, reference, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_with_a_checkpoint_and_a_message(resumable, tmp_path, capsys, signum):
    data, reference = resumable
    out = tmp_path / "out"
    process = start_and_wait_for_checkpoint(data, out)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err
    name = signal.Signals(signum).name
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"zfk visualize: interrupted by {name}; pass 1 checkpoint written to ") and "--resume" in last
    assert_interrupted_checkpoint(out)
    resume_and_compare(data, out, reference, capsys)


@pytest.mark.slow
def test_ctrl_c_in_pass_2_leaves_no_gallery_and_resume_goes_straight_to_pass_2(resumable, tmp_path, capsys):
    data, reference = resumable
    out = tmp_path / "out"
    process = start_and_wait_for_checkpoint(data, out, complete_checkpoint, "pass 2 was not caught under way")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    # The signal lands in pass 2, or (on a loaded machine) while pass 1 is still closing after
    # its complete checkpoint: pass 1's own stop then reports it. Either way the run ends with
    # 130, presents no gallery, and --resume goes straight to pass 2.
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert last == "zfk visualize: interrupted" or last.startswith("zfk visualize: interrupted by SIGINT; pass 1"), err
    assert not (out / "index.html").exists()  # nothing presented as a finished gallery
    written = (out / "checkpoint.pt").stat().st_mtime_ns
    status, _, err = zfk(visualize(data, out, *RESUMABLE, "--resume"), capsys)
    assert status == 0, err
    assert read_topk(out) == reference and (out / "index.html").exists()
    assert (out / "checkpoint.pt").stat().st_mtime_ns == written  # pass 1 was not run again


def test_resume_with_other_settings_or_a_bad_checkpoint_is_refused(tmp_path, capsys):
    data, out = photo_folder(tmp_path / "data", 5), tmp_path / "out"
    args = visualize(data, out, "--layers", "conv1", "--features", "0-2", "--top", "2", "--batch-size", "2")
    assert zfk(args, capsys)[0] == 0
    first = read_topk(out)
    # A finished checkpoint: --resume goes straight to pass 2, with the same result.
    os.remove(out / "topk.json")
    status, _, err = zfk(args + ["--resume"], capsys)
    assert status == 0 and read_topk(out) == first
    for change, key in ((["--top", "3"], "top"), (["--batch-size", "3"], "batch_size"),
                        (["--features", "0-1"], "features"), (["--seed", "5"], "seed"),
                        (["--limit", "4"], "image_files, image_names, images")):
        status, _, err = zfk(args + change + ["--resume"], capsys)
        last = err.strip().splitlines()[-1]
        assert status == 2 and last.startswith("zfk visualize: error: --resume: ") and f"({key} differ)" in last
        assert "Traceback" not in err
    for corrupt in (b"garbage", b""):
        (out / "checkpoint.pt").write_bytes(corrupt)
        status, _, err = zfk(args + ["--resume"], capsys)
        assert status == 2 and "--resume: checkpoint" in err and "without --resume" in err
    torch.save({"version": CHECKPOINT_VERSION}, out / "checkpoint.pt")  # this version, without its contents
    status, _, err = zfk(args + ["--resume"], capsys)
    assert status == 2 and "not a zfk checkpoint" in err and "Traceback" not in err


def test_an_image_unreadable_in_pass_2_is_marked_and_logged(tmp_path, capsys):
    data, out = photo_folder(tmp_path / "data", 4), tmp_path / "out"
    args = visualize(data, out, "--layers", "conv1", "--features", "0-1", "--top", "4")
    assert zfk(args, capsys)[0] == 0
    first = read_topk(out)
    # Between pass 1 (in the checkpoint) and pass 2; with its size and time kept, so --resume does
    # not see the change (the checkpoint identifies files by size and modification time).
    victim = data / "img002.png"
    before = victim.stat()
    victim.write_bytes(b"\0" * before.st_size)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    status, _, err = zfk(args + ["--resume"], capsys)
    assert status == 0, err
    assert read_topk(out) == first  # pass 1's selection stands
    page = (out / "layer-conv1.html").read_text("utf-8")
    assert page.count("(could not be read again)") == 2  # img002 is in both maps' top 4
    lines = (out / "skipped.txt").read_text("utf-8").splitlines()[1:]
    assert lines == ["img002.png\tnot an image Pillow can read"]


# -- two processes --------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_under_torchrun_equal_one(tmp_path, capsys):
    torchrun = BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"{torchrun} is absent")
    data = photo_folder(tmp_path / "data", 25, seed=300)
    (data / "img007.png").write_bytes(b"")  # a failure in one process's share
    (data / "notes.txt").write_text("x")
    args = ["--layers", "conv1,conv2", "--features", "0-5", "--top", "4", "--batch-size", "4"]  # 7 slots: 4 + 3
    single = tmp_path / "single"
    with torch_threads(1):
        assert zfk(visualize(data, single, *args), capsys)[0] == 0
    double = tmp_path / "double"
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "zfkernels", "visualize", "--data",
               str(data), "--out", str(double), "--device", "cpu", "--workers", "0", *args]
    result = subprocess.run(command, env=subprocess_env(threads=1), capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_topk(double) == read_topk(single)
    assert (double / "skipped.txt").read_text() == (single / "skipped.txt").read_text()
    runs = [json.loads((d / "run.json").read_text()) for d in (single, double)]
    assert [r["processes"] for r in runs] == [1, 2] and runs[0]["scanned"] == runs[1]["scanned"] == 24
    # One progress bar, counting both processes' images, to the end.
    assert "pass 1 (scan): 100%" in result.stderr and "25/25" in result.stderr
    assert result.stdout.count("images scanned") == 1  # one summary (rank 0)


# -- bad invocations -------------------------------------------------------------------------------


@pytest.fixture
def small_data(tmp_path) -> Path:
    return photo_folder(tmp_path / "data", 2)


def alexnet_features_file(path: Path) -> Path:
    """An AlexNet's convolution weights (another architecture's file; the classifier is left out
    to keep the file small: it does not fit either way)."""
    state = {k: v for k, v in models.alexnet(seed=0).state_dict().items() if k.startswith("features.")}
    torch.save(state, path)
    return path


BAD = {
    "missing data folder": (lambda t, d: ["--data", t / "nope"], "--data", "no such folder"),
    "data is a file": (lambda t, d: ["--data", d / "img000.png"], "--data", "not a folder"),
    "empty data folder": (lambda t, d: ["--data", (t / "empty").mkdir() or t / "empty"], "--data", "no image files"),
    "unknown layer": (lambda t, d: ["--data", d, "--layers", "conv1,fc6"], "--layers", "'fc6'"),
    "features out of range": (lambda t, d: ["--data", d, "--features", "0-96"], "--features", "96 is out of range for conv1"),
    "features out of range of a bigger layer": (lambda t, d: ["--data", d, "--layers", "conv3", "--features", "384"],
                                                "--features", "384 is out of range for conv3"),
    "features not a list": (lambda t, d: ["--data", d, "--features", "7-3"], "--features", "empty range"),
    "weights of another architecture": (lambda t, d: ["--data", d, "--weights", alexnet_features_file(t / "alexnet.pth")],
                                        "--weights", "do not fit the architecture"),
    "missing weights": (lambda t, d: ["--data", d, "--weights", t / "none.pth"], "--weights", "does not exist"),
    "out under a regular file": (lambda t, d: ["--data", d, "--out", d / "img000.png" / "out"], "--out", "cannot create"),
    "out under /proc": (lambda t, d: ["--data", d, "--out", "/proc/zfk-test/out"], "--out", "cannot create"),
    "out holding other files": (lambda t, d: ["--data", d, "--out", d], "--out", "not a zfk output folder"),
    "negative checkpoint interval": (lambda t, d: ["--data", d, "--checkpoint-every", "-1"], "--checkpoint-every", "at least 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_invocations_exit_with_one_line(case, tmp_path, small_data, capsys):
    make, argument, message = BAD[case]
    out = tmp_path / "out"
    args = ["visualize", "--out", out, "--device", "cpu", "--workers", "0", *make(tmp_path, small_data)]
    status, stdout, err = zfk(args, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"zfk visualize: error: {argument}") and message in lines[0], lines[0]
    assert not out.exists()  # arguments are checked before anything is written


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: --device cuda is no error here")
def test_cuda_asked_for_without_a_gpu(tmp_path, small_data, capsys):
    status, _, err = zfk(["visualize", "--data", small_data, "--out", tmp_path / "out", "--device", "cuda"], capsys)
    assert status == 2 and err.strip() == ("zfk visualize: error: --device cuda: CUDA was asked for but no CUDA GPU "
                                           "is visible (use --device cpu)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_nvjpeg_asked_for_without_a_gpu(tmp_path, small_data, capsys):
    status, _, err = zfk(visualize(small_data, tmp_path / "out", "--decoder", "nvjpeg"), capsys)
    assert status == 2 and err.strip().startswith("zfk visualize: error: --decoder nvjpeg: ")


def test_the_console_script_prints_no_traceback(tmp_path):
    script = BIN / "zfk"
    if not script.exists():
        pytest.skip(f"{script} is absent (the package is not installed in this environment)")
    result = subprocess.run([str(script), "visualize", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"zfk visualize: error: --data {tmp_path / 'nope'}: no such folder"


# -- help --------------------------------------------------------------------------------------


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        zfk(["--help"])
    assert exit_.value.code == 0
    top = capsys.readouterr().out
    assert "zfk visualize" in top and "COMMAND --help" in top
    with pytest.raises(SystemExit) as exit_:
        zfk(["visualize", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--data DIR", "--arch ARCH", "zfnet (default), alexnet, vgg16", "--weights PATH", "--layers", "--top K",
                   "--features", "--batch-size", "--workers", "--device", "--out DIR", "--resume", "--limit N",
                   "--quiet", "--checkpoint-every", "--decoder", "--mode", "--seed", "UNTRAINED", "torchrun"):
        assert option in text, option


def test_python_dash_m_help():
    result = run_zfk("--help", timeout=120)
    assert result.returncode == 0 and "zfk visualize" in result.stdout and not result.stderr


def test_one_run_builds_one_deconvnet(tmp_path, capsys, monkeypatch):
    """Sizes, channels and receptive fields come from the traced graph's geometry, computed once
    per model and size (docs/engine.md): only pass 2, which projects, builds a ``Deconvnet``
    (the README's command built 7 before issue #18)."""
    from zfkernels.engine import Deconvnet, ModelGeometry

    built = []
    original = ModelGeometry.__init__

    def counting(self, model):
        built.append(type(self))
        original(self, model)

    monkeypatch.setattr(ModelGeometry, "__init__", counting)
    status, _, err = zfk(["visualize", "--out", tmp_path / "out", "--layers", "conv2,conv5", "--features", "0-1",
                          "--top", "2", "--workers", "0", "--device", "cpu"], capsys)
    assert status == 0, err
    assert built.count(Deconvnet) == 1, built
