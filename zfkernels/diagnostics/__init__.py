"""The paper's other instruments, one ``zfk`` command each: occlusion sensitivity (Figure 7),
correspondence analysis (Table 7), invariance curves (Figure 5), feature evolution across
checkpoints (Figure 4) and layer-1 filter comparison (Figure 6).

Each module holds the computation (plain functions on models and tensors, testable without the
command line) and, at its end, the argparse glue. Every command writes PNG figures, a JSON of the
numbers and an ``index.html`` into its own subfolder of ``--out``, and refreshes
``--out/diagnostics.html``, which links every diagnostic page present.
"""

from __future__ import annotations

import argparse

from . import correspondence, evolution, filters, invariance, occlusion

__all__ = ["register", "occlusion", "correspondence", "invariance", "evolution", "filters"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``occlusion``, ``correspondence``, ``invariance``, ``evolution`` and ``filters`` to
    ``zfk``'s sub-commands."""
    for module in (occlusion, correspondence, invariance, evolution, filters):
        module.register(subparsers)
