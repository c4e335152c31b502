"""What every ``zfk`` command shares: the one-line error, the model and device options, output
folders, and progress bars.

A :class:`zfkernels.errors.UsageError` is the user's mistake or the environment's: ``zfk`` prints
it as one line and exits with status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import models
from ..errors import UsageError
from ..engine import unknown_layer_message
from ..job.console import say
from ..job.io import OUTPUT_MARKER, atomic_write_text
from ..models import untrained_warning

ARCHS = tuple(models.ARCHITECTURES)  # the zoo; --arch also takes torchvision's builders and module:callable
DEFAULT_SEED = 0  # the seeded random model used when no --weights is given


# -- options -----------------------------------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser, *, weights_help: Optional[str] = None) -> None:
    """``--arch``, ``--weights``, ``--seed`` and ``--device``."""
    parser.add_argument("--arch", type=arch_name, default="zfnet", metavar="ARCH",
                        help="network: zfnet (default), alexnet, vgg16, a torchvision classification builder "
                             "(resnet50, vgg16_bn, densenet121 …; see docs/models.md) or module.path:callable, "
                             "a factory of yours returning an nn.Module")
    parser.add_argument(
        "--weights",
        metavar="PATH",
        help=weights_help
        or "state-dict file (.pth/.pt) for --arch, loaded with weights_only=True; 'torchvision' takes torchvision's "
        "file from the local torch hub cache (never downloaded). Without it: a seeded random, UNTRAINED network",
    )
    parser.add_argument("--seed", type=seed_int, default=DEFAULT_SEED,
                        help=f"seed of the random network used without --weights, 0 <= seed < 2^64 (default: {DEFAULT_SEED})")
    add_device_option(parser)


def arch_name(text: str) -> str:
    """An argparse type: a name :func:`zfkernels.models.build` takes (the message suggests close
    names); a ``module.path:callable`` factory is imported only when the model is built."""
    try:
        return models.check_arch(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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


def quoted(text: str, limit: int = 40) -> str:
    """``text`` quoted for a message, cut short: a 5,000-digit number must not become a
    5,000-character line."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def int_in_range(low: int, high: int, why: str) -> Callable[[str], int]:
    """An argparse type: an integer ``low <= n <= high``; ``why`` says where the upper bound
    comes from (the 224x224 crop, memory ...), and the error message quotes it."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # also a number past Python's 4,300-digit conversion limit
            raise argparse.ArgumentTypeError(f"expected an integer, got {quoted(text)}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high} ({why}), got {quoted(text)}")
        return value

    parse.__name__ = "int"
    return parse


SEED_LIMIT = 2**64  # torch.manual_seed takes 0 .. 2^64 - 1; a negative seed wraps onto one of those
seed_int = int_in_range(0, SEED_LIMIT - 1, "a seed torch.manual_seed accepts: 0 <= seed < 2^64")
MAX_BATCH = 1024  # copies of a 224x224 image per forward pass; beyond it only the memory use grows
batch_size_int = int_in_range(1, MAX_BATCH, "images per forward pass")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (no affinity outside Linux)
        return os.cpu_count() or 1


# More decoding processes than CPUs only compete for them (PyTorch warns past this count).
workers_int = int_in_range(0, usable_cpus(), "decoding processes: at most one per CPU this process may use")


def default_workers(preferred: int) -> int:
    """``preferred`` decoding processes, or fewer on a machine with fewer CPUs."""
    return min(preferred, usable_cpus())


def label_text(text: str) -> str:
    """An argparse type for ``--label``: a number too long to be a class index 0-999 is refused
    as it is read (past 4,300 digits Python would not even convert it); the rest is checked
    against the classes when the images are known."""
    if text.strip().lstrip("+-").isdigit() and len(text.strip()) > 20:
        raise argparse.ArgumentTypeError(f"class index {quoted(text)} is out of range 0-999")
    return text


class CommandParser(argparse.ArgumentParser):
    """A command's parser whose errors are one line, ``zfk CMD: error: ...`` (exit status 2),
    like every other refusal of ``zfk``: argparse's usage block would bury the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def index_ranges(text: str, what: str) -> List[Tuple[int, int]]:
    """``"0-15,20"`` -> ``[(0, 15), (20, 20)]``: the inclusive ranges of a list of numbers and
    ranges, checked but not expanded (``0-1000000000`` costs nothing)."""
    ranges = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            first = int(low)
            last = int(high) if dash else first
        except ValueError:  # (also a number of thousands of digits: Python refuses to convert it)
            raise UsageError(f"{what}: {quoted(part)} is not a non-negative number or a range like 0-15") from None
        if first < 0 or last < 0:
            raise UsageError(f"{what}: {quoted(part)} is negative")
        if last < first:
            raise UsageError(f"{what}: empty range {quoted(part)} (write low-high with low <= high)")
        ranges.append((first, last))
    if not ranges:
        raise UsageError(f"{what}: no numbers in {quoted(text)}")
    return ranges


