"""The training data: an ImageNet-layout folder (``train/`` and ``val/``, one subfolder per
class, as torchvision's ``ImageFolder``) and the paper's augmentation.

Augmentation (Section 3 of the paper): each image is resized so its short side is ``resize``
(256), its centre ``resize`` x ``resize`` square is cut out, and a random ``crop`` x ``crop``
(224) sub-crop of it, flipped horizontally with probability 1/2, is what the network trains on.
Validation uses the centre crop (which is torchvision's evaluation transform, ``Resize(256)`` +
``CenterCrop(224)``), or, with ``ten_crop``, the four corner crops and the centre one and their
mirror images, whose softmax outputs are averaged.

The random choices are not drawn inside the loader's workers: each epoch's order, crop offsets
and flips are drawn up front from a generator seeded by ``(seed, epoch)`` (:func:`epoch_plan`).
So they depend neither on the number of workers or processes nor on where a run was resumed.

Files that cannot be decoded are skipped, and reported with the batch they were in.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
from torchvision import transforms
from torchvision.datasets.folder import find_classes, make_dataset
from torchvision.transforms import functional as TF

from ..errors import UsageError
from ..job import data as job_data
from .bounds import wrap_seed


@dataclass(frozen=True)
class Split:
    """One split of the folder: ``samples`` are ``(path, class index)``, sorted as ImageFolder
    sorts them; ``classes`` the class folder names in index order."""

    root: Path
    classes: List[str]
    samples: List[Tuple[str, int]]

    def __len__(self) -> int:
        return len(self.samples)


def _is_image(path: str) -> bool:
    """The files ``zfk visualize`` would consider: an extension Pillow opens, not hidden."""
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in job_data.image_extensions()


def load_split(root: Path, name: str) -> Split:
    """``root/name`` (a folder) as an ImageFolder split; no class folders, or a class without
    images, is a :class:`UsageError` naming it."""
    folder = root / name
    try:
        classes, to_index = find_classes(str(folder))
    except FileNotFoundError:
        raise UsageError(f"--data {root}: {name}/ has no class subfolders") from None
    samples = make_dataset(str(folder), to_index, is_valid_file=_is_image, allow_empty=True)
    counts = [0] * len(classes)
    for _, label in samples:
        counts[label] += 1
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise UsageError(f"--data {root}: {name}/{empty[0]}/ holds no images"
                         f"{f' (nor do {len(empty) - 1} other class folders)' if len(empty) > 1 else ''}")
    return Split(folder, list(classes), [(str(p), int(c)) for p, c in samples])


def load_folder(root: Path) -> Tuple[Split, Split]:
    """``(train, val)`` of an ImageNet-layout folder; their classes must be the same."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"--data {root}: no such folder")
    if not any(root.iterdir()):
        raise UsageError(f"--data {root}: the folder is empty (expected train/ and val/ with a subfolder per class)")
    missing = [name for name in ("train", "val") if not (root / name).is_dir()]
    if missing:
        raise UsageError(f"--data {root}: no {' and no '.join(f'{name}/' for name in missing)} folder (expected train/ "
                         "and val/, each with one subfolder per class, as ImageNet)")
    train, val = load_split(root, "train"), load_split(root, "val")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        detail = "; ".join(part for part in (
            f"only in train/: {', '.join(only_train[:5])}" if only_train else "",
            f"only in val/: {', '.join(only_val[:5])}" if only_val else "") if part)
        raise UsageError(f"--data {root}: train/ and val/ have different classes ({detail})")
    return train, val


# -- the augmentation plan ---------------------------------------------------------------------


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's random choices: the visiting ``order`` of the training images and, per
    image index, the ``top``/``left`` offset of its crop and whether it is ``flipped``."""

    order: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    flipped: torch.Tensor

    def batches(self, batch_size: int) -> List[List[int]]:
        """The global batches of the epoch, as lists of image indices (the last may be short)."""
        order = self.order.tolist()
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def item(self, index: int) -> Tuple[int, int, int, bool]:
        """What the dataset needs to make image ``index``'s training crop."""
        return index, int(self.top[index]), int(self.left[index]), bool(self.flipped[index])


