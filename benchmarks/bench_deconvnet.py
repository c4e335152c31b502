"""Pass 2's projections through ``Deconvnet`` against plain batched PyTorch deconvnets.

``--suite figure2`` (the paper's Figure 2 workload on ZFNet): the top-9 single activations of 64
feature maps of a layer (576 projections from 16 images), for each of conv1 ... conv5, against
the plain batched pure-PyTorch deconvnet (full-image ``F.conv_transpose2d``, the adjoint
reference unpool, ReLU) on the same recording.

``--suite families``: ResNet-50 at ``layer2`` (16 feature maps x 9 images = 144 top-activation
projections) and VGG16-BN at ``features.42`` (conv5_3's ReLU; 64 maps x top 9 of 16 images =
576), each against the plain batched autograd deconvnet: every selection's image forward
(torchvision's ``create_feature_extractor``, ReLU backward swapped for ``relu(signal)``), the
seed, one backward per chunk of 16 selections (its memory: every saved activation of the
chunk's images). Both sides include their forward (ours: one ``record`` per image set, then
``project`` in chunks of 64). With ``--captum``, also Captum's ``NeuronDeconvolution`` once per
neuron (when Captum is installed; a benchmark-only dependency; without it the column is left out
with a message). Calls longer than ``--min-run-time`` are timed once (VGG16-BN's autograd
deconvnet takes ~20 minutes at 224x224 on one CPU core).

``--suite families`` also has the networks of issue #18 (``--models efficientnet_b0
convnext_tiny vit_b_16``): 16 feature maps x the top 9 of 9 images = 144 single activations,
each at its image's strongest position in that map, at a middle stage output (the last node
inside the module, ``Deconvnet.resolve``): EfficientNet-B0 ``features.4``, ConvNeXt-Tiny
``features.3``, ViT-B/16 ``encoder.layers.encoder_layer_5`` (a token grid, addressed on its 14x14
patch grid). The selections come from the plain model's own output at that node. The reference
is the batched autograd deconvnet with the same rules: the patches of the test oracle
(``tests/_oracle.py``, imported by putting the repository's ``tests/`` on ``sys.path``:
activations rectify the signal, sigmoid gates, softmax attention weights and the norms' sigma
frozen) applied once, outside the timer, to a copy of torchvision's feature extractor; then per
chunk of selections ONE float32 forward of their images with the rules and ONE backward.
(``GraphOracle`` itself runs a second, taping forward per call so that its float64 pass breaks
near-ties as the engine's float32 forward does; a float32 reference does not need it, and
``--check-oracle`` checks on 4 selections that the one-pass reference gives GraphOracle's
float32 result.) Ours: ``Deconvnet(model)`` built outside the timer, then inside it, as in the
rows above, one ``record`` of the 9 images and ``project`` in chunks of 64. Each side is called
once, untimed, before it is timed (the warm-up; its result gives the difference column).
ConvNeXt's layer scales, 1e-6 at torchvision's initialisation, are drawn from U(0.2, 1) (seed 0):
at 1e-6 the residual branches add float32 denormals that slow both sides ~10x on a CPU, which
trained weights (layer scales ~0.1-1) never do. ``--reference-only`` times the reference alone
(for an engine that does not take the network yet).

    python benchmarks/bench_deconvnet.py --device cpu --json bench-results/bench_deconvnet.json
    OMP_NUM_THREADS=1 python benchmarks/bench_deconvnet.py --device cpu --suite families --captum \
        --json bench-results/bench_deconvnet_families_cpu.json
    OMP_NUM_THREADS=1 python benchmarks/bench_deconvnet.py --device cpu --suite families \
        --models efficientnet_b0 convnext_tiny vit_b_16 --json bench-results/bench_deconvnet_rules_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from torch.utils.benchmark.utils.common import TaskSpec

import zfkernels
from zfkernels import Deconvnet, models, reference
from _report import SHARED_IMAGES, write_results  # (benchmarks/ is on sys.path when run as a script)

IMAGES, MAPS, TOP = 16, 64, 9


def load_images(count: int) -> Tuple[torch.Tensor, str]:
    """Real photographs from ../shared when present (ImageNet eval transform), else noise."""
    if SHARED_IMAGES.is_dir():
        from PIL import Image
        from torchvision import transforms

        tf = transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])
        files = sorted(SHARED_IMAGES.iterdir())[:count]
        return torch.stack([tf(Image.open(f).convert("RGB")) for f in files]), f"{count} ImageNet sample photographs"
    return torch.randn(count, 3, 224, 224, generator=torch.Generator().manual_seed(0)), f"{count} random images"


def figure2_selections(act: torch.Tensor, maps: int, top: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the first `maps` feature maps, the `top` images with the strongest activation (one
    per image, at its argmax): rows, channels, positions."""
    n, c, h, w = act.shape
    peak, where = act[:, :maps].flatten(2).max(dim=2)  # (N, maps)
    best = peak.topk(min(top, n), dim=0).indices  # (top, maps)
    channels = torch.arange(maps, device=act.device).repeat(best.shape[0])
    rows = best.flatten()
    flat = where[rows, channels]
    return rows, channels, torch.stack([flat // w, flat % w], dim=1)


def plain_deconvnet(dn: Deconvnet, rec: "zfkernels.Recording", layer: str, rows: torch.Tensor, channels: torch.Tensor,
                    positions: torch.Tensor, chunk: int) -> torch.Tensor:
    """The straightforward batched deconvnet in pure PyTorch on a zoo ``.features`` stack, on
    full maps at every level (the engine's recording gives the switches and map sizes)."""
    modules = list(dn.model.features)
    top = int(dn.resolve(layer).split(".")[1])  # the layer's ReLU in model.features
    act = rec.activations[layer]
    sizes = [tuple(rec.images_shape[-2:])] + [tuple(rec.shapes[f"features.{i}"][-2:]) for i in range(top)]
    outs = []
    for start in range(0, rows.shape[0], chunk):
        r, c, p = rows[start:start + chunk], channels[start:start + chunk], positions[start:start + chunk]
        b = torch.arange(r.shape[0], device=act.device)
        signal = torch.zeros((r.shape[0],) + tuple(act.shape[1:]), dtype=act.dtype, device=act.device)
        signal[b, c, p[:, 0], p[:, 1]] = act[r, c, p[:, 0], p[:, 1]]
        for i in range(top - 1, -1, -1):
            module, below = modules[i], sizes[i]  # sizes[i]: the map entering module i
            if isinstance(module, torch.nn.Conv2d):
                k, st, pd = module.kernel_size, module.stride, module.padding
                out_pad = [below[a] - ((signal.shape[2 + a] - 1) * st[a] - 2 * pd[a] + k[a]) for a in range(2)]
                signal = F.conv_transpose2d(signal, module.weight, None, st, pd, out_pad)
            elif isinstance(module, torch.nn.ReLU):
                signal = torch.relu(signal)
            elif isinstance(module, torch.nn.MaxPool2d):
                k = module.kernel_size
                stride = k if module.stride is None else module.stride
                signal = reference.unpool(signal, rec.switches[f"features.{i}"], below, k, stride, module.padding, rows=r)
        outs.append(signal)
    return torch.cat(outs)


class _DeconvReLU(torch.autograd.Function):
    """ReLU whose backward is the deconvnet's rule, relu(signal)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.relu(grad)


class _SwappedReLU(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DeconvReLU.apply(x)


class AutogradDeconvnet:
    """The plain batched autograd deconvnet: torchvision's feature extractor up to ``layer``
    (node name) with every ``nn.ReLU`` module's backward swapped, one forward of every
    selection's image and one backward per chunk of selections."""

    def __init__(self, model: torch.nn.Module, layer: str) -> None:
        import copy

        from torchvision.models.feature_extraction import create_feature_extractor

        extractor = copy.deepcopy(create_feature_extractor(model.eval(), return_nodes={layer: "out"})).eval()
        for module in list(extractor.modules()):
            for key, child in list(module.named_children()):
                if type(child) is torch.nn.ReLU:
                    setattr(module, key, _SwappedReLU())
        self.extractor = extractor

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for images ``x`` (as the selections address it)."""
        return self.extractor(x)["out"]

    def rules_applied(self) -> contextlib.AbstractContextManager:
        """What must be in force while the forward and backward run (nothing here)."""
        return contextlib.nullcontext()

    def __call__(self, images: torch.Tensor, rows: torch.Tensor, channels: torch.Tensor, positions: torch.Tensor,
                 chunk: int) -> torch.Tensor:
        """Projections of the selections, one forward and one backward per chunk of them."""
        outs = []
        for start in range(0, rows.shape[0], chunk):
            r, c, p = rows[start:start + chunk], channels[start:start + chunk], positions[start:start + chunk]
            with torch.enable_grad(), self.rules_applied():
                x = images[r].detach().requires_grad_(True)
                act = self.output(x)
                b = torch.arange(r.shape[0], device=act.device)
                seed = torch.zeros_like(act)
                seed[b, c, p[:, 0], p[:, 1]] = act[b, c, p[:, 0], p[:, 1]].detach()
                (grad,) = torch.autograd.grad(act, x, seed)
            outs.append(grad)
        return torch.cat(outs)


def captum_deconvolution(model: torch.nn.Module, module: torch.nn.Module, images: torch.Tensor, rows: torch.Tensor,
                         channels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Captum's NeuronDeconvolution, once per neuron (its API takes one neuron index per call)."""
    import warnings

    from captum.attr import NeuronDeconvolution

    deconv = NeuronDeconvolution(model, module)
    outs = []
    with warnings.catch_warnings():  # Captum warns about its hooks and input gradients on every call
        warnings.simplefilter("ignore", UserWarning)
        for r, c, (y, x) in zip(rows.tolist(), channels.tolist(), positions.tolist()):
            outs.append(deconv.attribute(images[r:r + 1], neuron_selector=(c, y, x)))
    return torch.cat(outs)


def run(device: torch.device, layers: List[str], chunk: int) -> Tuple[List[Dict[str, object]], str]:
    images, source = load_images(IMAGES)
    dn = Deconvnet(models.zfnet(seed=0).eval().to(device))
    with torch.no_grad():
        rec = dn.record(images.to(device))
    results, rows_out = [], []
    for layer in layers:
        rows, channels, positions = figure2_selections(rec.activations[layer], MAPS, TOP)
        sub = f"ZFNet {layer}: {rows.shape[0]} single activations from {IMAGES} images [{device.type}]"
        with torch.no_grad():
            ours_out = dn.project(rec, layer, rows, channels, positions, chunk_size=chunk)
            ref_out = plain_deconvnet(dn, rec, layer, rows, channels, positions, chunk)
        error = float((ours_out - ref_out).norm() / ref_out.norm().clamp_min(1e-30))
        timers = {
            "reference": lambda: plain_deconvnet(dn, rec, layer, rows, channels, positions, chunk),
            "zfkernels": lambda: dn.project(rec, layer, rows, channels, positions, chunk_size=chunk),
        }
        measured = {}
        for description, fn in timers.items():
            t = benchmark.Timer("with torch.no_grad(): fn()", globals={"fn": fn, "torch": torch},
                                label="Deconvnet.project (Figure 2 workload)", sub_label=sub, description=description,
                                num_threads=torch.get_num_threads())
            measured[description] = t.blocked_autorange(min_run_time=2.0)
            results.append(measured[description])
        row = dict(layer=layer, selections=int(rows.shape[0]), device=device.type,
                   reference_ms=measured["reference"].median * 1e3, zfkernels_ms=measured["zfkernels"].median * 1e3,
                   speedup=measured["reference"].median / measured["zfkernels"].median, relative_error=error)
        rows_out.append(row)
        print(f"{layer}: reference {row['reference_ms']:9.1f} ms  zfkernels {row['zfkernels_ms']:8.1f} ms  "
              f"x{row['speedup']:.2f}  (rel. difference {error:.1e})", flush=True)
    benchmark.Compare(results).print()
    return rows_out, source


FAMILIES = [
    # builder, layer, feature maps, images, top per map
    ("resnet50", "layer2", 16, 9, 9),
    ("vgg16_bn", "features.42", 64, 16, 9),
]


# Issue #18's networks: builder, layer (a module path: its last node), feature maps, images, top
# per map, how the node's output addresses a map (tests/_oracle.py's layouts).
RULE_FAMILIES = [
    ("efficientnet_b0", "features.4", 16, 9, 9, "NCHW"),
    ("convnext_tiny", "features.3", 16, 9, 9, "NCHW"),
    ("vit_b_16", "encoder.layers.encoder_layer_5", 16, 9, 9, "tokens"),
]


def _oracle_module():
    """``tests/_oracle.py`` (the test suite's autograd oracle), imported from the repository's
    ``tests/`` directory."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import _oracle

    return _oracle


def last_node(model: torch.nn.Module, module_path: str) -> str:
    """The last feature-extraction node (torchvision's eval-mode node names) inside the module
    ``module_path``: the module's output, as ``Deconvnet.resolve`` gives it."""
    from torchvision.models.feature_extraction import get_graph_node_names

    was = model.training
    try:
        nodes = get_graph_node_names(model.eval())[1]
    finally:
        model.train(was)
    inside = [name for name in nodes if name == module_path or name.startswith(module_path + ".")]
    if not inside:
        raise ValueError(f"no node inside {module_path!r}")
    return inside[-1]


class RulesAutogradDeconvnet(AutogradDeconvnet):
    """The batched autograd deconvnet with issue #18's rules, as the test oracle applies them
    (``tests/_oracle.py``: its rules, module swaps and graph rewrites, and its patches of
    ``torch.nn.functional`` while it runs), in one pass: built once (a copy of torchvision's
    feature extractor up to ``node``, rules applied), then per chunk of selections ONE forward of
    the chunk's images in their own dtype and ONE backward of the seeds. The oracle's taping first
    pass (masks, argmaxes, Hardswish pieces recorded in the model's dtype, replayed in float64) is
    left out: in the same dtype the one pass computes the same masks. In deconvnet mode the
    activations' factors g(x), which only guided mode uses, are not computed."""

    def __init__(self, model: torch.nn.Module, node: str, layout: str, mode: str = "deconvnet") -> None:
        import copy

        from torchvision.models.feature_extraction import create_feature_extractor

        oracle = _oracle_module()

        class OnePassRules(oracle._Rules):
            @property
            def _rules_apply(self) -> bool:
                return self.state["mode"] != "backprop"

            def _region(self, x, region):
                return None if self.state["mode"] == "deconvnet" else region(x.detach())

            def _activate(self, x, value, gain):
                if not self._rules_apply:
                    return value(x)
                mode = self.state["mode"]
                return oracle._Rectify.apply(x, value, x.new_empty(0) if mode == "deconvnet" else gain(x.detach()), mode)

            def _rectify(self, x, top):
                mode = self.state["mode"]
                mask = x.new_empty(0) if mode == "deconvnet" else (x > 0) & (x < top)  # (clamp(x, 0, top) > 0) & (< top)
                return oracle._Rectify.apply(x, lambda t: t.clamp(0, top), mask, mode)

        class MaxPool(torch.nn.Module):  # autograd's own max-pool backward: the adjoint with this pass's argmaxes
            def __init__(self, args) -> None:
                super().__init__()
                self.args = args

            def forward(self, x):
                return F.max_pool2d(x, *self.args)

        tape = oracle._Tape()
        tape.capture = False  # (never read: no rule here takes from the tape)
        self.oracle, self.layout, self.node = oracle, layout, node
        self.rules = OnePassRules(tape, {"mode": mode})
        was = model.training
        try:
            extractor = copy.deepcopy(create_feature_extractor(model.eval(), return_nodes={node: "out"})).eval()
        finally:
            model.train(was)
        oracle._swap_modules(extractor, self.rules)
        oracle._swap_functions(extractor, self.rules)
        for module in list(extractor.modules()):
            for key, child in list(module.named_children()):
                if isinstance(child, oracle._RoutedMaxPool):
                    setattr(module, key, MaxPool(child.args))
        extractor.requires_grad_(False)  # (a copy) the image's gradient only: no weight keeps its input for a weight gradient
        self.extractor = extractor.eval()

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.oracle.present(self.extractor(x)["out"], self.layout)

    def rules_applied(self) -> contextlib.AbstractContextManager:
        return self.oracle._patched(self.rules)


def _randomise_layer_scales(model: torch.nn.Module, seed: int = 0) -> None:
    """ConvNeXt's layer scales drawn from U(0.2, 1) (seeded). torchvision initialises them at
    1e-6: the residual branches then add float32 denormals to the stream, which slow every
    kernel that meets them ~10x on a CPU (both sides of the benchmark) and which trained weights
    (layer scales ~0.1-1) never produce."""
    from torchvision.models.convnext import CNBlock

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CNBlock):
                module.layer_scale.copy_(torch.empty(module.layer_scale.shape).uniform_(0.2, 1.0, generator=generator))


def run_rule_family(device: torch.device, size: int, chunk: int, reference_chunk: int, min_run_time: float,
                    arch: str, layer: str, maps: int, count: int, top: int, layout: str, reference_only: bool,
                    check_oracle: bool) -> Tuple[List[benchmark.Measurement], Dict[str, object], str]:
    """One of issue #18's rows: the rules' autograd deconvnet against ``Deconvnet``."""
    import torchvision

    images, source = load_images(count)
    if size != 224:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    images = images.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(weights=None).eval()
    if arch.startswith("convnext"):
        _randomise_layer_scales(model, seed=0)
    model = model.to(device)
    node = last_node(model, layer)
    oracle = _oracle_module()
    with torch.no_grad():
        act = oracle.presented_output(model, images, node, layout)
    rows, channels, positions = top_selections(act, maps, top)
    del act
    reference_fn = RulesAutogradDeconvnet(model, node, layout)

    def plain() -> torch.Tensor:
        return reference_fn(images, rows, channels, positions, reference_chunk)

    sub = f"{arch} {layer}: {rows.shape[0]} projections, {count} images {size}x{size} [{device.type}]"
    label = "pass 2 projections (issue #18: every torchvision classifier)"
    row: Dict[str, object] = dict(model=arch, layer=layer, node=node, projections=int(rows.shape[0]), images=count,
                                  size=size, device=device.type, chunk_size=chunk,
                                  reference_chunk_size=reference_chunk,
                                  reference="batched autograd deconvnet with the oracle's rules (one pass)")
    if check_oracle:  # the one-pass reference against GraphOracle (two passes) in float32, on 4 selections
        one_pass = reference_fn(images, rows[:4], channels[:4], positions[:4], 4)
        graph = oracle.graph_oracle(model, images, node, rows[:4], channels[:4], positions[:4], layout=layout,
                                    dtype=torch.float32)
        row["reference_vs_graph_oracle"] = _difference(one_pass, graph)
        print(f"{arch} {layer}: one-pass reference vs GraphOracle (float32, 4 selections): rel. difference "
              f"{row['reference_vs_graph_oracle']:.1e}", flush=True)
    measured: Dict[str, benchmark.Measurement] = {}
    ref_out, measured["autograd deconvnet (rules)"] = _time(plain, label, sub, "autograd deconvnet (rules)",
                                                           min_run_time, device, warmup=True)
    row["reference_ms"] = measured["autograd deconvnet (rules)"].median * 1e3
    if not reference_only:
        dn = Deconvnet(model)
        resolved = dn.resolve(layer)
        if resolved != node:
            print(f"warning: Deconvnet.resolve({layer!r}) = {resolved!r}, torchvision's last node inside it is "
                  f"{node!r}; both sides use their own", flush=True)

        def ours() -> torch.Tensor:
            recording = dn.record(images, [layer])
            return dn.project(recording, layer, rows, channels, positions, chunk_size=chunk)

        ours_out, measured["zfkernels"] = _time(ours, label, sub, "zfkernels", min_run_time, device, warmup=True)
        row.update(zfkernels_ms=measured["zfkernels"].median * 1e3,
                   speedup=measured["autograd deconvnet (rules)"].median / measured["zfkernels"].median,
                   relative_error=_difference(ours_out, ref_out))
        print(f"{arch} {layer}: autograd (rules) {row['reference_ms']:9.1f} ms  zfkernels {row['zfkernels_ms']:8.1f} ms"
              f"  x{row['speedup']:.2f}  (rel. difference {row['relative_error']:.1e})", flush=True)
    else:
        print(f"{arch} {layer}: autograd (rules) {row['reference_ms']:9.1f} ms (reference only)", flush=True)
    return list(measured.values()), row, source


def top_selections(act: torch.Tensor, maps: int, top: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 1's kind of selections: for the first ``maps`` feature maps, the ``top`` images with
    the strongest activation, each at its argmax."""
    return figure2_selections(act, maps, top)


def _time(fn, label: str, sub: str, description: str, min_run_time: float,
          device: torch.device, warmup: bool = False) -> Tuple[torch.Tensor, benchmark.Measurement]:
    """``fn``'s output and its time. A call longer than ``min_run_time`` (the autograd deconvnet
    and Captum at 224x224 on a CPU take minutes) is measured once, that first call itself;
    shorter ones by ``blocked_autorange`` after it. With ``warmup``, ``fn`` is first called once
    untimed (its output is the one returned) and the calls measured come after it."""
    stmt = "with torch.no_grad(): fn()"
    timer = benchmark.Timer(stmt, globals={"fn": fn, "torch": torch}, label=label,
                            sub_label=sub, description=description, num_threads=torch.get_num_threads())
    if warmup:
        with torch.no_grad():
            first = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return first, _time(fn, label, sub, description, min_run_time, device)[1]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    with torch.no_grad():
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    if seconds < min_run_time:
        return out, timer.blocked_autorange(min_run_time=min_run_time)
    spec = TaskSpec(stmt, "pass", label=label, sub_label=sub, description=description,
                    num_threads=torch.get_num_threads())
    return out, benchmark.Measurement(number_per_run=1, raw_times=[seconds], task_spec=spec)


def _difference(ours: torch.Tensor, other: torch.Tensor) -> float:
    return float((ours - other).norm() / other.norm().clamp_min(1e-30))


def run_families(device: torch.device, size: int, chunk: int, reference_chunk: int, captum: bool,
                 min_run_time: float, archs: List[str], reference_only: bool = False,
                 check_oracle: bool = False) -> Tuple[List[Dict[str, object]], str]:
    import torchvision

    results, rows_out = [], []
    source = ""
    for arch, layer, maps, count, top, layout in RULE_FAMILIES:
        if arch not in archs:
            continue
        measured, row, source = run_rule_family(device, size, chunk, reference_chunk, min_run_time, arch, layer, maps,
                                                count, top, layout, reference_only, check_oracle)
        results.extend(measured)
        rows_out.append(row)
        if captum:
            print(f"{arch}: Captum's NeuronDeconvolution replaces the backward of nn.ReLU only: no column", flush=True)
    if reference_only:
        archs = []  # (the ReLU rows have no reference-only form)
    for arch, layer, maps, count, top in FAMILIES:
        if arch not in archs:
            continue
        images, source = load_images(count)
        if size != 224:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images = images.to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = getattr(torchvision.models, arch)(weights=None).eval().to(device)
        dn = Deconvnet(model)
        with torch.no_grad():
            rec = dn.record(images, [layer])
        node = dn.resolve(layer)
        rows, channels, positions = top_selections(rec.activations[node], maps, top)
        reference_fn = AutogradDeconvnet(model, node)

        def ours() -> torch.Tensor:
            recording = dn.record(images, [layer])
            return dn.project(recording, layer, rows, channels, positions, chunk_size=chunk)

        def plain() -> torch.Tensor:
            return reference_fn(images, rows, channels, positions, reference_chunk)

        sub = f"{arch} {layer}: {rows.shape[0]} projections, {count} images {size}x{size} [{device.type}]"
        label = "pass 2 projections (any ReLU CNN)"
        measured = {}
        ref_out, measured["autograd deconvnet"] = _time(plain, label, sub, "autograd deconvnet", min_run_time, device)
        ours_out, measured["zfkernels"] = _time(ours, label, sub, "zfkernels", min_run_time, device)
        error = _difference(ours_out, ref_out)
        row = dict(model=arch, layer=layer, projections=int(rows.shape[0]), images=count, size=size, device=device.type,
                   chunk_size=chunk, reference_chunk_size=reference_chunk,
                   reference="plain batched autograd deconvnet", reference_ms=measured["autograd deconvnet"].median * 1e3,
                   zfkernels_ms=measured["zfkernels"].median * 1e3,
                   speedup=measured["autograd deconvnet"].median / measured["zfkernels"].median, relative_error=error)
        if captum:
            # The layer as a module path (ResNet's stage, VGG's ReLU module): Captum hooks its output.
            module = model.get_submodule(layer)
            if importlib.util.find_spec("captum") is None:
                print("captum is not installed: its column is left out", flush=True)
            else:
                captum_fn = lambda: captum_deconvolution(model, module, images, rows, channels, positions)  # noqa: E731
                captum_out, measured["captum"] = _time(captum_fn, label, sub, "Captum NeuronDeconvolution",
                                                       min_run_time, device)
                row["captum_ms"] = measured["captum"].median * 1e3
                row["speedup_vs_captum"] = measured["captum"].median / measured["zfkernels"].median
                # Captum seeds the neuron with 1, we (and the paper) with its activation.
                seeds = rec.activations[node][rows, channels, positions[:, 0], positions[:, 1]]
                row["captum_relative_error"] = _difference(ours_out, captum_out * seeds.view(-1, 1, 1, 1))
        results.extend(measured.values())
        rows_out.append(row)
        captum_text = f"  Captum {row['captum_ms']:9.1f} ms x{row['speedup_vs_captum']:.1f}" if "captum_ms" in row else ""
        print(f"{arch} {layer}: autograd {row['reference_ms']:9.1f} ms  zfkernels {row['zfkernels_ms']:8.1f} ms  "
              f"x{row['speedup']:.2f}  (rel. difference {error:.1e}){captum_text}", flush=True)
    benchmark.Compare(results).print()
    return rows_out, source


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if zfkernels.has_cuda() else "cpu")
    parser.add_argument("--suite", choices=["figure2", "families"], default="figure2")
    parser.add_argument("--layers", nargs="+", default=["conv1", "conv2", "conv3", "conv4", "conv5"],
                        help="figure2: ZFNet's layers")
    parser.add_argument("--size", type=int, default=224, help="families: image side (smaller on a CPU)")
    parser.add_argument("--models", nargs="+", choices=[f[0] for f in FAMILIES + RULE_FAMILIES],
                        default=[f[0] for f in FAMILIES + RULE_FAMILIES],
                        help="families: which networks (default: all five; the ReLU ones are resnet50 and vgg16_bn)")
    parser.add_argument("--reference-only", action="store_true",
                        help="families: time only the reference of issue #18's networks (no engine needed)")
    parser.add_argument("--check-oracle", action="store_true",
                        help="families: check issue #18's one-pass reference against tests/_oracle.GraphOracle "
                             "(float32) on 4 selections")
    parser.add_argument("--captum", action="store_true", help="families: also Captum's NeuronDeconvolution per neuron")
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="selections per batch (figure2: both sides, default 192; families: ours, default 64)")
    parser.add_argument("--reference-chunk-size", type=int, default=16,
                        help="families: the autograd deconvnet's selections per backward (it keeps every activation "
                             "of the chunk's images: VGG16-BN at 224x224 needs ~160 MB per selection)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/bench_deconvnet.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not zfkernels.has_cuda():
            sys.exit("bench_deconvnet: --device cuda, but no GPU is visible or the CUDA kernels were not compiled")
        torch.backends.cudnn.allow_tf32 = False
    if args.suite == "families":
        rows, source = run_families(device, args.size, args.chunk_size or 64, args.reference_chunk_size, args.captum,
                                    args.min_run_time, args.models, args.reference_only, args.check_oracle)
    else:
        rows, source = run(device, args.layers, args.chunk_size or 192)
    write_results(args.json, rows, device.type == "cuda", argv, images=source)


if __name__ == "__main__":
    main()
