"""The paper's other instruments: occlusion sensitivity (Figure 7), correspondence analysis
(Table 7), invariance curves (Figure 5), feature evolution across checkpoints (Figure 4) and
layer-1 filter comparison (Figure 6).

Each module holds the computation (plain functions on models and tensors, testable without the
command line) and its figures; the ``zfk`` commands that drive them live in
:mod:`zfkernels.cli`. Every command writes PNG figures, a JSON of the numbers and an
``index.html`` into its own subfolder of ``--out``, and refreshes ``--out/diagnostics.html``,
which links every diagnostic page present.
"""
