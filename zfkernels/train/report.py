"""What a training run reports in ``--out``: ``metrics.json`` and ``curves.png``."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Dict, Sequence

from ..job.io import atomic_write_bytes, atomic_write_text

METRICS = "metrics.json"
CURVES = "curves.png"


def write_metrics(out: Path, document: Dict[str, object]) -> None:
    """``out/metrics.json`` (``{"epochs": [...], ...}``), atomically."""
    atomic_write_text(out / METRICS, json.dumps(document, indent=1, ensure_ascii=True, allow_nan=False) + "\n")


def plot_curves(path: Path, epochs: Sequence[Dict[str, object]], title: str) -> None:
    """Training loss, and validation top-1 / top-5 error, against the epoch (a PNG, atomically)."""
    from matplotlib.figure import Figure  # the Agg renderer, no pyplot and no global state

    x = [row["epoch"] for row in epochs]
    figure = Figure(figsize=(9, 3.6), dpi=100, layout="constrained")
    loss_axes, error_axes = figure.subplots(1, 2)
    loss_axes.plot(x, [math.nan if row["train_loss"] is None else row["train_loss"] for row in epochs], marker="o")
    loss_axes.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title="training loss")
    for key, label in (("val_top1", "top-1"), ("val_top5", "top-5")):
        error_axes.plot(x, [1.0 - row[key] for row in epochs], marker="o", label=f"{label} error")
    error_axes.set(xlabel="epoch", ylabel="validation error", ylim=(0, 1), title="validation error")
    error_axes.legend()
    for axes in (loss_axes, error_axes):
        axes.grid(alpha=0.3)
        if len(x) < 12:
            axes.set_xticks(x)
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())

