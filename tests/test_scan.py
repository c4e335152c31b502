"""Pass 1 (``zfkernels.job.scan``): the running top-K against brute-force Python sorts, the spatial
max against a direct argmax, the scan of real photographs against an independent forward, and
checkpoints."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

from zfkernels.job import data as data_mod
from zfkernels import models
from zfkernels.job.topk import EMPTY, LayerTop, merge_states, select_top, spatial_max
from zfkernels.job.checkpoint import ScanState
from zfkernels.job.scan import Scanner, run_scan

from _images import photographs
from _visualize import brute_force_topk, jpeg_decoding_device, photo_folder, real_folder, scan_plan, torchvision_decoded

# -- the ranking ---------------------------------------------------------------------------------


def python_top(candidates: List[Tuple[float, int, int]], k: int) -> List[Tuple[float, int, int]]:
    """(value, image, position) sorted by value descending then image ascending, NaN as -inf."""
    as_inf = [(-math.inf if math.isnan(v) else v, i, p) for v, i, p in candidates]
    return sorted(as_inf, key=lambda t: (-t[0], t[1]))[:k]


def rows_of(values, images, positions) -> List[List[Tuple[float, int, int]]]:
    return [list(zip(v, i, p)) for v, i, p in zip(values.tolist(), images.tolist(), positions.tolist())]


def random_candidates(generator: torch.Generator, rows: int, count: int, images: int):
    """Values from a small set (many ties, -inf too), distinct images per row in random order."""
    levels = torch.tensor([0.0, 0.5, 1.0, 2.0, -math.inf])
    values = levels[torch.randint(0, len(levels), (rows, count), generator=generator)]
    chosen = torch.stack([torch.randperm(images, generator=generator)[:count] for _ in range(rows)])
    positions = torch.randint(0, 1000, (rows, count), generator=generator)
    return values, chosen, positions


def on(device, *tensors: torch.Tensor) -> List[torch.Tensor]:
    return [t.to(device) for t in tensors]


def rows_on_cpu(*tensors: torch.Tensor) -> List[List[Tuple[float, int, int]]]:
    return rows_of(*(t.cpu() for t in tensors))


@pytest.mark.parametrize("k", [1, 3, 9, 40])
def test_select_top_equals_a_python_sort(k, device):
    g = torch.Generator().manual_seed(k)
    for _ in range(20):
        values, images, positions = random_candidates(g, 6, 25, 60)
        got = select_top(*on(device, values, images, positions), k)
        want = [python_top(row, k) for row in rows_of(values, images, positions)]
        assert rows_on_cpu(*got) == want


def test_select_top_counts_ranks_in_row_chunks_like_in_one(device, monkeypatch):
    """The rank counting is split into chunks of rows to bound its memory; any split gives the
    same selection (here: one row per chunk, and three)."""
    from zfkernels.job import topk

    g = torch.Generator().manual_seed(11)
    values, images, positions = random_candidates(g, 7, 30, 90)
    want = [python_top(row, 10) for row in rows_of(values, images, positions)]
    for budget in (1, 3 * 30 * 30):
        monkeypatch.setattr(topk, "RANK_BUDGET", budget)
        assert rows_on_cpu(*select_top(*on(device, values, images, positions), 10)) == want


def test_select_top_orders_the_whole_float_range_like_a_python_sort(device):
    """Negative values, both zeros, subnormals, huge magnitudes and infinities: the ranking key
    keeps the float order exactly (and -0.0 ties with +0.0, as Python compares them)."""
    g = torch.Generator().manual_seed(5)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, -3.4e38, 3.4e38, math.inf, -math.inf, 1.0, -1.0])
    for _ in range(20):
        values = torch.randn(4, 30, generator=g) * torch.tensor(10.0).pow(torch.randint(-30, 30, (4, 30), generator=g))
        picks = torch.randint(0, 2, (4, 30), generator=g).bool()
        values = torch.where(picks, special[torch.randint(0, len(special), (4, 30), generator=g)], values)
        images = torch.stack([torch.randperm(1000, generator=g)[:30] for _ in range(4)])
        positions = torch.randint(0, 50, (4, 30), generator=g)
        got = select_top(*on(device, values, images, positions), 12)
        want = [python_top(row, 12) for row in rows_of(values, images, positions)]
        assert [[(i, p) for _, i, p in row] for row in rows_on_cpu(*got)] == [[(i, p) for _, i, p in row] for row in want]


def test_layer_top_keeps_fewer_images_than_k_and_ranks_empty_slots_last(device):
    top = LayerTop.empty(torch.tensor([3, 7]), 5, (4, 4), torch.device(device))
    # Two images; one map of image 4 is -inf everywhere: still a real entry.
    top.merge(*on(device, torch.tensor([[1.0, -math.inf], [0.5, 0.5]]), torch.tensor([[4, 2], [4, 2]]),
                  torch.tensor([[5, 6], [7, 8]])))
    assert top.images.tolist() == [[4, 2, EMPTY, EMPTY, EMPTY], [2, 4, EMPTY, EMPTY, EMPTY]]
    assert top.entries(0) == [(4, 1.0, 1, 1), (2, -math.inf, 1, 2)]
    assert top.entries(1) == [(2, 0.5, 2, 0), (4, 0.5, 1, 3)]  # the tie goes to the earlier image


def test_merge_is_invariant_to_the_split_and_order_of_batches(device):
    """Any partition of the candidates into batches, merged in any order (as resuming and
    sharding do), gives the brute-force top-K."""
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    rows, count, k = 5, 48, 7
    values, images, positions = random_candidates(g, rows, count, count)
    # One candidate per image and row: sort the columns by image so a batch is a set of images.
    order = images.argsort(dim=1)
    values, images, positions = values.gather(1, order), images.gather(1, order), positions.gather(1, order)
    want = [python_top(row, k) for row in rows_of(values, images, positions)]
    for trial in range(25):
        cuts = sorted(rng.sample(range(1, count), rng.randint(0, 10)))
        pieces = [list(range(a, b)) for a, b in zip([0] + cuts, cuts + [count])]
        rng.shuffle(pieces)
        top = LayerTop.empty(torch.arange(rows), k, (40, 25), torch.device(device))
        for piece in pieces:
            cols = torch.tensor(piece)
            top.merge(*on(device, values[:, cols], images[:, cols], positions[:, cols]))
        assert rows_on_cpu(top.values, top.images, top.positions) == want, f"trial {trial}: {pieces}"
    # Two partial tops merged as states (what processes and checkpoints do) give the same.
    halves = []
    for cols in (torch.arange(0, count, 2), torch.arange(1, count, 2)):
        part = LayerTop.empty(torch.arange(rows), k, (40, 25), torch.device(device))
        part.merge(*on(device, values[:, cols], images[:, cols], positions[:, cols]))
        halves.append({"layer": part.state()})
    for states in (halves, halves[::-1]):
        merged = merge_states(states)["layer"]
        assert rows_of(merged.values, merged.images, merged.positions) == want


@pytest.mark.parametrize("k", [9, 32, 33, 100, 129, 300])
def test_running_top_k_in_every_size_regime_of_the_sort(k, device):
    """Pass 1's shapes: a running top-K that starts unfilled (-inf, EMPTY) merged with batches of
    64 candidates whose values are mostly -inf, ReLU zeros or the largest float, for K from 9 to
    300 (rows of 73 to 364 entries; the CUDA sorts we no longer use changed algorithm at 32 and
    128, and one of them failed on rows like these): after every batch the result equals a
    Python sort of the images seen so far."""
    g = torch.Generator().manual_seed(k)
    rows, total, batch = 12, 2 * k + 70, 64
    levels = torch.tensor([-math.inf, -math.inf, 0.0, 0.0, 0.25, 1.0, 3.4e38])
    values = levels[torch.randint(0, len(levels), (rows, total), generator=g)]
    values = torch.where(torch.rand(rows, total, generator=g) < 0.2, torch.randn(rows, total, generator=g), values)
    positions = torch.randint(0, 169, (rows, total), generator=g)
    top = LayerTop.empty(torch.arange(rows), k, (13, 13), torch.device(device))
    for start in range(0, total, batch):
        cols = torch.arange(start, min(start + batch, total))
        indices = cols.to(device)
        # As Scanner.update passes them: the batch's image indices expanded over the maps.
        top.merge(values[:, cols].to(device), indices.view(1, -1).expand(rows, -1), positions[:, cols].to(device))
        seen = int(cols[-1]) + 1
        want = [python_top(row, k) for row in rows_of(values[:, :seen], torch.arange(seen).expand(rows, -1),
                                                        positions[:, :seen])]
        got = rows_on_cpu(top.values, top.images, top.positions)
        assert [row[:len(w)] for row, w in zip(got, want)] == want, f"after {seen} images"
        assert all(entry == (-math.inf, EMPTY, 0) for row, w in zip(got, want) for entry in row[len(w):])


# -- the spatial max -------------------------------------------------------------------------------


def direct_max(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per (image, map), in Python: the largest value and the first (row-major) position holding
    it; a map holding a NaN is NaN at its first NaN (ranked as -inf, but shown as NaN)."""
    n, c, h, w = x.shape
    values = torch.empty(n, c)
    positions = torch.empty(n, c, dtype=torch.int64)
    for i in range(n):
        for j in range(c):
            flat = x[i, j].reshape(-1).tolist()
            nans = [p for p, v in enumerate(flat) if math.isnan(v)]
            if nans:
                values[i, j], positions[i, j] = math.nan, nans[0]
                continue
            best = max(flat)
            values[i, j], positions[i, j] = best, flat.index(best)
    return values, positions