def epoch_plan(count: int, resize: int, crop: int, seed: int, epoch: int) -> EpochPlan:
    """The random choices of ``epoch`` for ``count`` training images, from ``(seed, epoch)`` only."""
    generator = torch.Generator().manual_seed(wrap_seed(seed * 1_000_003 + epoch))  # a stream per (seed, epoch)
    order = torch.randperm(count, generator=generator)
    span = resize - crop + 1
    top = torch.randint(0, span, (count,), generator=generator)
    left = torch.randint(0, span, (count,), generator=generator)
    flipped = torch.randint(0, 2, (count,), generator=generator).bool()
    return EpochPlan(order, top, left, flipped)


# -- datasets ----------------------------------------------------------------------------------

Sample = Tuple[object, int, int, str]  # (uint8 image or None, label, index, reason it was skipped)


class TrainCrops(torch.utils.data.Dataset):
    """Items are :meth:`EpochPlan.item` tuples; each gives the uint8 ``(3, crop, crop)`` crop."""

    def __init__(self, split: Split, resize: int, crop: int) -> None:
        self.split = split
        self.crop = crop
        self.square = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(resize)])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: Tuple[int, int, int, bool]) -> Sample:
        index, top, left, flipped = item
        path, label = self.split.samples[index]
        try:
            square = job_data.to_chw_uint8(self.square(job_data.decode(path)))
        except Exception as error:  # unreadable or not an image: skipped and reported, as visualize does
            return None, label, index, job_data.describe_error(error)
        image = square[:, top:top + self.crop, left:left + self.crop]
        return (image.flip(-1) if flipped else image).contiguous(), label, index, ""


class ValCrops(torch.utils.data.Dataset):
    """Items are image indices; each gives the centre crop ``(3, crop, crop)``, or with
    ``ten_crop`` the ten crops ``(10, 3, crop, crop)`` (torchvision's ``TenCrop`` order)."""

    def __init__(self, split: Split, resize: int, crop: int, ten_crop: bool) -> None:
        self.split = split
        self.crop = crop
        self.ten_crop = ten_crop
        self.resize = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(resize if ten_crop else crop)])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Sample:
        path, label = self.split.samples[index]
        try:
            image = job_data.to_chw_uint8(self.resize(job_data.decode(path)))
        except Exception as error:
            return None, label, index, job_data.describe_error(error)
        if self.ten_crop:
            image = torch.stack(TF.ten_crop(image, [self.crop, self.crop]))
        return image, label, index, ""


@dataclass
class LoadedBatch:
    """A collated batch: uint8 ``images``, int64 ``labels``, and ``skipped`` ``(index, reason)``."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: List[Tuple[int, str]]

    def pin_memory(self) -> "LoadedBatch":  # called by the DataLoader's pinning thread
        return LoadedBatch(self.images.pin_memory(), self.labels.pin_memory(), self.skipped)


def collate(samples: Sequence[Sample], shape: Tuple[int, ...]) -> LoadedBatch:
    """Stack the readable samples (``shape`` is one image's, for an empty batch)."""
    good = [s for s in samples if s[0] is not None]
    images = torch.stack([s[0] for s in good]) if good else torch.empty((0,) + shape, dtype=torch.uint8)
    labels = torch.tensor([s[1] for s in good], dtype=torch.int64)
    return LoadedBatch(images, labels, [(s[2], s[3]) for s in samples if s[0] is None])


class _Collate:
    """:func:`collate` with the image shape bound (picklable, for worker processes)."""

    def __init__(self, shape: Tuple[int, ...]) -> None:
        self.shape = shape

    def __call__(self, samples: Sequence[Sample]) -> LoadedBatch:
        return collate(samples, self.shape)


def ignore_interrupts(_: int) -> None:
    """Worker start-up: Ctrl-C goes to the main process alone, which stops the run cleanly
    (a worker dying of the signal first would turn that into a loader error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)  # workers decode; the main process's threads do the arithmetic


def make_loader(dataset: torch.utils.data.Dataset, batches: Sequence[Sequence[object]], workers: int,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    """A loader yielding :class:`LoadedBatch` for each list of dataset items in ``batches``, with
    at most one worker per batch (more would only wait)."""
    workers = min(workers, len(batches))
    crop = dataset.crop
    shape = (10, 3, crop, crop) if getattr(dataset, "ten_crop", False) else (3, crop, crop)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=[list(b) for b in batches], num_workers=workers, collate_fn=_Collate(shape),
        pin_memory=pin_memory, worker_init_fn=ignore_interrupts if workers else None,
        prefetch_factor=4 if workers else None,
        # Its own generator: a loader draws its workers' base seed when iterated, and from the
        # global RNG that would shift dropout's stream by a draw wherever a run was resumed.
        generator=torch.Generator().manual_seed(0))
