"""The training loop of ``zfk train``: epochs, validation, checkpoints, resumable state, and
DistributedDataParallel under ``torchrun``.

**Files in the output folder.** After epoch ``n``: ``epoch-NNN.pth`` (the model's plain state
dict, which ``zfk visualize --weights``, ``zfk evolution --checkpoints`` and ``zfk filters`` load
as it is), ``metrics.json`` and ``curves.png``. ``train-state.pth`` holds everything a resumed run
needs: the configuration, the model, the optimiser's momentum, the learning-rate schedule, every
process's RNG state and the position in the epoch (which global batches are done), checked part
by part when it is read (:mod:`.state`). It is written after every
epoch, every ``save_every`` steps, and when the run is stopped; each file is written atomically,
and the state last, so a run killed at any instant leaves files that agree with a state on disk.

**Determinism.** Each epoch's order, crops and flips come from ``(seed, epoch)`` alone
(:func:`zfkernels.train.data.epoch_plan`), the model from ``seed``, dropout from a seeded RNG
whose state is saved: a resumed run takes the same steps, in the same order, on the same data
as an uninterrupted one, and on the CPU ends with the same bits.

**Processes.** Under ``torchrun`` every process takes an equal share (``rank::world``) of each
global batch of ``batch_size`` images, so the global batch, and with it the recipe, does not
depend on the number of processes. The loss is the sum over the process's images divided by
the global count (times ``world``, which DDP's averaging undoes), so the gradient is the global
batch's mean even where shares differ (the last batch, skipped files). Validation runs on a
``rank::world`` share of the val set, and the counts are summed: it covers the whole set once.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError
from ..job import data as job_data
from ..job.console import progress_bar, say
from ..job.distributed import Distributed, init_distributed
from ..job.io import atomic_write
from ..job.signals import StopRequest
from ..models import load_weights
from . import data as train_data
from . import state as saved
from .ablations import TRAIN_ARCHITECTURES, build_network, check_crop, check_finite
from .bounds import FieldError, check_fields, shown, wrap_seed
from .recipe import Recipe, Schedule, initialise, make_optimizer, renormalise_filters
from .report import CURVES, METRICS, plot_curves, write_metrics
from .state import STATE, STATE_VERSION

IMAGENET_OUTPUTS = 1000  # the zoo's head: checkpoints of up to 1000 classes load in every zfk command


def checkpoint_name(epoch: int) -> str:
    """``epoch-001.pth`` for the first epoch."""
    return f"epoch-{epoch:03d}.pth"


@dataclass(frozen=True)
class TrainConfig:
    """What determines a run's result (saved in its state; a resumed run takes it from there).
    ``resize``/``crop``: the augmentation's sizes (256/224 in the paper; smaller ones train
    quick experiments). ``width`` scales every conv layer's filters and fc6/fc7's units (1: the
    paper's network; checkpoints of other widths load only into ``zfk train``/``zfk probe``).
    ``weights``: a state dict to start from instead of the recipe's initialisation."""

    data: str
    arch: str = "zfnet"
    recipe: Recipe = field(default_factory=Recipe)
    seed: int = 0
    resize: int = 256
    crop: int = 224
    ten_crop: bool = False
    width: float = 1.0
    weights: Optional[str] = None
    save_every: int = 1000

    def __post_init__(self) -> None:
        check_fields({k: v for k, v in self.as_dict().items() if k != "recipe"})
        if not isinstance(self.recipe, Recipe):
            raise FieldError("recipe", f"is a {type(self.recipe).__name__}, not a Recipe")
        if self.arch not in TRAIN_ARCHITECTURES:
            raise FieldError("arch", f"must be one of {', '.join(TRAIN_ARCHITECTURES)}, got {shown(self.arch)}")
        for name in ("data", "weights"):
            value = getattr(self, name)
            if not (isinstance(value, str) or (name == "weights" and value is None)):
                raise FieldError(name, f"must be a path, got {shown(value)}")
        if not isinstance(self.ten_crop, bool):
            raise FieldError("ten_crop", f"must be true or false, got {shown(self.ten_crop)}")
        if self.crop > self.resize:
            raise FieldError("crop", f"{self.crop} is larger than --resize {self.resize} (crops are cut from the "
                                     "centre --resize square)")
        if self.arch == "alexnet" and self.width != 1:
            raise FieldError("width", "alexnet is built at width 1 only (torchvision's AlexNet)")

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: object) -> "TrainConfig":
        """The configuration a state holds, checked field by field (a ``ValueError`` says which)."""
        saved.check_keys("config", values, [f.name for f in fields(cls)])
        saved.check_keys("config: recipe", values["recipe"], [f.name for f in fields(Recipe)])
        return cls(**{**values, "recipe": Recipe(**values["recipe"])})