@pytest.mark.parametrize("kind", ["ties", "relu", "nan"])
def test_spatial_max_equals_a_direct_argmax(layout, kind, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 7, 6, generator=g)
    if kind == "ties":
        x = torch.randint(0, 3, x.shape, generator=g).float()
    elif kind == "relu":
        x = torch.relu(x - 1.5)  # many all-zero maps: the max is at position 0
    else:
        x = torch.relu(x)
        x[0, 1, 2, 3] = x[0, 1, 5, 0] = x[2, 4, 6, 5] = float("nan")
        x[1, 2].fill_(float("nan"))
    want = direct_max(x)
    values, positions = spatial_max(layout(x.to(device)))  # the layout on the device: .to() would undo a slice
    assert torch.equal(values.cpu().isnan(), want[0].isnan()) and torch.equal(positions.cpu(), want[1])
    assert torch.equal(values.cpu().nan_to_num(), want[0].nan_to_num())


# -- the scan of real photographs --------------------------------------------------------------------


def as_document(result_layers, files, model) -> dict:
    """A scan result in topk.json's shape (boxes from the engine), for comparison."""
    from zfkernels.engine import Deconvnet

    dn = Deconvnet(model)
    out = {}
    for name, top in result_layers.items():
        out[name] = [{"channel": int(c), "top": [
            {"image": files[i], "value": v, "y": y, "x": x, "box": list(dn.receptive_field(name, y, x, (224, 224)))}
            for i, v, y, x in top.entries(j)]} for j, c in enumerate(top.channels.tolist())]
    return out


