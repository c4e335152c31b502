"""Linear probes of each layer (the paper's Tables 4-6): features of every image at a layer, a
linear classifier trained on them (scikit-learn), its top-1 accuracy on held-out images.

**Features.** Post-ReLU outputs, through :class:`zfkernels.diagnostics.common.FeatureExtractor`:
``fc6``/``fc7`` as they are (4096 numbers), a conv layer's maps pooled to a ``grid`` x ``grid``
of cells per map (``avg`` or ``max`` over each cell: adaptive pooling, so ``grid = 1`` is global
pooling) and flattened, ``C * grid * grid`` numbers.

**Classifier.** Features standardised on the training subset (``StandardScaler``), then
``LogisticRegression`` (``softmax``: multinomial cross-entropy, L2, ``C = 1``, lbfgs) or
``LinearSVC`` (``svm``: one-vs-rest hinge, L2, ``C = 1``). Only this classifier is trained; the
network is fixed, as when the paper trains "only a new softmax" on top of its features.

**Protocol.** Without ``train_per_class`` every training image is used once (Table 6's
protocol). With it, for each ``N`` the classifier is trained ``splits`` times on a random
class-balanced subset of ``N`` images per class (subset ``s`` drawn from ``seed + s``) and
scored on all validation images; the mean and standard deviation over the splits are reported
(Tables 4 and 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..job import data as job_data
from . import common

CLASSIFIERS = ("softmax", "svm")
POOLS = ("avg", "max")


def pooling_description(pool: str, grid: int) -> str:
    """How conv layers' maps become features, as ``probe.json`` and the page state it."""
    cells = "global" if grid == 1 else f"{grid}x{grid}-cell"
    return (f"conv layers: {cells} {'average' if pool == 'avg' else 'max'} pooling of each post-ReLU feature map "
            f"(adaptive_{pool}_pool2d to {grid}x{grid}), flattened; fc layers: the post-ReLU units as they are")


def pool_features(value: torch.Tensor, pool: str, grid: int) -> torch.Tensor:
    """``(N, C, H, W)`` maps -> ``(N, C * grid * grid)``; ``(N, D)`` units are kept."""
    if value.dim() == 2:
        return value
    pooled = F.adaptive_avg_pool2d(value, grid) if pool == "avg" else F.adaptive_max_pool2d(value, grid)
    return pooled.flatten(1)


def extract_features(extractor: common.FeatureExtractor, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                     layers: Sequence[str], pool: str, grid: int, device: torch.device) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """``({layer: float32 (N, D)}, int64 labels (N,))`` over ``batches`` of uint8 images
    ``(n, 3, H, W)`` and their labels."""
    parts: Dict[str, List[np.ndarray]] = {name: [] for name in layers}
    labels: List[np.ndarray] = []
    for images, batch_labels in batches:
        if not len(batch_labels):
            continue
        outputs = extractor(job_data.normalize(images.to(device)), layers)
        for name in layers:
            parts[name].append(pool_features(outputs[name].float(), pool, grid).cpu().numpy())
        labels.append(batch_labels.numpy())
    if not labels:
        raise ValueError("extract_features: no images")
    return {name: np.concatenate(p) for name, p in parts.items()}, np.concatenate(labels)


def make_classifier(kind: str, seed: int):
    """A fresh scikit-learn pipeline: standardisation, then the linear classifier."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if kind not in CLASSIFIERS:
        raise ValueError(f"make_classifier: kind must be one of {', '.join(CLASSIFIERS)}, not {kind!r}")
    linear = (LogisticRegression(C=1.0, max_iter=2000) if kind == "softmax"
              # scikit-learn's seeds are 32-bit; ours go up to 2^64 - 1
              else LinearSVC(C=1.0, max_iter=5000, random_state=seed % 2**32))
    return make_pipeline(StandardScaler(), linear)


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` images of every class, drawn without replacement, sorted."""
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(f"class {int(label)} has {len(members)} training images, fewer than {per_class} per class")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


@dataclass(frozen=True)
class ProbeSetting:
    """``per_class``: training images per class (``None``: all), scored over ``splits`` subsets."""

    per_class: Optional[int]
    splits: int


def probe_layer(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray,
                setting: ProbeSetting, classifier: str, seed: int) -> List[float]:
    """Top-1 accuracy on ``val`` of the classifier trained on each split of ``train``."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    scores = []
    for split in range(setting.splits if setting.per_class is not None else 1):
        chosen = (np.arange(len(train_labels)) if setting.per_class is None
                  else balanced_subset(train_labels, setting.per_class, np.random.default_rng(seed + split)))
        model = make_classifier(classifier, seed + split)
        with warnings.catch_warnings():
            # An iteration limit reached is reported, not fatal: the fit is still a linear probe.
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(train[chosen], train_labels[chosen])
        scores.append(float((model.predict(val) == val_labels).mean()))
    return scores


def summary(scores: Sequence[float]) -> Dict[str, object]:
    """``{"mean", "std", "splits"}`` (population standard deviation; 0 for one split)."""
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "splits": [float(s) for s in scores]}


def run_probes(train: Dict[str, np.ndarray], train_labels: np.ndarray, val: Dict[str, np.ndarray],
               val_labels: np.ndarray, settings: Sequence[ProbeSetting], classifier: str,
               seed: int) -> Dict[str, Dict[str, object]]:
    """Per layer: the feature size, ``top1`` (the last setting's summary: the most training
    images) and ``by_train_per_class`` (``"all"`` or ``N`` -> summary)."""
    result: Dict[str, Dict[str, object]] = {}
    for layer in train:
        by_setting = {("all" if s.per_class is None else str(s.per_class)):
                      summary(probe_layer(train[layer], train_labels, val[layer], val_labels, s, classifier, seed))
                      for s in settings}
        result[layer] = {"features": int(train[layer].shape[1]), "top1": list(by_setting.values())[-1],
                         "by_train_per_class": by_setting}
    return result


def plot(path: Path, layers: Dict[str, Dict[str, object]], chance: float, title: str) -> None:
    """Validation top-1 against the layer, one line per training-set size, with the splits'
    standard deviation as error bars and chance as a dashed line."""
    names = list(layers)
    figure = common.new_figure(max(5.0, 0.8 * len(names) + 2), 3.8)
    axes = figure.add_subplot()
    settings = list(next(iter(layers.values()))["by_train_per_class"]) if layers else []
    for key in settings:
        means = [layers[n]["by_train_per_class"][key]["mean"] for n in names]
        stds = [layers[n]["by_train_per_class"][key]["std"] for n in names]
        axes.errorbar(range(len(names)), means, yerr=stds, marker="o", capsize=3,
                      label="all training images" if key == "all" else f"{key} per class")
    axes.axhline(chance, linestyle="--", color="grey", label="chance")
    axes.set_xticks(range(len(names)), [common.plain(n) for n in names])
    axes.set(xlabel="layer", ylabel="validation top-1", ylim=(0, 1.02), title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    common.save_figure(figure, path)
