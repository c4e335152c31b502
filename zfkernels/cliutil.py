"""What every ``zfk`` command shares: the one-line error, the model and device options, output
folders, and progress bars.

A :class:`CliError` is the user's mistake or the environment's (a missing folder, weights of
another architecture, no GPU): ``zfk`` prints it as one line and exits non-zero, with no
traceback. Anything else escaping a command is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, List, Optional

import torch
import torch.nn as nn

from . import models

ARCHS = tuple(models.ARCHITECTURES)
DEFAULT_SEED = 0  # the seeded random model used when no --weights is given


class CliError(Exception):
    """A one-line error for the user: printed as ``zfk <command>: error: <message>``, exit 2."""


# -- options -----------------------------------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser, *, weights_help: Optional[str] = None) -> None:
    """``--arch``, ``--weights``, ``--seed`` and ``--device``."""
    parser.add_argument("--arch", choices=ARCHS, default="zfnet", help="network architecture (default: zfnet)")
    parser.add_argument(
        "--weights",
        metavar="PATH",
        help=weights_help
        or "state-dict file (.pth/.pt) for --arch, loaded with weights_only=True; 'torchvision' takes torchvision's "
        "file from the local torch hub cache (never downloaded). Without it: a seeded random, UNTRAINED network",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed of the random network used without --weights (default: {DEFAULT_SEED})")
    add_device_option(parser)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars; errors and the summary only")


def _int_at_least(minimum: int, kind: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}")
        return value

    parse.__name__ = f"{kind.replace('-', '_')}_int"
    return parse


positive_int = _int_at_least(1, "positive")
non_negative_int = _int_at_least(0, "non-negative")


def parse_index_list(text: str, what: str) -> List[int]:
    """``"0-15,20,31"`` -> ``[0, ..., 15, 20, 31]`` (sorted, without repeats). Ranges are inclusive."""
    picked = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            first = int(low)
            last = int(high) if dash else first
        except ValueError:
            raise CliError(f"{what}: {part!r} is not a non-negative number or a range like 0-15") from None
        if first < 0 or last < 0:
            raise CliError(f"{what}: {part!r} is negative")
        if last < first:
            raise CliError(f"{what}: empty range {part!r} (write low-high with low <= high)")
        picked.update(range(first, last + 1))
    if not picked:
        raise CliError(f"{what}: no numbers in {text!r}")
    return sorted(picked)


# -- device and model --------------------------------------------------------------------------


def resolve_device(name: Optional[str]) -> torch.device:
    """``None`` -> CUDA when a GPU is visible, else the CPU; an explicit CUDA device that is not
    there is an error, not a silent fallback."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device: {name!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name}: CUDA was asked for but no CUDA GPU is visible (use --device cpu)")
        from ._build import build_info

        if not build_info().get("cuda"):
            raise CliError(f"--device {name}: zfkernels was built without its CUDA kernels (rebuild where nvcc is found)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise CliError(f"--device: {name!r} is not supported (use cpu, cuda or cuda:N)")
    return device


def load_model(arch: str, weights: Optional[str], seed: int, device: torch.device) -> nn.Module:
    """The evaluation-mode model on ``device``; weights that do not fit are a :class:`CliError`."""
    try:
        model = models.build(arch, weights, seed=seed if weights is None else None)
    except (ValueError, FileNotFoundError) as error:
        raise CliError(str(error)) from None
    return model.eval().to(device)


def untrained_warning(arch: str, seed: int) -> str:
    return (f"WARNING: no --weights given: using a seeded random {arch} (seed {seed}). It is UNTRAINED: the pictures "
            f"show what random filters respond to, not learned features. Pass --weights PATH for a trained network.")


# -- output folders ----------------------------------------------------------------------------


def prepare_out(out: Path, *, marker: str = ".zfk") -> Path:
    """Create ``out`` (and its parents) and make sure files can be written in it. A folder that
    exists, holds other files and was not made by zfk is refused (it will not be mixed into)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"--out {out}: cannot create the folder ({error.strerror or error})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CliError(f"--out {out}: the folder is not writable")
    stamp = out / marker
    if not stamp.exists() and any(out.iterdir()):
        raise CliError(f"--out {out}: the folder holds other files and is not a zfk output folder; choose an empty or new one")
    try:
        stamp.write_text("a zfk output folder\n")
    except OSError as error:
        raise CliError(f"--out {out}: the folder is not writable ({error.strerror or error})") from None
    return out


# -- progress ----------------------------------------------------------------------------------


def progress_bar(total: int, description: str, unit: str, quiet: bool) -> Callable[[int], None]:
    """A tqdm bar (rate and ETA) on stderr, or nothing when ``quiet``; returns ``update(n)``.
    The bar is closed by calling ``update.close()``."""
    if quiet:
        def update(n: int) -> None:
            return None

        update.close = lambda: None  # type: ignore[attr-defined]
        return update
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def update(n: int) -> None:
        bar.update(n)

    update.close = bar.close  # type: ignore[attr-defined]
    return update


def say(message: str, quiet: bool = False, *, stream=None) -> None:
    """A line for the user (stderr keeps stdout clean for summaries)."""
    if not quiet:
        print(message, file=stream or sys.stderr, flush=True)


def check_files_exist(paths: Iterable[str], what: str) -> List[Path]:
    """Each path must be an existing file."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise CliError(f"{what}: {p} does not exist or is not a file")
        out.append(path)
    return out
