"""The ImageNet class list shipped with the diagnostics: 1000 sorted synsets whose index is the
class index, agreeing with torchvision's class names on every sample photograph."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zfkernels.errors import UsageError
from zfkernels.diagnostics import common

from _images import IMAGENET, IMAGENET_NAMES, imagenet_folder_present

ROOT = Path(__file__).resolve().parents[1]


def test_synset_list_is_the_sorted_1000_classes():
    synsets = common.imagenet_synsets()
    assert len(synsets) == 1000
    assert len(set(synsets)) == 1000
    assert list(synsets) == sorted(synsets)
    assert all(re.fullmatch(r"n\d{8}", s) for s in synsets)
    assert synsets[0] == "n01440764"  # class 0 is the tench
    assert len(common.class_names()) == 1000
    assert common.class_name(0) == "tench"


def test_synset_list_is_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # Every sub-package (each folder with an __init__.py) is found by the packaging rule.
    packaged = set(find_packages(str(ROOT), include=config["packages"]["find"]["include"]))
    subpackages = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "zfkernels").rglob("__init__.py")}
    assert "zfkernels.diagnostics" in subpackages and subpackages <= packaged
    assert "imagenet_synsets.txt" in config["package-data"]["zfkernels.diagnostics"]
    assert (ROOT / "zfkernels" / "diagnostics" / "imagenet_synsets.txt").is_file()


# File names of ImageNet photographs, "<synset>_<class name>", checked always; the 800 of the
# ImageNet sample folder (800 classes) where it is present.
NAMED = [Path(name) for name in IMAGENET_NAMES + ["n02085620_Chihuahua.JPEG", "n02085782_Japanese_spaniel.JPEG",
                                                 "n01532829_house_finch.JPEG", "n15075141_toilet_tissue.JPEG"]]
SOURCES = {"named": lambda: NAMED}
if imagenet_folder_present():
    SOURCES["imagenet-sample"] = lambda: sorted(p for p in IMAGENET.iterdir() if p.suffix == ".JPEG")


@pytest.mark.parametrize("source", list(SOURCES))
def test_every_sample_synset_is_listed_and_named_as_torchvision_names_it(source):
    synsets = common.imagenet_synsets()
    names = common.class_names()
    files = SOURCES[source]()
    assert len(files) == {"named": len(NAMED), "imagenet-sample": 800}[source]
    mismatches = []
    for path in files:
        wnid, _, name = path.stem.partition("_")
        assert wnid in synsets, path.name
        assert common.synset_of(path) == wnid
        index = synsets.index(wnid)
        if names[index].lower() != name.replace("_", " ").lower():
            mismatches.append((path.name, names[index]))
    assert mismatches == []


def test_labels_from_names_folders_and_overrides(tmp_path):
    assert common.synset_of(Path("val/n01443537/ILSVRC2012_val_00000001.JPEG")) == "n01443537"
    assert common.synset_of(Path("n01443537_10007.JPEG")) == "n01443537"
    assert common.synset_of(Path("photo.jpg")) is None
    assert common.true_classes([Path("a/n01443537_goldfish.JPEG")], None) == [1]
    assert common.true_classes([Path("x.jpg"), Path("y.jpg")], ["n01443537"]) == [1, 1]
    assert common.true_classes([Path("x.jpg"), Path("y.jpg")], ["5", "n01440764"]) == [5, 0]
    assert common.parse_label("281") == 281


@pytest.mark.parametrize("labels, message", [
    (["1000"], "out of range"),
    (["n99999999"], "neither a class index"),
    (["cat"], "neither a class index"),
    (["1", "2", "3"], "one label for all images or one per image"),
])
def test_bad_labels(labels, message):
    with pytest.raises(UsageError, match=message):
        common.true_classes([Path("x.jpg"), Path("y.jpg")], labels)


def test_a_file_without_synset_needs_a_label():
    with pytest.raises(UsageError, match="photo.jpg: no ImageNet synset.*--label"):
        common.true_classes([Path("photo.jpg")], None)
    with pytest.raises(UsageError, match="not one of the 1000 ImageNet classes"):
        common.true_classes([Path("n00000001_thing.jpg")], None)
