"""``zfk train``: the command line of :mod:`zfkernels.train`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Dict, Optional

from ..errors import UsageError
from ..job.console import say
from ..train import TRAIN_ARCHITECTURES, TrainConfig, Training
from ..train.loop import STATE, config_of, load_state
from ..train.recipe import INITS, Recipe
from .common import add_device_option, add_quiet_option, non_negative_int, positive_int, prepare_out, resolve_device

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
# Options that shape the result: with --resume they come from the run's state, so none may be given.
RUN_OPTIONS = ("data", "arch", "epochs", "batch_size", "lr", "momentum", "weight_decay", "dropout", "renorm", "init",
               "init_std", "plateau_patience", "seed", "resize", "crop", "ten_crop", "width", "weights", "save_every",
               "device")


def _positive_float(text: str) -> float:
    return _float_at_least(text, 0.0, strict=True)


def _non_negative_float(text: str) -> float:
    return _float_at_least(text, 0.0, strict=False)


def _float_at_least(text: str, low: float, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > low if strict else value >= low):  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected a {'positive' if strict else 'non-negative'} number, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to ``zfk``'s sub-commands."""
    parser = subparsers.add_parser("train", help="train ZFNet (or AlexNet, or a Table 3 ablation) with the paper's recipe",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", metavar="DIR", help="folder with train/ and val/, one subfolder per class (required unless --resume)")
    add("--arch", choices=TRAIN_ARCHITECTURES, default=None,
        help="zfnet (default), alexnet, or ZFNet without fc6+fc7, conv3+conv4, or all four (the paper's Table 3)")
    add("--out", required=True, metavar="DIR", help="output folder: checkpoints, metrics, curves, training state")
    number: Dict[str, Callable[[str], object]] = {"positive": _positive_float, "non-negative": _non_negative_float}
    for flag, kind, value, text in (
            ("--epochs", positive_int, RECIPE.epochs, "epochs to train"),
            ("--batch-size", positive_int, RECIPE.batch_size, "global minibatch, over all processes"),
            ("--lr", number["positive"], RECIPE.lr, "initial learning rate"),
            ("--momentum", number["non-negative"], RECIPE.momentum, "SGD momentum"),
            ("--weight-decay", number["non-negative"], RECIPE.weight_decay,
             "L2 weight decay on every parameter (the paper states none; this is AlexNet's)"),
            ("--dropout", number["non-negative"], RECIPE.dropout, "dropout probability in fc6 and fc7 (0: off)"),
            ("--renorm", number["non-negative"], RECIPE.renorm,
             "radius: after every step each conv filter whose RMS exceeds it is rescaled to it (0: off)"),
            ("--init-std", number["positive"], RECIPE.init_std, "std of the N(0, std) weights of --init paper "
             "(and of the classifier's last layer under --init kaiming)"),
            ("--plateau-patience", non_negative_int, RECIPE.plateau_patience,
             "epochs without a lower validation error before the learning rate drops x0.1"),
            ("--seed", int, CONFIG.seed, "seed of the initialisation, the data order, crops, flips and dropout"),
            ("--resize", positive_int, CONFIG.resize, "short side the images are resized to, and the side of "
             "the centre square the crops are taken from (smaller values train quick experiments)"),
            ("--crop", positive_int, CONFIG.crop, "side of the random training crops and of the validation crop"),
            ("--width", number["positive"], CONFIG.width, "multiplies the number of filters of every conv layer and "
             "the units of fc6/fc7 (1: the paper's network; other widths load only into zfk train and zfk probe)"),
            ("--save-every", non_negative_int, CONFIG.save_every,
             "also save the training state every N steps within an epoch (0: only after each epoch)"),
    ):
        add(flag, type=kind, default=None, metavar="N" if kind in (positive_int, non_negative_int, int) else "X",
            help=f"{text} (default: {value})")
    add("--init", choices=INITS, default=None,
        help="weight initialisation: kaiming (default: He et al. for layers followed by a ReLU, N(0, 0.01) for the "
             "classifier, biases 0), paper (every weight N(0, 0.01), biases 0: learns only after a long plateau), "
             "or torchvision (PyTorch's layer defaults)")
    add("--ten-crop", action="store_true", default=None,
        help="validate on ten crops per image (corners, centre and their mirror images, softmax averaged)")
    add("--weights", metavar="PATH", help="start from this state dict of --arch (weights_only=True; 'torchvision': "
        "torchvision's cached AlexNet file) instead of --init")
    add("--resume", action="store_true",
        help=f"continue the run in --out from its {STATE}; no other option but --workers and --quiet may be given")
    add("--workers", type=non_negative_int, default=4, metavar="N", help="data-loading processes (default: 4)")
    add_device_option(parser)
    add_quiet_option(parser)
    parser.set_defaults(run=run)


def config_from(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration from the options (the recipe's defaults where none is given)."""
    if args.data is None:
        raise UsageError("--data is required (or --resume to continue a run)")

    def pick(name: str, default: object) -> object:
        value = getattr(args, name, None)
        return default if value is None else value

    recipe = Recipe(**{name: pick(name, getattr(RECIPE, name)) for name in RECIPE.as_dict()})
    # Absolute paths: --resume may run from another working directory.
    weights = args.weights if args.weights in (None, "torchvision") else os.path.abspath(args.weights)
    return TrainConfig(data=os.path.abspath(args.data), arch=pick("arch", CONFIG.arch), recipe=recipe, weights=weights,
                       **{name: pick(name, getattr(CONFIG, name))
                          for name in ("seed", "resize", "crop", "ten_crop", "width", "save_every")})


def check_sizes(config: TrainConfig) -> None:
    if config.crop > config.resize:
        raise UsageError(f"--crop {config.crop} is larger than --resize {config.resize} (crops are cut from the "
                         "centre --resize square)")
    if config.arch == "alexnet" and config.width != 1:
        raise UsageError("--width: alexnet is built at width 1 only (torchvision's AlexNet)")


def check_out(out: Path, data: Path) -> None:
    resolved_out, resolved_data = out.resolve(), data.resolve()
    if resolved_out == resolved_data or resolved_data in resolved_out.parents:
        raise UsageError(f"--out {out}: inside --data {data} (the checkpoints would be mixed into the images)")
    if (out / STATE).exists():
        raise UsageError(f"--out {out}: holds a training run ({STATE}); pass --resume to continue it, or choose "
                         "another folder")


def run(args: argparse.Namespace) -> int:
    """``zfk train``; returns the exit status."""
    out = Path(args.out)
    state: Optional[dict] = None
    if args.resume:
        given = [name for name in RUN_OPTIONS if getattr(args, name) is not None]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UsageError(f"--resume continues the run with its own arguments (saved in {STATE}); drop {flags}")
        state = load_state(out)
        config = config_of(state)
        device = resolve_device(state.get("device"))
    else:
        config = config_from(args)
        check_sizes(config)
        check_out(out, Path(config.data))
        device = resolve_device(args.device)
    training = Training(config, out, device, workers=args.workers, quiet=args.quiet, resume=state)
    if state is None and training.dist.rank == 0:
        prepare_out(out)
    rows = training.run()
    last = rows[-1]
    say(f"train: {len(rows)} epochs, val top-1 {last['val_top1']:.4f}, top-5 {last['val_top5']:.4f} -> {out}",
        args.quiet or training.dist.rank != 0)
    return 0
