"""The gallery (``zfkernels.job.gallery``) of a real ``zfk visualize`` run over hostile file names:
escaping in every page, ``topk.json`` round trips, ``skipped.txt`` one line per entry, the cell
layout, links that stay inside the output folder, and nothing written outside it."""

from __future__ import annotations

import html
import os
import stat
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from zfkernels.job import gallery

from _visualize import html_pages, jpeg_bytes, read_topk, visualize, write_photo, zfk

HOSTILE = '<script>alert(1)</script>&"\'.png'
NON_UTF8 = os.fsdecode(b"caf\xe9 \xff.png")  # bytes that are not UTF-8 (surrogate-escaped in Python)
VALID = [HOSTILE, "new\nline.png", "tab\there.png", "<b>class</b>/img&amp;.png", "plain.png", NON_UTF8]
BROKEN = {"<em>bad\n.jpg": "not an image Pillow can read", "trunc\tated.jpg": None}
TAGS = {"html", "head", "meta", "title", "style", "body", "p", "a", "table", "tr", "th", "td", "h1", "h2", "h3",
        "strong", "div", "section", "img", "ol", "li", "span", "em"}
ATTRIBUTES = {"lang", "charset", "href", "src", "class", "id", "title", "width", "height", "loading", "alt"}


def shown(name: str) -> str:
    """How a file name appears on a page: bytes that are not UTF-8 as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def snapshot(root: Path, skip: Path) -> Dict[str, Tuple[bool, int, int]]:
    """Every path under ``root`` except ``skip``'s subtree: (is a folder, size, mtime)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            out[str(path.relative_to(root))] = (stat.S_ISDIR(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


