"""What the benchmarks share: where the sample photographs are, and the one way every benchmark
writes its results (``{"meta": {...}, "rows": [...]}`` as JSON, with the machine, date, torch,
build and the command that made them)."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import date
from pathlib import Path
from typing import List, Optional, Sequence

import torch

import zfkernels

# The 800 ImageNet sample photographs beside the repository (ZFK_SAMPLE_IMAGES points elsewhere,
# e.g. a copy on a GPU machine).
SHARED_IMAGES = Path(os.environ.get("ZFK_SAMPLE_IMAGES") or Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample")


def write_results(path: Path, rows: Sequence[dict], cuda: bool, argv: Optional[List[str]], **extra: object) -> None:
    """Write ``rows`` and the run's metadata (plus ``extra`` fields) to ``path``."""
    meta = dict(
        date=date.today().isoformat(),
        machine=f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
                f"{torch.get_num_threads()} threads".replace("  ", " "),
        gpu=torch.cuda.get_device_name() if cuda else None,
        torch=torch.__version__,
        build=zfkernels.build_info(),
        command="python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        **extra,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta=meta, rows=list(rows)), indent=2) + "\n")
    print(f"wrote {path}")
