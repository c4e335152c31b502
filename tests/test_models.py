"""The model zoo: ZFNet's sizes are the paper's Figure 3; AlexNet and VGG16 load torchvision
state dicts and give torchvision's logits; weights files are checked key by key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from zfkernels import models


def test_zfnet_feature_map_sizes_are_figure_3():
    model = models.zfnet(seed=0).eval()
    x = torch.randn(2, 3, 224, 224)
    sizes = []
    with torch.no_grad():
        for module in model.features:
            x = module(x)
            if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
                sizes.append((type(module).__name__, x.shape[1], x.shape[2], x.shape[3]))
    assert sizes == [
        ("Conv2d", 96, 110, 110),
        ("MaxPool2d", 96, 55, 55),
        ("Conv2d", 256, 26, 26),
        ("MaxPool2d", 256, 13, 13),
        ("Conv2d", 384, 13, 13),
        ("Conv2d", 384, 13, 13),
        ("Conv2d", 256, 13, 13),
        ("MaxPool2d", 256, 6, 6),
    ]
    logits = model(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 1000)
    assert models.zfnet(num_classes=10, seed=0)(torch.randn(1, 3, 224, 224)).shape == (1, 10)
    fc = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in fc] == [(9216, 4096), (4096, 4096), (4096, 1000)]
    assert [m.p for m in model.classifier if isinstance(m, nn.Dropout)] == [0.5, 0.5]


@pytest.mark.parametrize("arch", ["alexnet", "vgg16"])
def test_torchvision_state_dict_gives_torchvision_logits(arch, tmp_path):
    torch.manual_seed(1)
    theirs = getattr(torchvision.models, arch)(weights=None).eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(theirs.state_dict(), path)
    ours = getattr(models, arch)(weights=path).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    assert isinstance(ours.features, nn.Sequential) and isinstance(ours.classifier, nn.Sequential)


def test_seeded_construction_is_deterministic_and_leaves_the_rng_alone():
    state = torch.random.get_rng_state()
    a, b = models.zfnet(seed=3), models.zfnet(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not torch.equal(a.features[0].weight, models.zfnet(seed=4).features[0].weight)


def test_models_move_to_any_dtype():
    model = models.alexnet(seed=0).to(torch.bfloat16).eval()
    assert model(torch.randn(1, 3, 224, 224, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module."])
def test_checkpoint_wrappers_load(tmp_path, wrapper):
    source = models.zfnet(seed=5)
    state = source.state_dict()
    if wrapper == "module.":
        payload = {f"module.{k}": v for k, v in state.items()}
    else:
        payload = {wrapper: state, "epoch": 3}
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    loaded = models.zfnet(weights=path)
    assert torch.equal(loaded.features[0].weight, source.features[0].weight)


def test_weights_of_another_architecture_name_the_keys(tmp_path):
    path = tmp_path / "alexnet.pth"
    torch.save(models.alexnet(seed=0).state_dict(), path)
    with pytest.raises(ValueError, match=r"zfnet: weights .* do not fit.*mis-shaped: .*features.0.weight \(file \(64, 3, 11, 11\), model \(96, 3, 7, 7\)\)"):
        models.zfnet(weights=path)
    state = models.zfnet(seed=0).state_dict()
    del state["classifier.6.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing: classifier.6.bias; unexpected: extra.weight"):
        models.zfnet(weights=path)


def test_unsafe_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": models.zfnet(seed=0).state_dict(), "cls": nn.ReLU}, path)
    with pytest.raises(ValueError, match=r"cannot load weights from .*evil.pth: it holds more than tensors, which weights_only=True refuses \(.*Unsupported global"):
        models.zfnet(weights=path)


def test_folders_and_garbage_are_named_as_such(tmp_path):
    with pytest.raises(ValueError, match=r"zfnet: weights .* is a folder, not a weights file"):
        models.zfnet(weights=tmp_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"these are not weights")
    with pytest.raises(ValueError, match=r"cannot load weights from .*garbage.pth: not a PyTorch weights file"):
        models.zfnet(weights=garbage)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("keep", [0.5, 100], ids=["half", "100-bytes"])
def test_a_truncated_file_is_called_truncated(tmp_path, legacy, keep):
    # What an interrupted download or save leaves: the start of a real torch.save file.
    whole = tmp_path / "whole.pth"
    torch.save(models.zfnet(seed=0).state_dict(), whole, _use_new_zipfile_serialization=not legacy)
    data = whole.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(ValueError, match=r"cannot load weights from .*cut.pth: the file is truncated or corrupt") as error:
        models.zfnet(weights=cut)
    assert "not a PyTorch weights file" not in str(error.value)


def test_an_empty_file_is_called_empty(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot load weights from .*empty.pth: the file is empty"):
        models.zfnet(weights=empty)


def test_a_named_pipe_is_refused_without_being_opened(tmp_path):
    # Opening a FIFO for reading waits for a writer: the check must come from its status alone
    # (this test would hang, not fail, if the file were opened).
    pipe = tmp_path / "weights.pth"
    os.mkfifo(pipe)
    with pytest.raises(ValueError, match=r"zfnet: weights .*weights.pth is not a regular file \(a named pipe"):
        models.zfnet(weights=pipe)


def test_missing_files_and_torchvision_cache(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        models.zfnet(weights=tmp_path / "nope.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"nothing is downloaded.*alexnet-owt-7be5be79.pth"):
        models.alexnet(weights="torchvision")
    cached = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    cached.parent.mkdir(parents=True)
    torch.save(models.vgg16(seed=2).state_dict(), cached)
    assert torch.equal(models.vgg16(weights="torchvision").features[0].weight, models.vgg16(seed=2).features[0].weight)
    with pytest.raises(ValueError, match=r"torchvision has no ZFNet weights"):
        models.zfnet(weights="torchvision")


def test_build_by_name():
    assert isinstance(models.build("zfnet", seed=0), models.ZFNet)
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet'"):
        models.build("resnet")


def test_torchvision_file_names_come_from_each_builders_default_weights():
    # The zoo's two files as before; every torchvision builder has one; ZFNet none.
    assert models.TORCHVISION_FILES["alexnet"] == "alexnet-owt-7be5be79.pth"
    assert models.TORCHVISION_FILES["vgg16"] == "vgg16-397923af.pth"
    assert models.TORCHVISION_FILES["resnet50"] == "resnet50-11ad3fa6.pth"  # IMAGENET1K_V2, the default
    assert models.TORCHVISION_FILES["inception_v3"] == "inception_v3_google-0cc3c7bd.pth"
    assert "zfnet" not in models.TORCHVISION_FILES and "resnet50" in models.TORCHVISION_FILES
    assert len(models.TORCHVISION_FILES) == len(torchvision.models.list_models(module=torchvision.models))
    assert models.torchvision_weights_path("resnet50") == Path(torch.hub.get_dir()) / "checkpoints" / "resnet50-11ad3fa6.pth"