def preprocess_description(config: TrainConfig) -> Dict[str, object]:
    """The pipeline as ``metrics.json`` states it."""
    return {
        "train": f"Resize({config.resize}) -> CenterCrop({config.resize}) -> random {config.crop}x{config.crop} crop "
                 "-> horizontal flip with probability 1/2",
        "val": (f"Resize({config.resize}) -> CenterCrop({config.resize}) -> TenCrop({config.crop}), softmax averaged"
                if config.ten_crop else f"Resize({config.resize}) -> CenterCrop({config.crop})"),
        "normalisation": "torchvision's ImageNet mean and std per channel (ToTensor -> Normalize(mean, std)), "
                         "not the paper's per-pixel mean image: the zoo and every zfk command use it",
        "mean": list(job_data.IMAGENET_MEAN),
        "std": list(job_data.IMAGENET_STD),
    }


# -- stopping cleanly --------------------------------------------------------------------------


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where the run is: ``epoch`` (0-based) in progress, global ``step`` batches of it done,
    the epoch's summed loss and image count so far, its seconds so far, the finished epochs'
    metrics, the skipped files (path -> reason), and where the loss stopped being finite
    (``{"epoch", "step"}``, 1-based; ``None`` while it is)."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    seconds: float = 0.0
    metrics: List[Dict[str, object]] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    diverged: Optional[Dict[str, int]] = None


class Diverged(Exception):
    """The training loss stopped being finite: the run is recorded as diverged and stops."""


def resolve_train_device(device: torch.device) -> torch.device:
    """A CUDA device with its index: under ``torchrun`` each process takes its own GPU
    (``LOCAL_RANK``), otherwise plain ``cuda`` is the current one."""
    if device.type != "cuda" or device.index is not None:
        return device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cuda", torch.cuda.current_device())