@pytest.fixture(scope="module")
def zfnet():
    return models.zfnet(seed=0).eval()


@pytest.fixture
def photos_with_twins(tmp_path) -> Path:
    """The package's seven photographs (one grayscale), three ImageNet ones where present, and
    two byte-identical copies: exact ties between images where the CPU computes both copies
    bitwise alike (most do), which the brute force gives to the earlier file."""
    return real_folder(tmp_path / "data", twins={"zz_twin_of_astronaut.jpg": "astronaut.jpg",
                                                 "chelsea_cat_twin.jpg": "chelsea_cat.jpg"})


def test_run_scan_of_real_photographs_equals_a_brute_force_scan(photos_with_twins, zfnet, device):
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5"]
    counts = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256}
    channels = {name: torch.arange(counts[name]) for name in layers}
    plan = scan_plan(photos_with_twins, layers, channels, top=4, batch_size=5)
    result = run_scan(copy.deepcopy(zfnet).to(device), plan, torch.device(device))
    files = plan.images.files
    want = brute_force_topk(zfnet, photos_with_twins, files, layers, None, 4, 5, device)
    assert as_document(result.layers, files, zfnet) == want
    assert result.scanned == len(files) == len(photographs(extra=3)) + 2 and result.skipped == []


def test_run_scan_of_batch_decoded_jpegs_equals_a_brute_force_scan(tmp_path, zfnet, device):
    """Pass 1 with the files' bytes decoded as batches on the device (nvjpeg on a GPU; libjpeg
    through the same code on the CPU) equals a brute force over torchvision's documented
    decode-then-transform of the same batches."""
    jpeg_decoding_device(device)
    photos = photographs(extra=2)
    root = real_folder(tmp_path / "data", photos)  # JPEGs, one grayscale
    layers = ["conv1", "conv4"]
    channels = {"conv1": torch.arange(96), "conv4": torch.arange(0, 384, 7)}
    plan = scan_plan(root, layers, channels, top=3, batch_size=4)
    result = run_scan(copy.deepcopy(zfnet).to(device), plan, torch.device(device), gpu_jpeg=True)
    files = plan.images.files
    want = brute_force_topk(zfnet, root, files, layers, None, 3, 4, device, load=torchvision_decoded(device))
    want["conv4"] = [want["conv4"][c] for c in channels["conv4"].tolist()]
    assert as_document(result.layers, files, zfnet) == want
    assert result.scanned == len(photos) and result.skipped == []