class Page(HTMLParser):
    """Tags, attributes and text of a page (entities decoded)."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: List[Tuple[str, Dict[str, str]]] = []
        self.text: List[str] = []
        self.feed(source)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def urls(self) -> List[str]:
        return [a[k] for _, a in self.tags for k in ("href", "src") if k in a]


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    data, out = work / "data", work / "out"
    try:
        for i, name in enumerate(VALID):
            write_photo(data / name, 40 + i)
    except OSError as error:  # a filesystem that refuses such names
        pytest.skip(f"this filesystem refuses a test file name: {error}")
    (data / "<em>bad\n.jpg").write_bytes(b"")
    truncated = jpeg_bytes(3, (200, 150))
    (data / "trunc\tated.jpg").write_bytes(truncated[: len(truncated) // 3])
    before = snapshot(work, out)
    umask = os.umask(0o022)
    try:
        status, _, _ = zfk(visualize(data, out, "--layers", "conv1,conv2", "--features", "0-2", "--top", "9",
                                     "--batch-size", "4"))
    finally:
        os.umask(umask)
    assert status == 0
    return {"work": work, "data": data, "out": out, "before": before, "after": snapshot(work, out)}


def test_hostile_names_appear_only_escaped_in_every_page(hostile_run):
    out = hostile_run["out"]
    pages = html_pages(out)
    assert {p.name for p in pages} == {"index.html", "layer-conv1.html", "layer-conv2.html"}
    for page in pages:
        source = page.read_bytes().decode("utf-8")  # strict: valid UTF-8 whatever the names
        for raw in ("<script", "</script", "<b>class", "<em>bad", "alert(1)</script>"):
            assert raw not in source, (page.name, raw)
        parsed = Page(source)
        assert {tag for tag, _ in parsed.tags} <= TAGS, page.name
        assert {k for _, attrs in parsed.tags for k in attrs} <= ATTRIBUTES, page.name
        if page.name == "index.html":
            continue
        titles = [a["title"] for tag, a in parsed.tags if "title" in a]
        text = "".join(parsed.text)
        for name in VALID:
            # Every image is in every map's top 9 here: three maps, so three times per page.
            assert titles.count(shown(name)) == 3, (page.name, name)
            assert shown(name) in text
            assert html.unescape(source).count(shown(name)) == 6  # three titles, three texts


def test_topk_json_round_trips_every_name(hostile_run):
    data = hostile_run["data"]
    document = read_topk(hostile_run["out"])
    names = {entry["image"] for maps in document["layers"].values() for m in maps for entry in m["top"]}
    assert names == set(VALID)
    assert os.fsencode(NON_UTF8) in {os.fsencode(n) for n in names}
    for name in names:
        assert (data / name).is_file()


def test_skipped_log_has_one_line_per_file(hostile_run):
    lines = (hostile_run["out"] / "skipped.txt").read_bytes().decode("utf-8").split("\n")
    assert lines[-1] == "" and lines[0].startswith("# ")
    entries = [line.split("\t") for line in lines[1:-1]]
    assert all(len(e) == 2 for e in entries)
    logged = dict(entries)
    assert set(logged) == {"<em>bad\\n.jpg", "trunc\\tated.jpg"}
    assert logged["<em>bad\\n.jpg"] == BROKEN["<em>bad\n.jpg"]
    assert "truncated" in logged["trunc\\tated.jpg"]


def test_log_text_escapes_control_characters_and_bytes():
    assert gallery.log_text("a\nb\tc\\d\x01") == "a\\nb\\tc\\\\d\\x01"
    assert gallery.log_text(NON_UTF8) == "caf\\xe9 \\xff.png"


def test_every_link_is_relative_and_points_into_the_gallery(hostile_run):
    out = hostile_run["out"].resolve()
    ids = {p.name: {a["id"] for _, a in Page(p.read_text("utf-8")).tags if "id" in a} for p in html_pages(out)}
    checked = 0
    for page in html_pages(out):
        for url in Page(page.read_text("utf-8")).urls():
            parts = urllib.parse.urlsplit(url)
            assert not parts.scheme and not parts.netloc and not parts.path.startswith("/"), (page.name, url)
            target = (out / urllib.parse.unquote(parts.path)).resolve()
            assert out in target.parents and target.is_file(), (page.name, url)
            if parts.fragment:
                assert parts.fragment in ids[target.name], (page.name, url)
            checked += 1
    assert checked > 20


def test_nothing_is_written_outside_out(hostile_run):
    assert hostile_run["after"] == hostile_run["before"]
    out = hostile_run["out"]
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert found == sorted([".zfk", ".zfk.lock", "checkpoint.pt", "index.html", "layer-conv1.html", "layer-conv2.html", "run.json",
                            "skipped.txt", "topk.json", "layers", "layers/conv1", "layers/conv2", "layers/conv1.png",
                            "layers/conv2.png"] + [f"layers/{layer}/f{c:04d}.png" for layer in ("conv1", "conv2")
                                                   for c in range(3)])


def test_output_files_are_readable_like_any_other_file(hostile_run):
    """Atomic writes go through a private temporary file; the result must still get the usual
    permissions (here umask 022: rw-r--r--), or a web server cannot serve the gallery."""
    for path in hostile_run["out"].rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


# -- the cell layout -----------------------------------------------------------------------------


@pytest.mark.parametrize("k, grid", [(9, (3, 3)), (4, (2, 2)), (5, (2, 3)), (1, (1, 1)), (10, (3, 4))])
def test_compose_cell_places_projections_left_and_patches_right(k, grid):
    t, gap, split = 5, gallery.GAP, gallery.SPLIT
    projections = np.stack([np.full((t, t, 3), 10 + r, np.uint8) for r in range(k)])
    patches = np.stack([np.full((t, t, 3), 100 + r, np.uint8) for r in range(k)])
    filled = np.ones(k, bool)
    filled[k // 2] = False  # an entry that could not be drawn stays background
    cell = gallery.compose_cell(projections, patches, filled)
    rows, columns = grid
    grid_w, grid_h = columns * t + (columns - 1) * gap, rows * t + (rows - 1) * gap
    assert cell.shape == (grid_h, 2 * grid_w + split, 3) and cell.dtype == np.uint8
    expected = np.full(cell.shape, 255, np.uint8)
    for r in range(k):
        if r == k // 2:
            continue
        y, x = (r // columns) * (t + gap), (r % columns) * (t + gap)
        expected[y:y + t, x:x + t] = 10 + r
        expected[y:y + t, grid_w + split + x:grid_w + split + x + t] = 100 + r
    assert np.array_equal(cell, expected)
