"""``zfk probe``: the command line of :mod:`zfkernels.diagnostics.probe`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .. import models
from ..diagnostics import common as diagnostics_common
from ..diagnostics import probe
from ..errors import UsageError
from ..job.console import progress_bar, say
from ..train import ABLATIONS, build_network
from ..train import data as train_data
from ..train.ablations import check_crop, check_finite
from ..train.bounds import MAX_SIDE
from .common import (ARCHS, DEFAULT_SEED, add_device_option, default_workers, finish_parser, load_model,
                     model_description, model_header, positive_int, prepare_out, resolve_device, seed_int,
                     warn_untrained, workers_int)
from .train import option_type

WORKERS = 2  # decoding processes by default (fewer on a machine with fewer CPUs)

DESCRIPTION = """\
Layer-wise linear probes (the paper's Tables 4-6). For each chosen layer (default: every conv
layer, fc6 and fc7), the post-ReLU features of every image of --data's train/ and val/ (one
subfolder per class, as `zfk train` takes; the evaluation crop), a linear classifier trained on
the train/ features alone (scikit-learn: multinomial logistic regression, or a linear SVM), and
its top-1 accuracy on val/. Conv layers' maps are pooled (--pool, --grid) and the pooling is
stated in the outputs. With --train-per-class N [N ...], repeated over --splits random
class-balanced subsets of N training images per class: mean and standard deviation, as in
Tables 4 and 5. Writes --out/probe/: probe.json, probe.png and index.html, linked from
--out/diagnostics.html.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``probe`` to ``zfk``'s sub-commands."""
    parser = subparsers.add_parser("probe", help="linear probes of each layer's features (Tables 4-6)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=tuple(ARCHS) + tuple(ABLATIONS), default="zfnet",
                        help="network: the zoo's, or one of zfk train's ablations (default: zfnet)")
    parser.add_argument("--weights", metavar="PATH",
                        help="state-dict file of --arch (e.g. zfk train's epoch-NNN.pth), loaded with weights_only=True; "
                             "'torchvision' for torchvision's cached file. Without it: a seeded random, UNTRAINED network")
    parser.add_argument("--seed", type=seed_int, default=DEFAULT_SEED,
                        help="seed of the random network used without --weights, and of the subsets, "
                             f"0 <= seed < 2^64 (default: {DEFAULT_SEED})")
    parser.add_argument("--width", type=option_type("width"), default=1.0, metavar="X",
                        help="width of zfk train's --width: ZFNet (or an ablation) with X times the filters and fc "
                             "units, for checkpoints of such runs (default: 1, the paper's network)")
    add_device_option(parser)
    parser.add_argument("--data", required=True, metavar="DIR", help="folder with train/ and val/, one subfolder per class")
    parser.add_argument("--layers", metavar="LIST", help="comma-separated layers, e.g. conv1,conv5,fc7 "
                                                        "(default: every conv layer, fc6 and fc7)")
    parser.add_argument("--train-per-class", type=positive_int, nargs="+", metavar="N",
                        help="training images per class, one or more sizes (default: every training image, once)")
    parser.add_argument("--splits", type=positive_int, default=5, metavar="K",
                        help="random class-balanced subsets per --train-per-class size (default: 5)")
    parser.add_argument("--classifier", choices=probe.CLASSIFIERS, default="softmax",
                        help="softmax: multinomial logistic regression (default); svm: linear SVM")
    parser.add_argument("--pool", choices=probe.POOLS, default="avg",
                        help="how a conv layer's maps are pooled into features (default: avg)")
    parser.add_argument("--grid", type=positive_int, default=1, metavar="G",
                        help="pool each map to G x G cells, G at most the side of the smallest map pooled "
                             "(default: 1, global pooling)")
    parser.add_argument("--resize", type=option_type("resize"), default=256, metavar="N",
                        help=f"short side the images are resized to, at most {MAX_SIDE} (default: 256)")
    parser.add_argument("--crop", type=option_type("crop"), default=224, metavar="N",
                        help="centre crop, at least the smallest image the network takes (default: 224)")
    parser.add_argument("--workers", type=workers_int, default=None, metavar="N",
                        help=f"decoding processes, at most one per CPU (default: {WORKERS}, or the CPUs if fewer; "
                             "0 decodes in this process)")
    finish_parser(parser, run, batch_size=64)


