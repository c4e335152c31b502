"""The forward walker frees every map it computed once the walk is over, without waiting for
Python's cyclic garbage collector (which tensors, being few Python objects, rarely trigger):
pass 1's memory must not grow with the dataset."""

import gc
import weakref

import pytest
import torch
import torchvision

from zfkernels import Deconvnet, models
from zfkernels.engine import graph_of, walk


@pytest.fixture
def no_cyclic_gc():
    """Run the test with the cyclic collector off, so only reference counting frees memory."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()


def _tracked_walk(model: torch.nn.Module, layers, x: torch.Tensor, stop_after: int = None):
    """Walk ``model`` to ``layers`` and return weak references to every yielded map, after the
    caller's own references are gone."""
    graph = graph_of(model)
    wanted = [graph.resolve(name) for name in layers]
    refs = []
    with torch.inference_mode():
        walker = walk(graph, x, wanted)
        for count, (_, value) in enumerate(walker, 1):
            refs.append(weakref.ref(value))
            del value
            if stop_after is not None and count == stop_after:
                walker.close()  # a caller that stops early
                break
        del walker
    return refs


@pytest.mark.parametrize("arch,layers", [
    ("zfnet", ["conv1", "conv3", "conv5"]),
    ("resnet18", ["layer1", "layer2.0.relu_1"]),  # residual adds, a ReLU module called twice
])
def test_walk_leaves_nothing_alive(no_cyclic_gc, arch, layers):
    model = models.zfnet(seed=0) if arch == "zfnet" else torchvision.models.resnet18()
    model.eval()
    x = torch.randn(2, 3, 96, 96)
    refs = _tracked_walk(model, layers, x)
    assert len(refs) == len(layers)
    assert [r() is None for r in refs] == [True] * len(refs)


def test_walk_closed_early_leaves_nothing_alive(no_cyclic_gc):
    model = models.zfnet(seed=0).eval()
    refs = _tracked_walk(model, ["conv1", "conv2", "conv5"], torch.randn(1, 3, 96, 96), stop_after=1)
    assert len(refs) == 1 and refs[0]() is None


def test_recording_is_freed_with_its_last_reference(no_cyclic_gc):
    """A recording (activations, switches, the tape) lives exactly as long as its holder keeps it."""
    model = torchvision.models.shufflenet_v2_x0_5().eval()  # channel shuffle: index maps in the tape
    dn = Deconvnet(model)
    with torch.inference_mode():
        rec = dn.record(torch.randn(2, 3, 64, 64), ["stage2"])
    tensors = [weakref.ref(t) for t in rec.switches.values()] + [weakref.ref(t) for t in rec.activations.values()]
    assert tensors
    del rec
    assert [r() is None for r in tensors] == [True] * len(tensors)
