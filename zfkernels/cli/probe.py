"""``zfk probe``: the command line of :mod:`zfkernels.diagnostics.probe`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import models
from ..diagnostics import common as diagnostics_common
from ..diagnostics import probe
from ..errors import UsageError
from ..job.console import progress_bar, say
from ..train import ABLATIONS, build_network
from ..train import data as train_data
from .common import (ARCHS, DEFAULT_SEED, add_device_option, finish_parser, load_model, model_description, model_header,
                     non_negative_int, positive_int, prepare_out, resolve_device, warn_untrained)

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
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed of the random network used without --weights, and of the subsets (default: {DEFAULT_SEED})")
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
                        help="pool each map to G x G cells (default: 1, global pooling)")
    parser.add_argument("--resize", type=positive_int, default=256, metavar="N",
                        help="short side the images are resized to (default: 256)")
    parser.add_argument("--crop", type=positive_int, default=224, metavar="N", help="centre crop (default: 224)")
    parser.add_argument("--workers", type=non_negative_int, default=2, metavar="N",
                        help="decoding processes (default: 2; 0 decodes in this process)")
    finish_parser(parser, run, batch_size=64)


def build_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The zoo's model, or one of ``zfk train``'s ablations (seeded random without --weights)."""
    if args.arch not in ABLATIONS:
        return load_model(args.arch, args.weights, args.seed, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = build_network(args.arch)
    if args.weights is not None:
        try:
            models.load_weights(model, args.weights, args.arch)
        except (ValueError, FileNotFoundError) as error:
            raise UsageError(str(error)) from None
    return model.eval().to(device)


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


def check_sizes(train: train_data.Split, sizes: Optional[List[int]]) -> None:
    if not sizes:
        return
    counts = [0] * len(train.classes)
    for _, label in train.samples:
        counts[label] += 1
    smallest = min(range(len(counts)), key=counts.__getitem__)
    if max(sizes) > counts[smallest]:
        raise UsageError(f"--train-per-class {max(sizes)}: train/{train.classes[smallest]}/ has only "
                         f"{counts[smallest]} images")


def batches(split: train_data.Split, args: argparse.Namespace, device: torch.device, skipped: Dict[str, str],
            description: str) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation crops of ``split`` as uint8 batches with their labels (unreadable files
    are skipped and logged in ``skipped``)."""
    dataset = train_data.ValCrops(split, args.resize, args.crop, ten_crop=False)
    indices = list(range(len(split)))
    loader = train_data.make_loader(dataset, [indices[i:i + args.batch_size] for i in range(0, len(indices), args.batch_size)],
                                    args.workers, device.type == "cuda")
    with progress_bar(len(split), description, "img", args.quiet) as bar:
        for batch in loader:
            for index, reason in batch.skipped:
                skipped[split.samples[index][0]] = reason
                say(f"skipped {split.samples[index][0]}: {reason}", args.quiet)
            bar.update(len(batch.labels) + len(batch.skipped))
            yield batch.images, batch.labels


def run(args: argparse.Namespace) -> int:
    """``zfk probe``; returns the exit status."""
    device = resolve_device(args.device)
    if args.crop > args.resize:
        raise UsageError(f"--crop {args.crop} is larger than --resize {args.resize}")
    train, val = train_data.load_folder(Path(args.data))
    check_sizes(train, args.train_per_class)
    model = build_model(args, device)
    extractor = diagnostics_common.FeatureExtractor(model)
    layers = resolve_layers(extractor, args.layers)
    out = prepare_out(Path(args.out))
    folder = diagnostics_common.subfolder(out, "probe")
    warn_untrained(args)
    skipped: Dict[str, str] = {}
    features = {}
    for name, split in (("train", train), ("val", val)):
        try:
            features[name] = probe.extract_features(extractor, batches(split, args, device, skipped, f"features {name}"),
                                                    layers, args.pool, args.grid, device)
        except ValueError:
            raise UsageError(f"--data {args.data}: no image of {name}/ could be read") from None
    settings = ([probe.ProbeSetting(n, args.splits) for n in sorted(set(args.train_per_class))]
                if args.train_per_class else [probe.ProbeSetting(None, 1)])
    say(f"probe: {len(layers)} layers, {len(settings)} training-set size(s), classifier {args.classifier}", args.quiet)
    results = probe.run_probes(features["train"][0], features["train"][1], features["val"][0], features["val"][1],
                               settings, args.classifier, args.seed)
    chance = 1.0 / len(train.classes)
    pooling = probe.pooling_description(args.pool, args.grid)
    document = {
        "command": "probe", "layers": results, "model": model_description(args), "data": args.data,
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
