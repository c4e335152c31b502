"""``train-state.pth``: what a resumed run reads, and its check.

The file is read with ``weights_only=True``, so it can only hold tensors and plain values; but a
hand edit, a truncated copy or another version can still put anything there. Before a resumed
run uses it, every part is checked against the run it claims to be (:func:`check_state`): the
configuration by the same bounds as the options (:mod:`.bounds`), the classes against the data,
the position against the epoch's batches, the model, the momentum buffers and the RNG states
against what this run builds, and the learning-rate schedule. A problem is one line naming the
part and what is wrong, never a traceback from deep inside PyTorch.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import UsageError
from .bounds import non_finite, shown
from .recipe import Recipe, Schedule

STATE = "train-state.pth"
# 2: the learning rate's own schedule (warm-up, plateau drops) in place of ReduceLROnPlateau's
# state, and divergence recorded in the progress.
STATE_VERSION = 2
ROW_KEYS = ("epoch", "train_loss", "val_top1", "val_top5", "lr", "seconds")


def load_state(out: Path) -> Dict[str, object]:
    """``out/train-state.pth`` (``weights_only=True``); an unusable file is a :class:`UsageError`."""
    path = Path(out) / STATE
    if not path.is_file():
        raise UsageError(f"--resume {out}: no {STATE} there (not a zfk train output folder, or no step finished)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"--resume {out}: {STATE} is unreadable ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise UsageError(f"--resume {out}: {STATE} is of another version (this zfk reads version {STATE_VERSION})")
    return state


def need(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_keys(part: str, value: object, keys: Sequence[str]) -> None:
    need(isinstance(value, dict), f"{part} is a {type(value).__name__}, not a dict")
    missing, unexpected = sorted(set(keys) - set(value)), sorted(set(value) - set(keys), key=str)
    need(not missing and not unexpected, f"{part}: " + "; ".join(
        text for text in (f"missing {', '.join(missing)}" if missing else "",
                          f"unexpected {', '.join(map(shown, unexpected[:5]))}" if unexpected else "") if text))


def check_progress(progress: object, recipe: Recipe, batches: int, images: int) -> None:
    """The position in the run: ``batches`` global batches an epoch over ``images`` images."""
    from .loop import Progress  # (loop imports this module)

    check_keys("progress", progress, [f.name for f in dataclasses.fields(Progress)])
    epoch, step = progress["epoch"], progress["step"]
    need(is_int(epoch) and 0 <= epoch <= recipe.epochs, f"progress: epoch {shown(epoch)} is not from 0 to {recipe.epochs}")
    need(is_int(step) and 0 <= step <= batches, f"progress: step {shown(step)} is not from 0 to {batches} (the batches of an epoch)")
    count = progress["loss_count"]
    need(is_int(count) and 0 <= count <= images, f"progress: loss_count {shown(count)} is not from 0 to {images}")
    need(is_number(progress["loss_sum"]) and math.isfinite(progress["loss_sum"]),
         f"progress: loss_sum {shown(progress['loss_sum'])} is not a finite number")
    need(is_number(progress["seconds"]) and 0 <= progress["seconds"] < math.inf,
         f"progress: seconds {shown(progress['seconds'])} is not a finite number >= 0")
    rows = progress["metrics"]
    need(isinstance(rows, list) and len(rows) == epoch, f"progress: metrics is not a list of {shown(epoch)} epochs")
    for number, row in enumerate(rows, 1):
        check_keys(f"progress: metrics of epoch {number}", row, ROW_KEYS)
        need(row["epoch"] == number and all(is_number(row[k]) and math.isfinite(row[k]) for k in ROW_KEYS
                                            if k != "train_loss") and is_number(row["train_loss"]),
             f"progress: metrics of epoch {number} are not numbers")
    skipped = progress["skipped"]
    need(isinstance(skipped, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in skipped.items()),
         "progress: skipped is not a dict of file names and reasons")
    diverged = progress["diverged"]
    need(diverged is None or (isinstance(diverged, dict) and all(is_int(diverged.get(k)) for k in ("epoch", "step"))),
         f"progress: diverged {shown(diverged)} is neither None nor an epoch and a step")


def check_tensors(part: str, given: object, expected: Mapping[str, torch.Tensor]) -> None:
    """``given`` holds a finite tensor of the same shape and dtype for each of ``expected``."""
    need(isinstance(given, dict), f"{part} is a {type(given).__name__}, not a dict of tensors")
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [f"{k} ({tuple(given[k].shape) if isinstance(given[k], torch.Tensor) else type(given[k]).__name__}, "
             f"expected {tuple(v.shape)} {str(v.dtype).replace('torch.', '')})" for k, v in expected.items()
             if k in given and not (isinstance(given[k], torch.Tensor) and given[k].shape == v.shape
                                    and given[k].dtype == v.dtype)]
    need(not (missing or unexpected or wrong), f"{part}: the tensors do not fit the network: " + "; ".join(
        text for text in (f"missing {', '.join(missing[:4])}" if missing else "",
                          f"unexpected {', '.join(map(shown, unexpected[:4]))}" if unexpected else "",
                          f"mis-shaped {', '.join(wrong[:4])}" if wrong else "") if text))
    bad = non_finite(given)
    if bad:
        raise ValueError(f"{part}: {bad[0]} holds NaN or infinite values")


def check_optimizer(optimizer: object, model: nn.Module, recipe: Recipe) -> None:
    """SGD's state: one parameter group over every parameter with the recipe's momentum and
    weight decay, and a finite momentum buffer of each parameter's shape."""
    check_keys("optimizer", optimizer, ["state", "param_groups"])
    parameters = list(model.parameters())
    groups = optimizer["param_groups"]
    need(isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict),
         "optimizer: param_groups is not one group")
    group = groups[0]
    need(group.get("params") == list(range(len(parameters))),
         f"optimizer: its parameters are not the network's {len(parameters)}")
    for name in ("momentum", "weight_decay"):
        need(group.get(name) == getattr(recipe, name),
             f"optimizer: {name} {shown(group.get(name))} is not the recipe's {getattr(recipe, name)}")
    lr = group.get("lr")
    need(is_number(lr) and 0 < lr <= recipe.rate, f"optimizer: lr {shown(lr)} is not > 0 and <= {recipe.rate:g}")
    state = optimizer["state"]
    need(isinstance(state, dict) and all(is_int(k) and 0 <= k < len(parameters) for k in state),
         "optimizer: state is not keyed by parameter numbers")
    buffers = {}
    for index, entry in state.items():
        need(isinstance(entry, dict) and set(entry) == {"momentum_buffer"},
             f"optimizer: the state of parameter {index} is not a momentum buffer")
        if entry["momentum_buffer"] is not None:
            buffers[str(index)] = entry["momentum_buffer"]
    check_tensors("optimizer: momentum_buffer", buffers,
                  {str(i): parameters[i].detach().cpu() for i in state if state[i]["momentum_buffer"] is not None})