def parse_index_list(text: str, what: str, limit: Optional[int] = None) -> List[int]:
    """``"0-15,20,31"`` -> ``[0, ..., 15, 20, 31]`` (sorted, without repeats). Ranges are inclusive.
    With ``limit``, every number must be below it, which is checked before the list is built."""
    ranges = index_ranges(text, what)
    largest = max(last for _, last in ranges)
    if limit is not None and largest >= limit:
        raise UsageError(f"{what}: {largest} is out of range (0-{limit - 1})")
    picked = set()
    for first, last in ranges:
        picked.update(range(first, last + 1))
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
        raise UsageError(f"--device: {name!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA was asked for but no CUDA GPU is visible (use --device cpu)")
        from ..ops import build_info

        if not build_info().get("cuda"):
            raise UsageError(f"--device {name}: zfkernels was built without its CUDA kernels (rebuild where nvcc is found)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device: {name!r} is not supported (use cpu, cuda or cuda:N)")
    return device


def load_model(arch: str, weights: Optional[str], seed: int, device: torch.device) -> nn.Module:
    """The evaluation-mode model on ``device``. An ``--arch`` that gives no network, weights
    that do not fit, and a network the deconvnet cannot run are each a one-line
    :class:`UsageError`."""
    try:
        model = models.build(arch, weights, seed=seed if weights is None else None)
    except models.ArchitectureError as error:
        raise UsageError(f"--arch: {error}") from None
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    model.eval()
    if not models.is_zoo(arch):
        check_engine_runs(arch, model)
    return model.to(device)


LAYERS_HELP = ("comma-separated layers: the zoo's conv1 … conv5 (VGG16: conv1_1 … conv5_3), or torchvision's "
               "feature-extraction node names for other networks (layer2.1.relu_1, features.42 …) or a module holding them "
               "(layer2: its last). Default: every conv "
               "layer of the zoo, each stage's output of a torchvision family (ResNets: layer1 … layer4; see docs/models.md)")


def resolve_layers(text: Optional[str], usable: Sequence[str], default: Sequence[str], what: str = "--layers",
                   resolve: Optional[Callable[[str], str]] = None) -> List[str]:
    """A comma-separated layer list (``None``: ``default``) as names of ``usable``, in its
    (network) order. A name that is not in ``usable`` may stand for one that is through
    ``resolve`` (a module path for its last node); any other is a one-line
    :class:`UsageError` with the close names."""
    if text is None:
        return list(default)
    asked = [part.strip() for part in text.split(",") if part.strip()]
    if not asked:
        raise UsageError(f"{what}: no layer names given")

    def meaning(name: str) -> Optional[str]:
        if name in usable:
            return name
        try:
            found = resolve(name) if resolve is not None else None
        except ValueError:
            return None
        return found if found in usable else None

    meant = {name: meaning(name) for name in asked}
    unknown = [name for name, found in meant.items() if found is None]
    if unknown:
        raise UsageError(f"{what}: {unknown_layer_message(unknown[0], list(usable))}")
    return [name for name in usable if name in meant.values()]


def feature_layers(arch: str, model: nn.Module, text: Optional[str]) -> List[str]:
    """``--layers`` of a command that shows feature maps (``visualize``, ``evolution``): the
    engine's projectable layers, or a module that holds some (``layer2``: its last one, as for
    the defaults); by default :func:`zfkernels.models.default_layers` (every conv layer of the
    zoo, each stage's output of a torchvision family)."""
    from ..engine import graph_of

    graph = graph_of(model)
    default = models.default_layers(arch, model) if text is None else []
    return resolve_layers(text, graph.layers, default, resolve=graph.resolve)


def check_engine_runs(arch: str, model: nn.Module) -> None:
    """Refuse, in one line, a network the deconvnet engine does not take (its first unsupported
    operation), before any command starts on it."""
    from ..engine import graph_of

    try:
        graph_of(model).layers  # traced, classified, and its layers listed
    except (ValueError, TypeError, NotImplementedError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"--arch {arch}: the deconvnet cannot run this network: {first}") from None


# -- output folders ----------------------------------------------------------------------------


LOCK_FILE = ".zfk.lock"
# The output folders this process holds the lock of: resolved path -> the lock file's descriptor
# (kept open: the lock lasts until the process ends, and the kernel drops it however it ends).
_HELD: Dict[str, int] = {}


