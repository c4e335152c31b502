"""Image folders for the main job: discovery, decoding to RGB, the ImageNet evaluation transform,
and a DataLoader that skips (and reports) what it cannot read.

Every file is addressed by its index in the sorted list of discovered paths; the index is the
identity pass 1 ranks by (ties go to the earlier image) and the unit of sharding and resuming.

Decoding follows torchvision's ImageNet evaluation pipeline exactly (Pillow, ``Resize`` then
``CenterCrop`` at the network's sizes, :func:`zfkernels.models.eval_transform`: 256/224 for the zoo,
342/299 for Inception v3; no EXIF rotation, as torchvision's loader), with the colour handling spelled
out: grayscale, CMYK and palette images are converted to RGB, alpha is composited over white and
16-bit or float images are scaled to 8 bits. Workers ship uint8 crops (4x less than float32 through
the pinned-memory queue); the device normalises them, with the same arithmetic as torchvision's
``ToTensor`` + ``Normalize``, so the result is bitwise the same.

On CUDA, JPEGs can instead be decoded in batches on the GPU (``torchvision.io.decode_jpeg``): the
workers only read the file bytes; anything nvjpeg refuses falls back to Pillow on the CPU.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import io
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import stat
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision import transforms

from ..models import ZOO_TRANSFORM, EvalTransform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE = ZOO_TRANSFORM.resize  # the zoo's (and the paper's) sizes: the defaults below
CROP = ZOO_TRANSFORM.crop
# Beyond this aspect ratio, Resize(256) would make an enormous intermediate image (a 1x10000
# strip becomes 256x2560000): such images are resized straight into the centre crop instead
# (the same sampling positions, rounding may differ by one level).
EXTREME_ASPECT = 16.0
BACKGROUND = (255, 255, 255)  # alpha is composited over white
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"  # the end-of-image marker (0xFFD9 cannot occur inside entropy-coded data)

# Truncated files must fail, not be padded with grey (Pillow's default is already False; we
# insist, since a library imported earlier may have flipped it).
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Pillow's resampling filter of each interpolation torchvision's presets name.
PILLOW_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@functools.lru_cache(maxsize=None)
def _resize_crop_of(transform: EvalTransform) -> transforms.Compose:
    mode = transforms.InterpolationMode(transform.interpolation)
    return transforms.Compose([transforms.Resize(transform.resize, interpolation=mode),
                               transforms.CenterCrop(transform.crop)])


def preprocess_description(decoder: str = "pillow", transform: EvalTransform = ZOO_TRANSFORM) -> dict:
    """What the images went through, as written into ``topk.json`` (``"preprocess"``)."""
    return {
        "transform": f"torchvision ImageNet evaluation: Resize({transform.resize}) -> CenterCrop({transform.crop}) "
                     "-> ToTensor -> Normalize(mean, std)",
        "resize": transform.resize,
        "crop": transform.crop,
        "interpolation": f"{transform.interpolation} (antialiased)",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "color": "RGB: grayscale, CMYK and palette converted, alpha composited over white, 16-bit scaled to 8; no EXIF rotation",
        "decoder": decoder,
    }


# -- discovery ---------------------------------------------------------------------------------


def image_extensions() -> frozenset:
    """Lower-case extensions (with the dot) of every format Pillow can open."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass
class ImageList:
    """The images of a run, as the network sees them: ``files`` are POSIX paths relative to
    ``root``, sorted; ``ignored`` lists files that were not considered at all, with the reason;
    ``stamps`` holds each file's ``(size, mtime_ns)`` as discovery saw it (what :meth:`identity`
    digests); ``transform`` is the evaluation transform every loader applies (the network's:
    :func:`zfkernels.models.eval_transform`)."""

    root: Path
    files: List[str]
    ignored: List[Tuple[str, str]] = field(default_factory=list)
    stamps: List[Tuple[int, int]] = field(default_factory=list)
    transform: EvalTransform = ZOO_TRANSFORM

    def path(self, index: int) -> Path:
        return self.root / self.files[index]

    @property
    def size(self) -> Tuple[int, int]:
        """``(height, width)`` of every crop the network sees."""
        return self.transform.crop, self.transform.crop

    def first(self, limit: Optional[int]) -> "ImageList":
        """The first ``limit`` images (all when ``None``)."""
        if limit is None:
            return self
        return dataclasses.replace(self, files=self.files[:limit], stamps=self.stamps[:limit])

    def seen_as(self, transform: EvalTransform) -> "ImageList":
        """The same images under another evaluation transform (the network's input size)."""
        return dataclasses.replace(self, transform=transform)

    def identity(self) -> str:
        """SHA-256 of what identifies these images cheaply: the resolved root, and each file's
        name, size and modification time (one ``stat`` per file, taken at discovery). Another
        folder whose files have the same names, or a file rewritten since, gives another digest."""
        stamps = self.stamps if len(self.stamps) == len(self.files) else [_stamp(self.root / f) for f in self.files]
        digest = hashlib.sha256(os.fsencode(os.path.realpath(self.root)) + b"\0")
        for name, (size, mtime) in zip(self.files, stamps):
            digest.update(name.encode("utf-8", "surrogateescape") + b"\0%d\0%d\n" % (size, mtime))
        return digest.hexdigest()