def build_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The zoo's model, or ``zfk train``'s network at ``--width`` (an ablation, or ZFNet at another
    width): seeded random without --weights. Weights holding a NaN or an infinity are refused:
    the probes of such a network would be scikit-learn's traceback, or noise."""
    if args.width != 1 and args.arch != "zfnet" and args.arch not in ABLATIONS:
        raise UsageError(f"--width {args.width:g}: {args.arch} has one width; only zfnet and zfk train's ablations "
                         "take another")
    if args.arch not in ABLATIONS and args.width == 1:
        model = load_model(args.arch, args.weights, args.seed, device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = build_network(args.arch, width=args.width)
        if args.weights is not None:
            try:
                models.load_weights(model, args.weights, args.arch)
            except (ValueError, FileNotFoundError) as error:
                raise UsageError(str(error)) from None
        model = model.eval().to(device)
    check_finite(model, args.weights)
    return model


def resolve_layers(extractor: diagnostics_common.FeatureExtractor, text: Optional[str]) -> List[str]:
    names = extractor.conv_layers + extractor.fc_layers
    if text is None:
        return names
    asked = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in asked if name not in names]
    if not asked or unknown:
        raise UsageError(f"--layers: {'unknown layer ' + repr(unknown[0]) if unknown else 'no layer names given'}; "
                         f"this network has {', '.join(names)}")
    return [name for name in names if name in asked]


def check_classes(train: train_data.Split, sizes: Optional[List[int]], data: str) -> None:
    """Two classes at least, and ``--train-per-class`` within every class's files."""
    if len(train.classes) < 2:
        raise UsageError(f"--data {data}: train/ and val/ have one class ({train.classes[0]}); a classifier needs two")
    if not sizes:
        return
    counts = class_counts(train.samples, len(train.classes))
    smallest = min(range(len(counts)), key=counts.__getitem__)
    if max(sizes) > counts[smallest]:
        raise UsageError(f"--train-per-class {max(sizes)}: train/{train.classes[smallest]}/ has only "
                         f"{counts[smallest]} images")


def class_counts(samples: List[Tuple[str, int]], classes: int) -> List[int]:
    counts = [0] * classes
    for _, label in samples:
        counts[label] += 1
    return counts


def check_input(model: nn.Module, extractor: diagnostics_common.FeatureExtractor, layers: List[str],
                args: argparse.Namespace, device: torch.device) -> None:
    """``--crop`` at least the smallest image the network takes, and ``--grid`` at most the side
    of the smallest conv map probed (more cells than positions would only repeat numbers)."""
    check_crop(model, args.crop, args.arch if args.width == 1 else f"{args.arch} at width {args.width:g}")
    convs = [name for name in layers if name in extractor.conv_layers]
    if args.grid == 1 or not convs:
        return
    maps = extractor(torch.zeros(1, 3, args.crop, args.crop, device=device), convs)
    name = min(convs, key=lambda layer: min(maps[layer].shape[-2:]))
    height, width = maps[name].shape[-2:]
    if args.grid > min(height, width):
        raise UsageError(f"--grid {args.grid}: {name}'s maps are {height}x{width} at --crop {args.crop}; pool them to "
                         f"at most {min(height, width)} x {min(height, width)} cells")


def check_features(features: Dict[str, Tuple[Dict[str, np.ndarray], np.ndarray]], train: train_data.Split,
                   sizes: Optional[List[int]], args: argparse.Namespace) -> None:
    """What only the decoded images tell: every class keeps enough readable training images
    (``--train-per-class``, or one), and every feature is finite."""
    need = max(sizes) if sizes else 1
    files = class_counts(train.samples, len(train.classes))
    readable = np.bincount(features["train"][1], minlength=len(train.classes)).tolist()
    for name, have, total in zip(train.classes, readable, files):
        if have < need:
            lost = f"{total - have} of its {total} images could not be read"
            if sizes:
                raise UsageError(f"--train-per-class {need}: train/{name}/ has only {have} readable images ({lost})")
            raise UsageError(f"--data {args.data}: train/{name}/ has no readable image ({lost}); the classifier "
                             "needs every class")
    for split, (values, _) in features.items():
        bad = [layer for layer, value in values.items() if not np.isfinite(value).all()]
        if bad:
            raise UsageError(f"--weights {args.weights}: {bad[0]}'s features of the {split}/ images are not finite "
                             "(the network overflows float32)")