class Training:
    """One training run in ``out``, from scratch or resumed from its state file."""

    def __init__(self, config: TrainConfig, out: Path, device: torch.device, *, workers: int = 4,
                 quiet: bool = False, resume: Optional[Dict[str, object]] = None) -> None:
        self.config = config
        self.recipe = config.recipe
        self.out = Path(out)
        self.device = resolve_train_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.workers = workers
        self.cuda = self.device.type == "cuda"
        self.dist: Distributed = init_distributed(self.device)
        self.quiet = quiet or self.dist.rank != 0
        self.train_split, self.val_split = train_data.load_folder(Path(config.data))
        self.classes = self.train_split.classes
        self.model = self.build_model(weights=config.weights if resume is None else None)
        check_crop(self.model, config.crop, f"{config.arch} at width {config.width:g}")
        if self.cuda:
            self.model.to(memory_format=torch.channels_last)  # faster convolutions; the state dict stays plain
        self.network: nn.Module = self.model
        if self.dist.active:
            self.network = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.cuda else None)
        self.optimizer = make_optimizer(self.model, self.recipe)
        self.schedule = Schedule()
        self.batches_per_epoch = -(-len(self.train_split) // self.recipe.batch_size)
        # Dropout's stream: seeded per process, saved with the state.
        torch.manual_seed(wrap_seed(config.seed * 1000 + self.dist.rank))
        if self.cuda:
            torch.cuda.manual_seed(wrap_seed(config.seed * 1000 + self.dist.rank))
        self.progress = Progress()
        if resume is not None:
            self.restore(resume)

    # -- construction ------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def build_model(self, weights: Optional[str]) -> nn.Module:
        """The network with the recipe's initialisation (or ``weights``), from ``seed`` only.
        The head has the zoo's 1000 outputs whenever the data has at most 1000 classes, so the
        checkpoints load unchanged wherever a zoo model does; the loss and the accuracies use
        the first ``num_classes`` outputs alone (the others get no gradient). Weights holding a
        NaN or an infinity are refused: the run could only diverge."""
        config = self.config
        outputs = max(IMAGENET_OUTPUTS, self.num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = build_network(config.arch, outputs, self.recipe.dropout, config.width)
            initialise(model, self.recipe.init, self.recipe.init_std)
        if weights is not None:
            try:
                load_weights(model, weights, config.arch)
            except (ValueError, FileNotFoundError) as error:
                raise UsageError(f"--weights: {error}") from None
            check_finite(model, weights)
        return model.to(self.device)

    # -- state -------------------------------------------------------------------------------

    def state(self) -> Dict[str, object]:
        """The resumable state (a collective under torchrun: every process's RNG is gathered)."""
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if self.cuda else None}
        return {
            "version": STATE_VERSION,
            "config": self.config.as_dict(),
            "device": self.device.type,
            "classes": list(self.classes),
            "progress": asdict(self.progress),
            "model": plain_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": self.dist.all_gather_objects(rng),
        }

    def save_state(self) -> None:
        state = self.state()
        if self.dist.rank == 0:
            atomic_write(self.out / STATE, lambda handle: torch.save(state, handle))

    def restore(self, state: Dict[str, object]) -> None:
        """Continue from ``state`` (:func:`zfkernels.train.state.load_state`), after checking
        every part of it against this run (:mod:`zfkernels.train.state`): a problem is a
        :class:`UsageError` naming the part."""
        classes = state.get("classes")
        if not (isinstance(classes, list) and all(isinstance(name, str) for name in classes)):
            raise UsageError(f"--resume {self.out}: {STATE}: classes {shown(classes)} is not a list of class names")
        if classes != self.classes:
            raise UsageError(f"--resume: the classes of {self.config.data} changed since the run began")
        try:
            saved.check_progress(state.get("progress"), self.recipe, self.batches_per_epoch, len(self.train_split))
            progress = Progress(**state["progress"])
            if progress.diverged is not None:
                raise UsageError(f"--resume {self.out}: the run diverged (its loss stopped being finite in epoch "
                                 f"{progress.diverged['epoch']}); there is nothing to continue. Start again with a "
                                 "smaller --lr or a longer --warmup")
            saved.check_tensors("model", state.get("model"), self.model.state_dict())
            saved.check_optimizer(state.get("optimizer"), self.model, self.recipe)
            schedule = saved.check_schedule(state.get("schedule"), self.recipe)
            rng = saved.check_rng(state.get("rng"), self.dist.world, self.cuda)
        except ValueError as error:
            raise UsageError(f"--resume {self.out}: {STATE} does not hold this run: {error}") from None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule = schedule
        self.progress = progress
        mine = rng[self.dist.rank]
        torch.set_rng_state(mine["cpu"])
        if self.cuda and mine["cuda"] is not None:
            torch.cuda.set_rng_state(mine["cuda"], self.device)

    # -- steps -------------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dist.active:
            dist.all_reduce(tensor)
        return tensor

    def inputs(self, batch: train_data.LoadedBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        images = batch.images.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        x = job_data.normalize(images.flatten(0, images.dim() - 4))
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels

    def logits(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            return network(x)[:, :self.num_classes].float()

    def train_step(self, batch: train_data.LoadedBatch) -> torch.Tensor:
        """One SGD step on this process's share of a global batch, then the renormalisation.
        Returns the share's summed loss (a device tensor, no synchronisation)."""
        x, labels = self.inputs(batch)
        count = self.all_reduce(torch.tensor(float(labels.numel()), device=self.device))
        loss_sum = F.cross_entropy(self.logits(self.network, x), labels, reduction="sum")
        loss = loss_sum * self.dist.world / count.clamp(min=1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = self.schedule.lr(self.recipe, self.progress.epoch * self.batches_per_epoch + self.progress.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        renormalise_filters(self.model, self.recipe.renorm)
        return loss_sum.detach()

    def note_skipped(self, batch: train_data.LoadedBatch, split: train_data.Split) -> None:
        for index, reason in batch.skipped:
            path = split.samples[index][0]
            if path not in self.progress.skipped:
                self.progress.skipped[path] = reason
                say(f"skipped {path}: {reason}", self.quiet and self.dist.rank != 0)

    # -- epochs ------------------------------------------------------------------------------

    def train_epoch(self, stop: StopRequest) -> None:
        """The rest of the epoch in progress; saves the state and raises ``KeyboardInterrupt``
        when ``stop`` is requested."""
        config, progress = self.config, self.progress
        plan = train_data.epoch_plan(len(self.train_split), config.resize, config.crop, config.seed, progress.epoch)
        batches = plan.batches(self.recipe.batch_size)
        shares = [[plan.item(i) for i in b[self.dist.rank::self.dist.world]] for b in batches[progress.step:]]
        dataset = train_data.TrainCrops(self.train_split, config.resize, config.crop)
        loader = train_data.make_loader(dataset, shares, self.workers, self.cuda)
        self.network.train()
        began = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        done_images = sum(len(b) for b in batches[:progress.step])
        label = f"epoch {progress.epoch + 1}/{self.recipe.epochs}"
        with progress_bar(len(self.train_split), label, "img", self.quiet) as bar:
            bar.update(done_images)
            for batch in loader:
                self.note_skipped(batch, self.train_split)
                loss_sum += self.train_step(batch).double()
                bar.update(len(batches[progress.step]))
                progress.step += 1
                stopping, count = self.host_sums(int(stop.requested), int(batch.labels.numel()))
                progress.loss_count += count
                if stopping or (config.save_every and progress.step % config.save_every == 0
                                and progress.step < len(batches)):
                    self.bank(loss_sum, began)
                    loss_sum.zero_()
                    began = time.perf_counter()
                    self.save_state()
                    if stopping:
                        raise KeyboardInterrupt
        self.bank(loss_sum, began)

    def host_sums(self, *values: int) -> List[int]:
        """Sums over the processes of small host-side counts (one gloo collective a step, never
        waiting on the device): whether any process was asked to stop, the images trained on."""
        if not self.dist.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, group=self.dist.control)
        return tensor.tolist()

    def bank(self, loss_sum: torch.Tensor, began: float) -> None:
        """Move the device-side loss sum and the elapsed time into :attr:`progress`. This is where
        the loss reaches the host (at the end of an epoch and at every save), so this is where a
        loss that stopped being finite is noticed: the run is recorded as diverged in
        ``metrics.json`` and its state (which ``--resume`` then refuses), and :class:`Diverged`
        is raised."""
        total = float(self.all_reduce(loss_sum.clone()).item())
        self.progress.seconds += time.perf_counter() - began
        if math.isfinite(total):
            self.progress.loss_sum += total
            return
        progress = self.progress
        progress.diverged = {"epoch": progress.epoch + 1, "step": progress.step}
        self.gather_skipped()
        if self.dist.rank == 0:
            self.write_report()
        self.save_state()
        raise Diverged(f"the training loss stopped being finite in epoch {progress.epoch + 1} (by step {progress.step} "
                       f"of {self.batches_per_epoch}, lr {self.optimizer.param_groups[0]['lr']:g}): the run diverged "
                       f"and stopped, as {self.out / METRICS} records; start again with a smaller --lr or a longer --warmup")

    @torch.no_grad()
    def evaluate(self) -> Tuple[float, float]:
        """Top-1 and top-5 accuracy over the whole val set (each process a share, summed)."""
        config = self.config
        dataset = train_data.ValCrops(self.val_split, config.resize, config.crop, config.ten_crop)
        mine = list(range(self.dist.rank, len(self.val_split), self.dist.world))
        batches = [mine[i:i + self.recipe.batch_size] for i in range(0, len(mine), self.recipe.batch_size)]
        loader = train_data.make_loader(dataset, batches, self.workers, self.cuda)
        self.model.eval()
        k = min(5, self.num_classes)
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)  # top-1 right, top-5 right, images
        with progress_bar(len(mine), "validation", "img", self.quiet) as bar:  # (rank 0's share)
            for batch in loader:
                self.note_skipped(batch, self.val_split)
                x, labels = self.inputs(batch)
                probabilities = self.logits(self.model, x).softmax(dim=1)
                if config.ten_crop:  # the ten crops of each image, averaged
                    probabilities = probabilities.view(labels.numel(), 10, -1).mean(dim=1)
                top = probabilities.topk(k, dim=1).indices
                hits = top == labels[:, None]
                counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                                       torch.tensor(labels.numel(), device=self.device)]).double()
                bar.update(len(batch.labels) + len(batch.skipped))
        self.all_reduce(counts)
        top1, top5, n = counts.tolist()
        if n == 0:
            raise UsageError(f"--data {config.data}: no image of val/ could be read")
        return top1 / n, top5 / n

    def finish_epoch(self) -> Dict[str, object]:
        """Validate, count the epoch in the schedule, write the checkpoint, the metrics and the
        state. An epoch in which no training image could be read stops the run (one line)."""
        progress = self.progress
        began = time.perf_counter()
        self.gather_skipped()
        if progress.loss_count == 0:
            raise UsageError(f"--data {self.config.data}: no image of train/ could be read in epoch {progress.epoch + 1} "
                             f"({len(self.train_split)} files, each named above as skipped)")
        top1, top5 = self.evaluate()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate of the epoch's last step
        self.schedule.epoch_end(self.recipe, 1.0 - top1, (progress.epoch + 1) * self.batches_per_epoch)
        row = {"epoch": progress.epoch + 1, "train_loss": progress.loss_sum / progress.loss_count,
               "val_top1": top1, "val_top5": top5, "lr": lr,
               "seconds": progress.seconds + time.perf_counter() - began}
        progress.metrics.append(row)
        progress.epoch, progress.step = progress.epoch + 1, 0
        progress.loss_sum, progress.loss_count, progress.seconds = 0.0, 0, 0.0
        if self.dist.rank == 0:
            weights = plain_state_dict(self.model)
            atomic_write(self.out / checkpoint_name(row["epoch"]), lambda handle: torch.save(weights, handle))
            self.write_report()
        self.save_state()
        return row

    def gather_skipped(self) -> None:
        if self.dist.active:
            for other in self.dist.all_gather_objects(self.progress.skipped):
                for path, reason in other.items():
                    self.progress.skipped.setdefault(path, reason)

    def write_report(self) -> None:
        document = {
            "epochs": self.progress.metrics,
            "arch": self.config.arch,
            "classes": list(self.classes),
            "outputs": max(IMAGENET_OUTPUTS, self.num_classes),
            "images": {"train": len(self.train_split), "val": len(self.val_split)},
            "processes": self.dist.world,
            "config": self.config.as_dict(),
            "preprocess": preprocess_description(self.config),
            "diverged": self.progress.diverged,
            "skipped": [{"file": path, "reason": reason} for path, reason in sorted(self.progress.skipped.items())],
        }
        write_metrics(self.out, document)
        plot_curves(self.out / CURVES, self.progress.metrics, f"zfk train: {self.config.arch}")

    def run(self) -> List[Dict[str, object]]:
        """Train the remaining epochs; returns every epoch's metrics. Ctrl-C or SIGTERM stop it
        after the current step with the state saved (``KeyboardInterrupt`` is raised)."""
        stop = StopRequest()
        with stop.installed():
            while self.progress.epoch < self.recipe.epochs:
                self.train_epoch(stop)
                row = self.finish_epoch()
                say(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, val top-1 {row['val_top1']:.4f}, "
                    f"top-5 {row['val_top5']:.4f}, lr {row['lr']:g}, {row['seconds']:.1f} s", self.quiet)
                if stop.requested:
                    raise KeyboardInterrupt
        return self.progress.metrics


def plain_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors (what ``epoch-NNN.pth`` holds)."""
    return {name: value.detach().to("cpu").contiguous().clone() for name, value in model.state_dict().items()}