def prepare_out(out: Path, *, marker: str = OUTPUT_MARKER, files: Sequence[str] = (),
                folders: Sequence[str] = ()) -> Path:
    """Create ``out`` (and its parents), make sure files can be written in it, and lock it for
    this process. A folder that exists, holds other files and was not made by zfk is refused (it
    will not be mixed into), and so is one holding a symbolic link anywhere (zfk never writes
    through a link in its output folder), one where a name of ``files`` (relative paths the
    command writes) is not a file or one of ``folders`` not a folder, and one that another zfk
    run holds (the message names it). Everything is checked before anything is written."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if out.is_dir():
        _check_existing_out(out, marker, files, folders)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {out}: cannot create the folder ({error.strerror or error})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the folder is not writable")
    lock_out(out)
    try:
        atomic_write_text(out / marker, "a zfk output folder\n")
    except OSError as error:
        raise UsageError(f"--out {out}: the folder is not writable ({error.strerror or error})") from None
    return out


def _check_existing_out(out: Path, marker: str, files: Sequence[str], folders: Sequence[str]) -> None:
    """What an existing ``--out`` must satisfy before zfk writes into it (see :func:`prepare_out`)."""
    try:
        stamp = os.lstat(out / marker)
    except FileNotFoundError:
        stamp = None
    except OSError as error:
        raise UsageError(f"--out {out}: cannot read the folder ({error.strerror or error})") from None
    try:
        if stamp is None and any(out.iterdir()):
            raise UsageError(f"--out {out}: the folder holds other files and is not a zfk output folder; "
                             "choose an empty or new one")
        for folder, names, filenames in os.walk(out):  # (never follows links)
            for name in names + filenames:
                if os.path.islink(os.path.join(folder, name)):
                    raise UsageError(f"--out {out}: {os.path.join(folder, name)} is a symbolic link; zfk never "
                                     "writes through a link in its output folder (remove it)")
    except OSError as error:
        raise UsageError(f"--out {out}: cannot read the folder ({error.strerror or error})") from None
    for name in (marker, LOCK_FILE, *files):
        if os.path.lexists(out / name) and not (out / name).is_file():
            raise UsageError(f"--out {out}: {out / name} is not a file, and zfk writes a file there (remove it)")
    for name in folders:
        if os.path.lexists(out / name) and not (out / name).is_dir():
            raise UsageError(f"--out {out}: {out / name} is not a folder, and zfk writes a folder there (remove it)")


def lock_out(out: Path) -> None:
    """Lock ``out`` for this process (``flock`` on :data:`LOCK_FILE` inside it), or refuse with
    the pid and command of the run that holds it. The lock ends with the process (a crash or a
    kill included); a process may take it again."""
    path = out / LOCK_FILE
    key = os.path.realpath(out)
    held = _HELD.get(key)
    if held is not None:
        try:
            if os.path.samestat(os.fstat(held), os.lstat(path)):
                return
        except OSError:
            pass
        os.close(_HELD.pop(key))  # the folder was removed or replaced since: lock the new one
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise UsageError(f"--out {out}: cannot create its lock file {path} ({error.strerror or error})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that has not said which"
        os.close(fd)
        raise UsageError(f"--out {out}: another zfk run is writing into this folder ({holder}); "
                         "wait for it to end or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}: {shlex.join(['zfk', *sys.argv[1:]])}\n".encode("utf-8", "replace"), 0)
    _HELD[key] = fd


# -- what the diagnostics' commands share -------------------------------------------------------


def model_header(args: argparse.Namespace) -> Dict[str, Optional[str]]:
    """What a page's model table shows (``macros.html``'s ``model_table``): the architecture,
    the weights, and the loud warning for an untrained model (``None`` for a trained one)."""
    untrained = args.weights is None
    return {"arch": args.arch,
            "weights": f"seeded random, UNTRAINED (seed {args.seed})" if untrained else args.weights,
            "warning": untrained_warning(args.arch, args.seed) if untrained else None}


def model_description(args: argparse.Namespace) -> Dict[str, object]:
    """The model, for the JSON documents."""
    return {"arch": args.arch, "weights": args.weights, "seed": None if args.weights else args.seed,
            "untrained": args.weights is None}


def warn_untrained(args: argparse.Namespace) -> None:
    """The loud warning on stderr for a seeded random model (also under ``--quiet``)."""
    if args.weights is None:
        say(untrained_warning(args.arch, args.seed))


def add_out_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="zfk-out", metavar="DIR",
                        help="output folder, the one `zfk visualize` writes its gallery into (default: zfk-out); "
                             "this command writes into a subfolder of it and refreshes diagnostics.html")


def add_label_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label", nargs="+", type=label_text, metavar="CLASS",
                        help="true class as an index 0-999 or a synset id: one for all images or one per image "
                             "(default: the synset in each file name)")


def finish_parser(parser: argparse.ArgumentParser, run, batch_size: int = 64) -> None:
    """The options every diagnostic ends with (``--batch-size``, ``--out``, ``--quiet``) and
    its ``run`` function."""
    parser.add_argument("--batch-size", type=batch_size_int, default=batch_size, metavar="N",
                        help=f"images per forward pass on the device, at most {MAX_BATCH} (default: {batch_size})")
    add_out_option(parser)
    add_quiet_option(parser)
    parser.set_defaults(run=run)