def check_schedule(schedule: object, recipe: Recipe) -> Schedule:
    check_keys("schedule", schedule, [f.name for f in dataclasses.fields(Schedule)])
    best, bad, drops = schedule["best"], schedule["bad_epochs"], schedule["drops"]
    need(is_number(best) and (0 <= best <= 1 or best == math.inf),
         f"schedule: best {shown(best)} is not an error from 0 to 1 (or inf before the first epoch)")
    need(is_int(bad) and 0 <= bad <= recipe.plateau_patience,
         f"schedule: bad_epochs {shown(bad)} is not from 0 to {recipe.plateau_patience}")
    need(is_int(drops) and 0 <= drops <= recipe.epochs, f"schedule: drops {shown(drops)} is not from 0 to {recipe.epochs}")
    return Schedule(float(best), bad, drops)


def check_rng(rng: object, world: int, cuda: bool) -> List[Dict[str, torch.Tensor]]:
    """Every process's RNG states: the CPU generator's bytes (and CUDA's on a GPU run)."""
    need(isinstance(rng, list), f"rng is a {type(rng).__name__}, not a list of the processes' states")
    if len(rng) != world:
        raise UsageError(f"--resume: the run used {len(rng)} process(es), this one {world}; "
                         "resume with the same torchrun --nproc-per-node")
    size = torch.get_rng_state().numel()
    for rank, entry in enumerate(rng):
        need(isinstance(entry, dict) and set(entry) == {"cpu", "cuda"}, f"rng of process {rank} is not a cpu/cuda pair")
        cpu = entry["cpu"]
        need(isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8 and cpu.numel() == size,
             f"rng of process {rank}: cpu is not a generator state ({size} bytes)")
        need(entry["cuda"] is None or (isinstance(entry["cuda"], torch.Tensor) and entry["cuda"].dtype == torch.uint8),
             f"rng of process {rank}: cuda is not a generator state")
        need(not cuda or entry["cuda"] is not None, f"rng of process {rank}: no CUDA generator state for a CUDA run")
    return rng