def test_resumed_and_sharded_scans_equal_the_uninterrupted_one(tmp_path, zfnet, device):
    """Slots scanned in pieces (a resume from a checkpoint state, two 'processes' merged) give
    the same top-K as one uninterrupted scan, on generated pictures with a subset of maps."""
    root = photo_folder(tmp_path / "data", 11)
    layers = ["conv1", "conv2"]
    channels = {"conv1": torch.tensor([0, 5, 17, 95]), "conv2": torch.tensor([1, 2, 200])}
    plan = scan_plan(root, layers, channels, top=3, batch_size=3)  # 4 slots, the last of 2
    model = copy.deepcopy(zfnet).to(device)
    whole = run_scan(model, plan, torch.device(device))

    def partial(slots) -> Scanner:
        net = copy.deepcopy(model).to(memory_format=torch.channels_last)  # as run_scan runs it
        scanner = Scanner(net, layers, channels, 3, torch.device(device))
        for slot in slots:
            idx = plan.slots.indices(slot)
            crops = torch.stack([data_mod.load_crop(plan.images.path(i)) for i in idx]).to(device)
            with torch.inference_mode():
                scanner.update(data_mod.normalize(crops).contiguous(memory_format=torch.channels_last),
                               torch.tensor(idx, device=device))
        return scanner

    first = partial([3, 1])
    resumed = run_scan(model, plan, torch.device(device),
                       resume=ScanState(plan.fingerprint, [1, 3], first.state(), [], 5, False))
    assert as_document(resumed.layers, plan.images.files, zfnet) == as_document(whole.layers, plan.images.files, zfnet)
    assert resumed.scanned == whole.scanned == 11
    other = partial([0, 2])
    other.merge_states([first.state()])
    assert as_document(other.layers, plan.images.files, zfnet) == as_document(whole.layers, plan.images.files, zfnet)


# -- checkpoints ---------------------------------------------------------------------------------