def batches(split: train_data.Split, args: argparse.Namespace, device: torch.device, skipped: Dict[str, str],
            description: str) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation crops of ``split`` as uint8 batches with their labels (unreadable files
    are skipped and logged in ``skipped``)."""
    dataset = train_data.ValCrops(split, args.resize, args.crop, ten_crop=False)
    indices = list(range(len(split)))
    workers = default_workers(WORKERS) if args.workers is None else args.workers
    loader = train_data.make_loader(dataset, [indices[i:i + args.batch_size] for i in range(0, len(indices), args.batch_size)],
                                    workers, device.type == "cuda")
    with progress_bar(len(split), description, "img", args.quiet) as bar:
        for batch in loader:
            for index, reason in batch.skipped:
                skipped[split.samples[index][0]] = reason
                say(f"skipped {split.samples[index][0]}: {reason}", args.quiet)
            bar.update(len(batch.labels) + len(batch.skipped))
            yield batch.images, batch.labels


def run(args: argparse.Namespace) -> int:
    """``zfk probe``; returns the exit status. Everything that can be refused is refused before
    anything is written: the options, the folder, the network, then (after the features are
    extracted, still before --out is made) the readable images and the features."""
    device = resolve_device(args.device)
    if args.crop > args.resize:
        raise UsageError(f"--crop {args.crop} is larger than --resize {args.resize}")
    train, val = train_data.load_folder(Path(args.data))
    check_classes(train, args.train_per_class, args.data)
    model = build_model(args, device)
    extractor = diagnostics_common.FeatureExtractor(model)
    layers = resolve_layers(extractor, args.layers)
    check_input(model, extractor, layers, args, device)
    warn_untrained(args)
    skipped: Dict[str, str] = {}
    features = {}
    for name, split in (("train", train), ("val", val)):
        try:
            features[name] = probe.extract_features(extractor, batches(split, args, device, skipped, f"features {name}"),
                                                    layers, args.pool, args.grid, device)
        except ValueError:
            raise UsageError(f"--data {args.data}: no image of {name}/ could be read") from None
    check_features(features, train, args.train_per_class, args)
    out = prepare_out(Path(args.out))
    folder = diagnostics_common.subfolder(out, "probe")
    settings = ([probe.ProbeSetting(n, args.splits) for n in sorted(set(args.train_per_class))]
                if args.train_per_class else [probe.ProbeSetting(None, 1)])
    say(f"probe: {len(layers)} layers, {len(settings)} training-set size(s), classifier {args.classifier}", args.quiet)
    results = probe.run_probes(features["train"][0], features["train"][1], features["val"][0], features["val"][1],
                               settings, args.classifier, args.seed)
    chance = 1.0 / len(train.classes)
    pooling = probe.pooling_description(args.pool, args.grid)
    document = {
        "command": "probe", "layers": results, "model": {**model_description(args), "width": args.width},
        "data": args.data,
        "classes": train.classes, "chance": chance, "classifier": args.classifier,
        "classifier_details": "StandardScaler, then " + ("LogisticRegression (multinomial, L2, C=1, lbfgs)"
                                                         if args.classifier == "softmax" else "LinearSVC (L2, C=1)"),
        "pooling": pooling, "pool": args.pool, "grid": args.grid,
        "train_per_class": args.train_per_class, "splits": args.splits if args.train_per_class else 1,
        "images": {"train": int(len(features["train"][1])), "val": int(len(features["val"][1]))},
        "preprocess": f"Resize({args.resize}) -> CenterCrop({args.crop}) -> torchvision's ImageNet normalisation",
        "skipped": [{"file": path, "reason": reason} for path, reason in sorted(skipped.items())],
    }
    diagnostics_common.write_json(folder / "probe.json", document)
    probe.plot(folder / "probe.png", results, chance, f"linear probes ({args.classifier}) of {args.arch}")
    columns = list(next(iter(results.values()))["by_train_per_class"])
    diagnostics_common.write_page(
        out, "probe", model=model_header(args), data=args.data, classes=train.classes, images=document["images"],
        classifier=document["classifier_details"], pooling=pooling, chance=chance, skipped=len(skipped),
        splits=document["splits"], columns=["all training images" if c == "all" else f"{c} per class" for c in columns],
        rows=[{"name": layer, "features": r["features"],
               "cells": [r["by_train_per_class"][c] for c in columns]} for layer, r in results.items()])
    best = max(results, key=lambda layer: results[layer]["top1"]["mean"])
    say(f"probe: best layer {best} (top-1 {results[best]['top1']['mean']:.3f}) -> {folder / 'index.html'}", args.quiet)
    return 0
