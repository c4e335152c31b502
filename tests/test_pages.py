"""The pages' templates (``zfkernels.job.pages``): autoescaping, undefined names refused, file
names that are not UTF-8, URLs of hostile file names, the templates shipped as package data; and
non-finite activations (NaN, +inf) kept apart from pass 1 to ``topk.json`` and the layer page."""

from __future__ import annotations

import fnmatch
import json
import math
import sys
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path
from typing import List, Tuple

import jinja2
import pytest
import torch
import torch.nn as nn
from PIL import Image

from zfkernels.diagnostics.common import top_projections
from zfkernels.job import data as data_mod
from zfkernels.job import gallery, pages

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "zfkernels" / "templates"
HOSTILE = '<script>alert(1)</script>&"\'#?%20 é.png'


class Entries(HTMLParser):
    """A layer page's entries: ``(value, file name)`` of every ``<li>``, in order, per section id."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: dict = {}
        self._section, self._span, self._item = None, None, None
        self.feed(source)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = self.sections.setdefault(attrs["id"], [])
        elif tag == "li" and self._section is not None:
            self._item = {"v": "", "f": ""}
            self._section.append(self._item)
        elif tag == "span":
            self._span = attrs.get("class")

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._item is not None and self._span in ("v", "f"):
            self._item[self._span] += data

    def of(self, section: str) -> List[Tuple[str, str]]:
        return [(item["v"], item["f"]) for item in self.sections[section]]


# -- the templates -----------------------------------------------------------------------------------


def test_a_hostile_name_is_text_in_an_attribute_and_in_the_body():
    page = pages.render("diagnostics.html", title=HOSTILE, gallery=False,
                        pages=[{"name": HOSTILE, "title": HOSTILE, "page": HOSTILE + "/index.html"}])
    assert "<script" not in page

    class Read(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.tags, self.text = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))

        def handle_data(self, data):
            self.text.append(data)

    read = Read()
    read.feed(page)
    assert [tag for tag, _ in read.tags] == ["html", "head", "meta", "title", "style", "body", "h1", "ul", "li", "a",
                                             "code"]
    href = read.tags[-2][1]["href"]
    # The URL is percent-encoded (no '#', '?' or '%' left to cut it short) and names the file.
    assert not set("#?\"'<> ") & set(href)
    assert urllib.parse.unquote(href) == HOSTILE + "/index.html"
    assert read.text.count(HOSTILE) == 2  # the <title> and the link
    assert f"zfk {HOSTILE}" in "".join(read.text)


def test_bytes_that_are_not_utf8_are_shown_as_replacement_characters_and_linked_as_they_are():
    name = b"caf\xe9 \xff.png".decode("utf-8", "surrogateescape")
    page = pages.render("diagnostics.html", title=name, gallery=False, pages=[{"name": "x", "title": name, "page": name}])
    page.encode("utf-8")  # (would raise on a lone surrogate)
    assert page.count("caf\ufffd \ufffd.png") == 2
    assert 'href="caf%E9%20%FF.png"' in page  # the file's own bytes, which a browser opens from disk


def test_a_lone_surrogate_from_elsewhere_is_shown_as_a_replacement_character():
    page = pages.render("diagnostics.html", title=json.loads('"part \\ud800"'), gallery=False, pages=[])
    assert "<title>part \ufffd" in page.encode("utf-8").decode("utf-8")


def test_an_undefined_name_is_an_error_not_an_empty_string():
    with pytest.raises(jinja2.UndefinedError, match="gallery"):
        pages.render("diagnostics.html", title="t", pages=[])


@pytest.mark.parametrize("value, shown", [(1.23456, "1.235"), (0.0, "0"), (-2.5e-7, "-2.5e-07"), (math.nan, "NaN"),
                                          (math.inf, "+inf"), (-math.inf, "-inf")])
def test_number_shows_what_the_value_is(value, shown):
    assert pages.number(value) == shown


def test_the_package_data_patterns_ship_every_template():
    """What setuptools puts in a wheel: ``[tool.setuptools.package-data]``'s patterns, relative to
    the package folder. Every template must match one (a page rendered from an installed wheel
    would otherwise fail)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    config = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["zfkernels"]
    templates = sorted(p.relative_to(REPO / "zfkernels").as_posix() for p in TEMPLATES.iterdir())
    assert "templates/base.html" in templates and len(templates) >= 10
    for name in templates:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
    # And every template the code names exists.
    for name in ("index.html", "layer.html", "diagnostics.html", "occlusion.html", "correspondence.html",
                 "invariance.html", "evolution.html", "filters.html"):
        assert (TEMPLATES / name).is_file(), name


