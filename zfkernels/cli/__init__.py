"""The ``zfk`` command line (also ``python -m zfkernels``).

Argument parsing and orchestration only: each command lives in its own module of this package
and adds itself with ``register(subparsers)``, which sets ``run`` (a function of the parsed
arguments returning an exit status) as the parser's default. The work itself is done by
:mod:`zfkernels.job` (the main job) and :mod:`zfkernels.diagnostics`.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..errors import UsageError
from . import correspondence, evolution, filters, invariance, occlusion, probe, train, visualize
from .common import CommandParser

# In the order `zfk --help` lists them.
COMMANDS = (visualize, occlusion, correspondence, invariance, evolution, filters, train, probe)

DESCRIPTION = """\
zfkernels: Zeiler & Fergus's deconvnet ("Visualizing and Understanding Convolutional Networks",
2013) over whole image folders, with hand-written CPU and CUDA kernels.

  zfk visualize     Figure 2 for every feature map: top-K activations across a folder, projected
                    to pixel space beside their image patches, as an HTML gallery
  zfk occlusion     Figure 7: occlusion sensitivity maps of images
  zfk correspondence  Table 7: correspondence of object parts across images
  zfk invariance    Figure 5: feature distances and class probability under transformations
  zfk evolution     Figure 4: the strongest activation of chosen features across checkpoints
  zfk filters       Figure 6: layer-1 filters (and a second model beside them)
  zfk train         Section 3: train ZFNet with the paper's recipe, or a Table 3 ablation
  zfk probe         Tables 4-6: linear probes of each layer's features (scikit-learn)

`zfk COMMAND --help` explains each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zfk", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=CommandParser)
    subparsers.required = True
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``zfk`` with ``argv`` (default: the process's arguments); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UsageError as error:
        if not getattr(error, "silent", False):  # (another process of a torchrun job printed it)
            print(f"zfk {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"zfk {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