def test_run_scan_writes_a_complete_checkpoint_with_the_skipped_files(tmp_path, zfnet):
    root = photo_folder(tmp_path / "data", 5)
    (root / "img002.png").write_bytes(b"")  # unreadable: skipped, recorded
    plan = scan_plan(root, ["conv1"], {"conv1": torch.tensor([0, 1])}, top=2, batch_size=2)
    checkpoint = tmp_path / "ck.pt"
    result = run_scan(zfnet, plan, torch.device("cpu"), checkpoint=checkpoint, checkpoint_every=0)
    state = ScanState.load(checkpoint)
    assert state.complete and state.done == [0, 1, 2] and state.scanned == 4 == result.scanned
    assert state.skipped == result.skipped == [(2, "not an image Pillow can read")]
    assert state.fingerprint == {"test": 1}
    assert torch.equal(state.topk["conv1"]["values"], result.layers["conv1"].values)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_signal_during_the_final_checkpoint_write_stops_after_it(tmp_path, zfnet, monkeypatch):
    """Ctrl-C while pass 1 writes its last checkpoint is not lost: the write completes, then the
    scan stops as for a signal between batches, and the checkpoint it leaves is whole."""
    import os
    import signal

    from zfkernels.job.scan import ScanInterrupted

    root = photo_folder(tmp_path / "data", 4)
    plan = scan_plan(root, ["conv1"], {"conv1": torch.tensor([0, 1])}, top=2, batch_size=2)
    checkpoint = tmp_path / "ck.pt"
    save = ScanState.save

    def save_then_signal(self, path):
        save(self, path)
        if self.complete:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag

    monkeypatch.setattr(ScanState, "save", save_then_signal)
    with pytest.raises(ScanInterrupted) as stopped:
        run_scan(zfnet, plan, torch.device("cpu"), checkpoint=checkpoint, checkpoint_every=3600)
    assert stopped.value.signum == signal.SIGINT
    state = ScanState.load(checkpoint)
    assert state.complete and state.done == [0, 1] and state.scanned == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_checkpoint_round_trip(tmp_path):
    top = LayerTop.empty(torch.tensor([2, 9]), 3, (13, 13), torch.device("cpu"))
    top.merge(torch.tensor([[3.0, 1.0], [0.25, -math.inf]]), torch.tensor([[0, 7], [0, 7]]),
              torch.tensor([[12, 168], [0, 5]]))
    state = ScanState({"arch": "zfnet", "features": {"conv5": [2, 9]}, "weights": None}, [4, 0, 2],
                      {"conv5": top.state()}, [(3, "truncated"), (1, "not an image")], 17, False)
    path = tmp_path / "checkpoint.pt"
    state.save(path)
    back = ScanState.load(path)
    assert back.fingerprint == state.fingerprint and back.done == [0, 2, 4] and back.scanned == 17
    assert back.skipped == [(1, "not an image"), (3, "truncated")] and back.complete is False
    restored = LayerTop.from_state(back.topk["conv5"], torch.device("cpu"))
    for key in ("channels", "values", "images", "positions"):
        assert torch.equal(getattr(restored, key), getattr(top, key)), key
    assert restored.map_size == (13, 13)


class NotAllowed:
    """Unpickling this needs weights_only=False: a checkpoint must never run code."""


@pytest.mark.parametrize("kind", ["garbage", "truncated", "other version", "missing keys", "not a dict", "pickled object"])
def test_a_corrupt_or_foreign_checkpoint_is_refused(tmp_path, kind):
    path = tmp_path / "checkpoint.pt"
    good = ScanState({"a": 1}, [0], {}, [], 3, False)
    good.save(path)
    if kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif kind == "other version":
        torch.save({"version": 999, "fingerprint": {}, "done": [], "topk": {}, "skipped": [], "scanned": 0,
                    "complete": False}, path)
    elif kind == "missing keys":
        torch.save({"version": 1, "fingerprint": {"a": 1}}, path)
    elif kind == "not a dict":
        torch.save([1, 2, 3], path)
    else:
        torch.save({"version": 1, "payload": NotAllowed()}, path)
    with pytest.raises(ValueError, match=r"checkpoint .*(unreadable|another version|not a zfk checkpoint)"):
        ScanState.load(path)