# -- NaN and infinity, from pass 1 to the page -------------------------------------------------------


def test_topk_document_writes_nan_and_infinities_distinctly():
    from zfkernels.job.topk import LayerTop

    top = LayerTop.empty(torch.tensor([4]), 5, (2, 5), torch.device("cpu"))
    top.merge(torch.tensor([[2.5, math.nan, math.inf, -math.inf, 1.0]]), torch.tensor([[1, 0, 3, 2, 4]]),
              torch.tensor([[7, 3, 0, 9, 5]]))
    document = gallery.topk_document("zfnet", None, {}, {"conv9": top}, ["a.png", "b.png", "c.png", "d.png", "e.png"],
                                     lambda layer, y, x: (x, y, x + 1, y + 1))
    # Ranked +inf, 2.5, 1.0, then NaN and -inf tied (NaN ranks as -inf): the earlier image first.
    assert [(e["image"], e["value"], e["y"], e["x"]) for e in document["layers"]["conv9"][0]["top"]] == [
        ("d.png", "Infinity", 0, 0), ("b.png", 2.5, 1, 2), ("e.png", 1.0, 1, 0), ("a.png", "NaN", 0, 3),
        ("c.png", "-Infinity", 1, 4)]
    text = json.dumps(document, allow_nan=False)  # strict JSON: no bare NaN token
    values = [e["value"] for e in json.loads(text)["layers"]["conv9"][0]["top"]]
    assert [float(v) for v in values][:3] == [math.inf, 2.5, 1.0]  # float() reads the strings back
    assert math.isnan(float(values[3])) and float(values[4]) == -math.inf


class Overflowing(nn.Module):
    """A 1x1 conv whose feature map 0 is inf·R + inf·G (R, G the normalised red and green): +inf
    where both are positive, NaN where their signs differ (inf - inf), 0 after the ReLU where both
    are negative. Feature map 1 is the blue channel."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.MaxPool2d(2))
        with torch.no_grad():
            conv = self.features[0]
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[0, 0] = conv.weight[0, 1] = math.inf
            conv.weight[1, 2] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def test_nan_and_inf_activations_reach_topk_json_and_the_page_as_they_are(tmp_path):
    # Solid colours: normalised R and G are both negative for 0 and both positive for 255.
    colours = {"a_black.png": (0, 0, 0), "b_red.png": (255, 0, 0), "c_white.png": (255, 255, 255),
               "d_green.png": (0, 255, 0)}
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    for name, colour in colours.items():
        Image.new("RGB", (40, 40), colour).save(data / name)
    images = data_mod.discover(data)
    scan, projected = top_projections(Overflowing().eval(), images, {"conv1": torch.tensor([0, 1])}, 4,
                                      torch.device("cpu"), batch_size=2)
    top = scan.layers["conv1"]
    # Pass 1's ranking: white +inf, black 0, then red and green NaN (ranked as -inf, by file order).
    assert top.images[0].tolist() == [2, 0, 1, 3]
    assert top.values[0, 0] == math.inf and top.values[0, 1] == 0 and top.values[0, 2:].isnan().all()
    out.mkdir()
    gallery.write_topk(out, gallery.topk_document("tiny", None, {}, scan.layers, images.files,
                                                  lambda layer, y, x: (0, 0, 1, 1)))
    document = json.loads((out / "topk.json").read_text("ascii"))
    assert [(e["image"], e["value"]) for e in document["layers"]["conv1"][0]["top"]] == [
        ("c_white.png", "Infinity"), ("a_black.png", 0.0), ("b_red.png", "NaN"), ("d_green.png", "NaN")]
    info = gallery.RunInfo(arch="tiny", weights="w.pth", untrained=False, data=str(data),
                           preprocess=data_mod.preprocess_description(), top=4, images=4, skipped=0)
    gallery.render_layer(out, "conv1", top, projected.tiles["conv1"], images.files, info, ["conv1"])
    entries = Entries((out / "layer-conv1.html").read_text("utf-8"))
    assert entries.of("f0") == [("+inf", "c_white.png"), ("0", "a_black.png"), ("NaN", "b_red.png"),
                                ("NaN", "d_green.png")]
    assert entries.of("f1")[0] == (f"{(1 - 0.406) / 0.225:.4g}", "c_white.png")  # white's normalised blue
