"""``zfk train``: the command line of :mod:`zfkernels.train`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Dict, Optional

from ..errors import UsageError
from ..job.console import say
from ..train import TRAIN_ARCHITECTURES, TrainConfig, Training
from ..train.bounds import BOUNDS, FieldError
from ..train.loop import Diverged
from ..train.recipe import INITS, PAPER, Recipe
from ..train.state import STATE, load_state
from .common import (add_device_option, add_quiet_option, default_workers, prepare_out, quoted, resolve_device,
                     workers_int)

DESCRIPTION = """\
Train a network with Zeiler & Fergus's recipe (Section 3 of the paper): SGD with momentum on
minibatches of 128, learning rate 1e-2 dropped x0.1 when the validation error plateaus, dropout
0.5 in fc6/fc7, every conv filter renormalised to RMS <= 0.1 after each step, random 224x224
crops (and flips) of the centre 256x256 of each image. --data holds train/ and val/, with one
subfolder per class (ImageNet's layout). --arch also takes the paper's Table 3 ablations.

Writes into --out: epoch-NNN.pth after every epoch (plain state dicts: `zfk visualize --weights`,
`zfk evolution --checkpoints` and `zfk filters` load them), metrics.json, curves.png and
train-state.pth, from which --resume continues a stopped run (Ctrl-C, SIGTERM or a kill) to the
same result. Under `torchrun --nproc-per-node N -m zfkernels train ...` it runs N processes
(DistributedDataParallel: NCCL on GPUs, gloo on the CPU) with the same global batch.
"""

RECIPE = Recipe()
CONFIG = TrainConfig(data="")
RECIPES = ("default", "paper")
WORKERS = 4  # data-loading processes by default (fewer on a machine with fewer CPUs)
# Options that shape the result: with --resume they come from the run's state, so none may be given.
RUN_OPTIONS = ("data", "arch", "recipe", "epochs", "batch_size", "lr", "momentum", "weight_decay", "dropout", "renorm",
               "init", "init_std", "warmup", "plateau_patience", "seed", "resize", "crop", "ten_crop", "width", "weights",
               "save_every", "device")


def option_type(name: str) -> Callable[[str], object]:
    """The argparse type of the run's number ``name``: read as its kind, then checked against
    :data:`zfkernels.train.bounds.BOUNDS` (the same check a resumed state's configuration and the
    Python API get); the message quotes what was typed."""
    bound = BOUNDS[name]

    def parse(text: str) -> object:
        try:
            value = bound.kind(text)
        except (ValueError, OverflowError):  # (also an integer past Python's 4,300-digit limit)
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if bound.kind is int else 'a number'}, got {quoted(text)}") from None
        try:
            return bound.check(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {bound.describe()}, got {quoted(text)}") from None

    parse.__name__ = bound.kind.__name__
    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to ``zfk``'s sub-commands."""
    parser = subparsers.add_parser("train", help="train ZFNet (or AlexNet, or a Table 3 ablation) with the paper's recipe",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", metavar="DIR", help="folder with train/ and val/, one subfolder per class (required unless --resume)")
    add("--arch", choices=TRAIN_ARCHITECTURES, default=None,
        help="zfnet (default), alexnet, or ZFNet without fc6+fc7, conv3+conv4, or all four (the paper's Table 3)")
    add("--out", required=True, metavar="DIR", help="output folder: checkpoints, metrics, curves, training state")
    add("--recipe", choices=RECIPES, default=None,
        help="default: the paper's recipe with the deviations docs/train.md names (initialisation, warm-up); paper: "
             f"the paper's own ({', '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in PAPER.items())}). "
             "Options given with it change it further")
    for name, text in (
            ("epochs", "epochs to train"),
            ("batch_size", "global minibatch, over all processes"),
            ("lr", "learning rate, reached after the warm-up (default: 0.01 x --batch-size / 128, the paper's 0.01 "
                   "at its minibatch of 128 scaled linearly)"),
            ("momentum", "SGD momentum"),
            ("weight_decay", "L2 weight decay on every parameter (the paper states none; this is AlexNet's)"),
            ("dropout", "dropout probability in fc6 and fc7 (0: off)"),
            ("renorm", "radius: after every step each conv filter whose RMS exceeds it is rescaled to it (0: off)"),
            ("init_std", "std of every weight under --init paper"),
            ("warmup", "steps over which the learning rate rises linearly to --lr; the plateau rule waits for them"),
            ("plateau_patience", "epochs without a lower validation error, after the warm-up, before the learning "
                                 "rate drops x0.1 at the next one"),
            ("seed", "seed of the initialisation, the data order, crops, flips and dropout"),
            ("resize", "short side the images are resized to, and the side of the centre square the crops are taken "
                       "from (smaller values train quick experiments)"),
            ("crop", "side of the random training crops and of the validation crop, at least the smallest image "
                     "the network takes (63 for ZFNet)"),
            ("width", "multiplies the number of filters of every conv layer and the units of fc6/fc7 (1: the paper's "
                      "network; zfk probe --width loads checkpoints of other widths)"),
            ("save_every", "also save the training state every N steps within an epoch (0: only after each epoch)"),
    ):
        default = getattr(RECIPE if hasattr(RECIPE, name) else CONFIG, name)
        add("--" + name.replace("_", "-"), type=option_type(name), default=None,
            metavar="N" if BOUNDS[name].kind is int else "X", help=text if default is None else f"{text} (default: {default:g})")
    add("--init", choices=INITS, default=None,
        help="weight initialisation: kaiming (default: He et al.'s N(0, 2/fan-in) for conv layers, LeCun's "
             "N(0, 1/fan-in) for linear layers, biases 0), paper (every weight N(0, --init-std), biases 0: learns only "
             "after a long plateau) or torchvision (PyTorch's layer defaults)")
    add("--ten-crop", action="store_true", default=None,
        help="validate on ten crops per image (corners, centre and their mirror images, softmax averaged)")
    add("--weights", metavar="PATH", help="start from this state dict of --arch (weights_only=True; 'torchvision': "
        "torchvision's cached AlexNet file) instead of --init")
    add("--resume", action="store_true",
        help=f"continue the run in --out from its {STATE}; no other option but --workers and --quiet may be given")
    add("--workers", type=workers_int, default=None, metavar="N",
        help=f"data-loading processes, at most one per CPU (default: {WORKERS}, or the CPUs if fewer)")
    add_device_option(parser)
    add_quiet_option(parser)
    parser.set_defaults(run=run)


def config_from(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration from the options: the recipe chosen (``--recipe``), then each
    option given."""
    if args.data is None:
        raise UsageError("--data is required (or --resume to continue a run)")

    def pick(name: str, default: object) -> object:
        value = getattr(args, name, None)
        return default if value is None else value

    preset = {**RECIPE.as_dict(), **(PAPER if args.recipe == "paper" else {})}
    # Absolute paths: --resume may run from another working directory.
    weights = args.weights if args.weights in (None, "torchvision") else os.path.abspath(args.weights)
    try:
        recipe = Recipe(**{name: pick(name, value) for name, value in preset.items()})
        return TrainConfig(data=os.path.abspath(args.data), arch=pick("arch", CONFIG.arch), recipe=recipe,
                           weights=weights, **{name: pick(name, getattr(CONFIG, name))
                                               for name in ("seed", "resize", "crop", "ten_crop", "width", "save_every")})
    except FieldError as error:  # a combination of options (each alone was checked as it was read)
        raise UsageError(f"--{error.field.replace('_', '-')}: {error.problem}") from None


def check_out(out: Path, data: Path) -> None:
    resolved_out, resolved_data = out.resolve(), data.resolve()
    if resolved_out == resolved_data or resolved_data in resolved_out.parents:
        raise UsageError(f"--out {out}: inside --data {data} (the checkpoints would be mixed into the images)")
    if (out / STATE).exists():
        raise UsageError(f"--out {out}: holds a training run ({STATE}); pass --resume to continue it, or choose "
                         "another folder")


def config_of(state: Dict[str, object], out: Path) -> TrainConfig:
    """The configuration a state holds, checked as the options would be."""
    try:
        return TrainConfig.from_dict(state.get("config"))
    except ValueError as error:
        raise UsageError(f"--resume {out}: {STATE} does not hold a usable run: config: {error}") from None


def run(args: argparse.Namespace) -> int:
    """``zfk train``; returns the exit status (1 for a run that diverged)."""
    out = Path(args.out)
    state: Optional[dict] = None
    if args.resume:
        given = [name for name in RUN_OPTIONS if getattr(args, name) is not None]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UsageError(f"--resume continues the run with its own arguments (saved in {STATE}); drop {flags}")
        state = load_state(out)
        config = config_of(state, out)
        if state.get("device") not in ("cpu", "cuda"):
            raise UsageError(f"--resume {out}: {STATE} does not hold a usable run: device {quoted(repr(state.get('device')))} "
                             "is neither cpu nor cuda")
        device = resolve_device(state["device"])
    else:
        config = config_from(args)
        check_out(out, Path(config.data))
        device = resolve_device(args.device)
    workers = default_workers(WORKERS) if args.workers is None else args.workers
    training = Training(config, out, device, workers=workers, quiet=args.quiet, resume=state)
    if state is None and training.dist.rank == 0:
        prepare_out(out)
    try:
        rows = training.run()
    except Diverged as error:
        if training.dist.rank == 0:
            say(f"zfk train: error: {error}")
        return 1
    last = rows[-1]
    say(f"train: {len(rows)} epochs, val top-1 {last['val_top1']:.4f}, top-5 {last['val_top5']:.4f} -> {out}",
        args.quiet or training.dist.rank != 0)
    return 0
