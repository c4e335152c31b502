"""graph_of caches one traced graph per model without keeping the model alive: a job that
loads many models (zfk evolution over every epoch's checkpoint) must not hold them all."""

from __future__ import annotations

import gc
import weakref

import torch
import torchvision

from zfkernels import Deconvnet, models
from zfkernels.engine import graph_of


def test_a_traced_model_is_freed_with_its_last_reference():
    model = torchvision.models.resnet18(weights=None).eval()
    graph = graph_of(model)
    assert graph_of(model) is graph  # traced once per model object
    alive = weakref.ref(model)
    del model, graph
    gc.collect()
    assert alive() is None


def test_a_zoo_model_with_a_recording_is_freed_too():
    model = models.zfnet(seed=0).eval()
    dn = Deconvnet(model)
    rec = dn.record(torch.randn(1, 3, 224, 224))
    assert rec.activations["conv5"].shape[1] == 256
    alive = weakref.ref(model)
    del model, dn, rec
    gc.collect()
    assert alive() is None