def _stamp(path: Path) -> Tuple[int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def _inside(path: str, root: str) -> bool:
    """Whether the resolved ``path`` lies in the resolved folder ``root``."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def discover(root: Path, limit: Optional[int] = None, exclude: Optional[Path] = None) -> ImageList:
    """Find image files under ``root`` recursively (a flat folder such as ImageNet's val, or class
    subfolders), sorted by relative path; the first ``limit`` of them when given.

    Files whose extension is no image format Pillow opens, hidden files, links to folders, links
    to files outside ``root`` and second names of a file already found (another link to it, a
    hard link) are listed in ``ignored`` with the reason; hidden folders and ``exclude`` (the
    output folder, when it lies inside the data) are not entered. So no file is read twice and
    nothing outside ``root`` is read: a link back up the tree (``up -> ..``), a link to
    ``/proc/self`` or a link loop is not followed, and a dataset assembled from links to files
    elsewhere is refused file by file rather than walked. ``root`` itself may be a link."""
    root = Path(root)
    real_root = os.path.realpath(root)
    extensions = image_extensions()
    skip_dir = os.path.realpath(exclude) if exclude is not None else None
    candidates: List[Tuple[str, Tuple[int, int], Tuple[int, int]]] = []  # (relative, (dev, inode), (size, mtime))
    ignored: List[Tuple[str, str]] = []
    pending: List[Tuple[str, str]] = [(str(root), "")]  # (folder, its path relative to root)
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                relative = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    # Real folders only (never a link): hidden ones and the output folder are skipped.
                    if not entry.name.startswith(".") and os.path.realpath(entry.path) != skip_dir:
                        pending.append((entry.path, relative + "/"))
                    continue
                hidden = entry.name.startswith(".")
                if entry.is_symlink() and os.path.isdir(entry.path):  # (False for a loop or a broken link)
                    if not hidden:  # (as hidden folders, hidden links to folders go unmentioned)
                        ignored.append((relative, "a link to a folder (not followed)"))
                    continue
                if hidden:
                    ignored.append((relative, "hidden file"))
                elif os.path.splitext(entry.name)[1].lower() not in extensions:
                    ignored.append((relative, "not an image file (extension)"))
                else:
                    reason, info = _image_file(entry, real_root)
                    if reason:
                        ignored.append((relative, reason))
                    else:
                        candidates.append((relative, (info.st_dev, info.st_ino), (info.st_size, info.st_mtime_ns)))
    candidates.sort()
    found: List[str] = []
    stamps: List[Tuple[int, int]] = []
    first_name: Dict[Tuple[int, int], str] = {}
    for relative, inode, stamp in candidates:  # in sorted order: the first name of a file is kept
        if inode in first_name:
            ignored.append((relative, f"the same file as {first_name[inode]}"))
            continue
        first_name[inode] = relative
        found.append(relative)
        stamps.append(stamp)
    ignored.sort()
    return ImageList(root, found, ignored, stamps).first(limit)


def _image_file(entry: os.DirEntry, real_root: str) -> Tuple[Optional[str], Optional[os.stat_result]]:
    """Why a file with an image extension is not used (``None``: it is), and its ``stat``."""
    try:
        info = entry.stat(follow_symlinks=True)
    except OSError:
        return "not a regular file (or a broken link)", None
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (or a broken link)", None
    if entry.is_symlink() and not _inside(os.path.realpath(entry.path), real_root):
        return "a link to a file outside the data folder (not followed)", None
    return None, info


def sample_images() -> ImageList:
    """The seven freely licensed sample photographs installed with the package
    (``zfkernels/sample_images``, licences in its ``LICENSES.txt``: public domain and CC0, from
    scikit-image's and matplotlib's sample data; one is grayscale). Used when no ``--data`` is
    given; never ImageNet images."""
    from importlib import resources

    root = Path(str(resources.files("zfkernels").joinpath("sample_images")))
    found = discover(root)
    return ImageList(root, found.files, [], found.stamps)  # (LICENSES.txt is no skipped image)


# -- decoding ----------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: grayscale, CMYK, YCbCr and palette converted, alpha
    composited over white, 16-bit and 32-bit integer or float images scaled to 8 bits."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and values.size and values.max() > 255):
            values = values / 257.0  # 0..65535 -> 0..255
        elif mode == "F" and values.size and values.max() <= 1.0:
            values = values * 255.0  # float images in [0, 1]
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK (Adobe-inverted CMYK JPEGs handled by Pillow), YCbCr, ...


def decode(source: object) -> Image.Image:
    """Open and fully decode ``source`` (a path or a file object) to RGB. Raises on unreadable,
    truncated or non-image data (the caller logs and skips)."""
    with warnings.catch_warnings():
        # A decompression-bomb *warning* (between 89M and 179M pixels) is not a reason to skip.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(source) as image:
            image.load()  # the whole file now: truncation raises here, not later
            return to_rgb(image)


def resized_size(width: int, height: int, resize: int = RESIZE) -> Tuple[int, int]:
    """``(width, height)`` after ``Resize(resize)``: the short side ``resize``, the other scaled
    and truncated, as torchvision computes it."""
    return (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)


def crop_origin(height: int, width: int, crop: int = CROP) -> Tuple[int, int]:
    """``(top, left)`` of the centre ``crop`` of a ``height`` x ``width`` image, rounded as
    torchvision's ``CenterCrop`` rounds it."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def resize_crop(image: Image.Image, transform: EvalTransform = ZOO_TRANSFORM) -> Image.Image:
    """Resize the short side to ``transform.resize`` (256) and take the centre ``transform.crop``
    square (224x224), as torchvision's evaluation transform (small images are scaled up the same
    way)."""
    w, h = image.size
    crop = transform.crop
    if max(w, h) > EXTREME_ASPECT * min(w, h):
        # Straight into the crop: the source box that Resize(256) + CenterCrop(224) would sample.
        ow, oh = resized_size(w, h, transform.resize)
        top, left = crop_origin(oh, ow, crop)
        sx, sy = w / ow, h / oh
        box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
        return image.resize((crop, crop), PILLOW_FILTERS[transform.interpolation], box=box)
    return _resize_crop_of(transform)(image)


def to_chw_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 tensor of an RGB Pillow image."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def load_crop(source: object, transform: EvalTransform = ZOO_TRANSFORM) -> torch.Tensor:
    """Decode ``source`` (a path or a file object) and return its uint8 evaluation crop,
    ``(3, crop, crop)`` (224 by default)."""
    return to_chw_uint8(resize_crop(decode(source), transform))


@functools.lru_cache(maxsize=None)
def _constants(dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """255, and ImageNet's mean and std as ``(1, 3, 1, 1)`` tensors, on ``device``: made once, not
    copied from the host for every batch. 255 is a tensor because CUDA divides by a Python number
    as a multiplication by its reciprocal, one rounding off torchvision's CPU division for some
    pixel values. (Read-only: callers never modify them in place.)"""
    mean, std = (torch.tensor(v, dtype=dtype, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return torch.full((), 255, dtype=dtype, device=device), mean, std


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalised floats, as ``ToTensor`` then ``Normalize`` compute it."""
    scale, mean, std = _constants(dtype, images.device)
    return images.to(dtype).div_(scale).sub_(mean).div_(std)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised (N, 3, H, W) floats back to uint8 pixels (what the network saw)."""
    _, mean, std = _constants(images.dtype, images.device)
    return (images * std + mean).mul(255).round_().clamp_(0, 255).to(torch.uint8)


def describe_error(error: BaseException) -> str:
    """A one-line reason for the skipped-files log."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    name = type(error).__name__
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image Pillow can read"
    return f"{name}: {text}" if text else name


# -- dataset and loader ------------------------------------------------------------------------


@dataclass
class Batch:
    """What the loader yields for one batch (``slot`` is its id: the batch slot in pass 1).

    ``indices`` (int64, one per decoded image, in slot order) and ``images`` (uint8
    ``(n, 3, crop, crop)``) hold the images decoded on the CPU; ``encoded`` holds ``(index, bytes)``
    of JPEGs left for the GPU decoder (empty unless GPU decoding is on); ``failures`` lists
    ``(index, reason)`` of the files that could not be read; ``decode_seconds`` is the CPU time
    the worker spent; ``transform`` is the evaluation transform (the GPU decoder applies it too)."""

    slot: int
    indices: torch.Tensor
    images: torch.Tensor
    encoded: List[Tuple[int, torch.Tensor]]
    failures: List[Tuple[int, str]]
    decode_seconds: float
    transform: EvalTransform = ZOO_TRANSFORM

    def pin_memory(self) -> "Batch":  # called by the DataLoader's pinning thread
        return Batch(self.slot, self.indices.pin_memory(), self.images.pin_memory(),
                     [(i, b.pin_memory()) for i, b in self.encoded], self.failures, self.decode_seconds, self.transform)

    def __len__(self) -> int:
        return int(self.indices.numel()) + len(self.encoded)


@dataclass(frozen=True)
class Slots:
    """Batch slots: slot ``s`` covers image indices ``[s * size, (s + 1) * size)`` of ``count``.
    Slots, not batches of whatever images happen to be read, are the unit of work: a slot is
    always the same batch, so an image's activations do not depend on sharding or resuming
    (convolution algorithms differ between batch sizes, and with them the last bits)."""

    count: int
    size: int

    @property
    def num_slots(self) -> int:
        return (self.count + self.size - 1) // self.size

    def indices(self, slot: int) -> List[int]:
        return list(range(slot * self.size, min((slot + 1) * self.size, self.count)))

    def batches(self, assigned: Sequence[int]) -> List[Tuple[int, List[int]]]:
        """``(slot, image indices)`` of each assigned slot, for :func:`make_loader`."""
        return [(slot, self.indices(slot)) for slot in assigned]


class BatchDataset(torch.utils.data.Dataset):
    """Item ``k`` is the ``k``-th batch ``(id, image indices)``, decoded (the DataLoader runs it
    in a worker; batching happens here, so a failed file simply leaves its batch one image
    shorter)."""

    def __init__(self, images: ImageList, batches: Sequence[Tuple[int, Sequence[int]]], gpu_jpeg: bool = False) -> None:
        self.images = images
        self.batches = list(batches)
        self.gpu_jpeg = gpu_jpeg

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> Batch:
        batch_id, members = self.batches[k]
        start = time.process_time()
        transform = self.images.transform
        indices: List[int] = []
        crops: List[torch.Tensor] = []
        encoded: List[Tuple[int, torch.Tensor]] = []
        failures: List[Tuple[int, str]] = []
        for index in members:
            path = self.images.path(index)
            try:
                if self.gpu_jpeg:
                    data = path.read_bytes()
                    if _gpu_decodable(data):
                        encoded.append((index, torch.frombuffer(bytearray(data), dtype=torch.uint8)))
                        continue
                    crops.append(load_crop(io.BytesIO(data), transform))
                else:
                    crops.append(load_crop(path, transform))
                indices.append(index)
            except Exception as error:  # any decoder failure: log and go on (MemoryError too)
                failures.append((index, describe_error(error)))
        images = torch.stack(crops) if crops else torch.empty((0, 3, *self.images.size), dtype=torch.uint8)
        return Batch(batch_id, torch.tensor(indices, dtype=torch.int64), images, encoded, failures,
                     time.process_time() - start, transform)


def _gpu_decodable(data: bytes) -> bool:
    """A whole JPEG whose colour nvjpeg handles (RGB/YCbCr or grayscale): read the header only.

    nvjpeg decodes a truncated file without an error (the missing part comes out grey), so a
    file whose end-of-image marker is not in its last bytes goes to Pillow, which refuses it
    (and reads a whole file with trailing bytes after the marker just as well)."""
    if not data.startswith(JPEG_MAGIC) or data.rfind(JPEG_END, max(0, len(data) - 1024)) < 0:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format == "JPEG" and image.mode in ("RGB", "L")
    except Exception:
        return False  # let the CPU path produce the error message


WORKER_NICENESS = 10  # decoding workers yield the cores to the main process's forward


def _worker_init(stop: "multiprocessing.synchronize.Semaphore", _: int) -> None:
    # Ctrl-C and SIGTERM (also when sent to the whole process group, as `timeout` and batch
    # schedulers do) are the main process's business: it checkpoints, then ends the workers; a
    # worker dying on its own first would only turn that into a loader error.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Ignoring SIGTERM also makes terminate() powerless, and both the DataLoader's shutdown and
    # multiprocessing's exit handler rely on it (the latter then joins forever). So a worker also
    # ends as soon as the main process releases ``stop`` (end_workers, or its exit), whatever it
    # is doing and whoever still holds the loader (an exception's traceback does). A semaphore,
    # not an Event: an Event's set() waits for every waiter to wake, and a worker that has
    # already exited never does.
    threading.Thread(target=_exit_when_set, args=(stop,), name="zfk-stop", daemon=True).start()
    # Where decoding and the forward share the cores (a CPU run, or more workers than cores), a
    # preempted forward thread stalls its siblings at every barrier; decoding at a lower priority
    # fills the gaps instead (2-4% more pass-1 throughput on 2 cores, measured). The prefetched
    # batches keep the main process fed.
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass


def _exit_when_set(stop: "multiprocessing.synchronize.Semaphore") -> None:
    stop.acquire()
    os._exit(0)  # status 0: the DataLoader's SIGCHLD handler takes it for an orderly exit


# The stop semaphores of the loaders whose workers may still run, with their number of workers
# (make_loader adds, end_workers removes).
_LIVE_STOPS: Dict[int, Tuple["multiprocessing.synchronize.Semaphore", int]] = {}


def _release(stop: Tuple["multiprocessing.synchronize.Semaphore", int]) -> None:
    semaphore, workers = stop
    for _ in range(workers):  # one for each worker (never blocks, also for workers already gone)
        semaphore.release()


def _end_all_workers() -> None:
    for stop in list(_LIVE_STOPS.values()):
        _release(stop)
    _LIVE_STOPS.clear()


def make_loader(
    images: ImageList,
    batches: Sequence[Tuple[int, Sequence[int]]],
    workers: int,
    pin_memory: bool,
    gpu_jpeg: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader yielding one :class:`Batch` per ``(id, image indices)`` of ``batches``, in
    order, decoded in ``workers`` processes, pinned when feeding a GPU.

    The workers end at the latest when this process exits (even on an uncaught exception, which
    used to leave it waiting for them forever), or earlier with :func:`end_workers`."""
    init = None
    if workers > 0:
        stop = multiprocessing.get_context().Semaphore(0)
        init = functools.partial(_worker_init, stop)
        _LIVE_STOPS[id(init)] = (stop, workers)
        # atexit runs the last registered first: re-registering keeps this ahead of
        # multiprocessing's own exit handler (which joins the workers).
        atexit.unregister(_end_all_workers)
        atexit.register(_end_all_workers)
    return torch.utils.data.DataLoader(
        BatchDataset(images, batches, gpu_jpeg),
        batch_size=None,  # each item already is a batch
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=init,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )


def end_workers(loader: torch.utils.data.DataLoader) -> None:
    """End ``loader``'s decoding workers now (they exit at once; its iterators yield no more)."""
    init = loader.worker_init_fn
    stop = _LIVE_STOPS.get(id(init)) if init is not None else None
    if stop is None:
        return
    while True:
        try:
            _release(stop)
            break
        except RuntimeError as error:
            # PyTorch's SIGCHLD handler, reporting a worker that died meanwhile, can interrupt
            # the releases: release again (extra releases are harmless), or a live worker
            # would never be told to go.
            if not is_worker_failure(error):
                raise
    _LIVE_STOPS.pop(id(init), None)


class WorkersFailed(RuntimeError):
    """A decoding worker died (killed, out of memory): the message is one line, for the user."""


def is_worker_failure(error: BaseException) -> bool:
    """Whether ``error`` is the DataLoader reporting a worker that died (rather than an error
    in this process): PyTorch raises a plain RuntimeError, from its SIGCHLD handler or while
    waiting for a batch, whose message starts with this. A worker killed while it hands a
    batch over (a tensor's shared-memory handle) breaks that connection instead: the
    ``ConnectionError`` or ``EOFError`` of reading from it."""
    if isinstance(error, (ConnectionError, EOFError)):
        return True
    return isinstance(error, RuntimeError) and str(error).startswith("DataLoader worker (pid")


def _quiet_further_worker_deaths() -> None:
    """After a dead worker has been reported: PyTorch's SIGCHLD handler would raise the same
    error again while the loader's iterator shuts down (printed as "Exception ignored in
    __del__"). Wrap it so that it stays silent about dead workers; anything else it raises
    still propagates, and a later loader still sees a dead worker when it waits for a batch."""
    try:
        previous = signal.getsignal(signal.SIGCHLD)
    except (AttributeError, ValueError):  # no SIGCHLD on this platform
        return
    if not callable(previous) or getattr(previous, "zfk_quiet", False):
        return

    def quiet(signum: int, frame: object) -> None:
        try:
            previous(signum, frame)
        except RuntimeError as error:
            if not is_worker_failure(error):
                raise

    setattr(quiet, "zfk_quiet", True)
    try:
        signal.signal(signal.SIGCHLD, quiet)
    except ValueError:  # not the main thread: signals stay with the main thread
        pass


@contextlib.contextmanager
def worker_guard(loader: Optional[torch.utils.data.DataLoader] = None) -> Iterator[None]:
    """Around a loop over ``loader``: a worker's death becomes :class:`WorkersFailed` with a
    one-line message, and the workers end with the block however it ends. (Only the loader's
    worker connections can break inside such a loop: zfk opens no other.)"""
    try:
        yield
    except (RuntimeError, ConnectionError, EOFError) as error:
        if not is_worker_failure(error):
            raise
        message = str(error).strip().splitlines()[0] if isinstance(error, RuntimeError) else (
            f"its connection broke while it sent a batch: {type(error).__name__}")
        _quiet_further_worker_deaths()
        raise WorkersFailed(f"a decoding worker died ({message.rstrip('. ')}); "
                            "see the system log (the kernel's out-of-memory killer?) or use fewer --workers") from None
    finally:
        if loader is not None:
            end_workers(loader)


# -- on the device -----------------------------------------------------------------------------


def gpu_jpeg_available(device: torch.device) -> bool:
    """Whether torchvision can decode JPEGs on ``device`` (nvjpeg); a tiny probe image."""
    if device.type != "cuda":
        return False
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 60)).save(buffer, format="JPEG")
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
        return True
    except Exception:
        return False


def _tensor_resize_crop(image: torch.Tensor, transform: EvalTransform) -> torch.Tensor:
    """Resize(256) + CenterCrop(224) (``transform``'s sizes) of a (3, H, W) uint8 tensor on its
    device (antialiased, as torchvision's tensor transform: close to Pillow's, not bitwise)."""
    from torchvision.transforms.v2 import functional as TF

    h, w = image.shape[-2:]
    if max(w, h) > EXTREME_ASPECT * min(w, h):  # rare: Pillow's box path, on the CPU
        pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy(), "RGB")
        return to_chw_uint8(resize_crop(pil, transform)).to(image.device)
    mode = TF.InterpolationMode(transform.interpolation)
    image = TF.resize(image, [transform.resize], interpolation=mode, antialias=True)
    return TF.center_crop(image, [transform.crop, transform.crop])


def decode_on_device(batch: Batch, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, str]]]:
    """Finish a batch on ``device``: decode its JPEG bytes there (batched nvjpeg), and merge
    with the CPU-decoded crops in slot order. Returns ``(indices, uint8 images, failures)``;
    files nvjpeg refuses are decoded by Pillow instead, and failures of both are reported."""
    indices = batch.indices.to(device, non_blocking=True)
    crops = batch.images.to(device, non_blocking=True)
    failures: List[Tuple[int, str]] = []
    if not batch.encoded:
        return indices, crops, failures
    from torchvision.io import ImageReadMode, decode_jpeg

    ids = [i for i, _ in batch.encoded]
    datas = [d for _, d in batch.encoded]
    decoded: List[Optional[torch.Tensor]]
    try:
        decoded = list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except Exception:
        decoded = []
        for data in datas:  # find the culprit(s): one at a time
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except Exception:
                decoded.append(None)
    extra_ids: List[int] = []
    extra: List[torch.Tensor] = []
    for index, data, image in zip(ids, datas, decoded):
        try:
            if image is None:  # the CPU fallback
                image = load_crop(io.BytesIO(data.cpu().numpy().tobytes()), batch.transform).to(device)
            else:
                image = _tensor_resize_crop(image, batch.transform)
            extra_ids.append(index)
            extra.append(image)
        except Exception as error:
            failures.append((index, describe_error(error)))
    if extra:
        # Slot order, as the CPU path gives; worked out on the host, where the indices are
        # known, rather than by a device sort.
        ids = batch.indices.tolist() + extra_ids
        order = sorted(range(len(ids)), key=ids.__getitem__)
        indices = torch.tensor([ids[i] for i in order], dtype=torch.int64, device=device)
        crops = torch.cat([crops, torch.stack(extra)]).index_select(0, torch.tensor(order, device=device))
    return indices, crops, failures
