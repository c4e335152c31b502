"""The gallery in a real browser: headless Chromium (Debian's ``chromium``) opens ``index.html``
and the layer pages from disk, offline; screenshots are non-blank PNGs of the window size, and
every ``<img>`` of every page loads (checked by a script in a copy of the page, read back from
``--dump-dom``). A page with a broken image proves the check can fail."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _visualize import photo_folder, visualize, zfk

CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1200, 900)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND"]  # offline: no name resolves
# Appended to a copy of a page whose images are made eager (the cells are loading="lazy" on
# purpose): once the window's load event has fired, every image has loaded or failed; write
# "loaded/total" into the DOM.
CHECK = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  const result = document.createElement("pre");
  result.id = "zfk-image-check";
  result.textContent = loaded + "/" + images.length;
  document.body.appendChild(result);
});
</script>
"""

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (Debian: apt-get install chromium)")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def images_loaded(tmp_path: Path, page: Path) -> tuple:
    """(loaded, total) images of ``page``, from a checked copy beside it (same relative links)."""
    copy = page.with_name(f"check-{page.name}")
    source = page.read_text("utf-8").replace('loading="lazy"', 'loading="eager"')
    copy.write_text(source.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    try:
        dom = chromium(tmp_path, "--virtual-time-budget=30000", "--dump-dom", copy.as_uri()).stdout  # (virtual: idle time is skipped)
    finally:
        copy.unlink()
    found = re.search(r'<pre id="zfk-image-check">(\d+)/(\d+)</pre>', dom)
    assert found, dom[-2000:]
    return int(found.group(1)), int(found.group(2))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("browser")
    data = photo_folder(work / "data", 6, seed=50)
    out = work / "out"
    status, _, _ = zfk(visualize(data, out, "--layers", "conv1,conv2", "--features", "0-3", "--top", "4",
                                 "--batch-size", "4"))
    assert status == 0
    return out


@pytest.mark.parametrize("page", ["index.html", "layer-conv1.html", "layer-conv2.html"])
def test_pages_render_to_a_non_blank_screenshot(gallery, tmp_path, page):
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--virtual-time-budget=5000", f"--screenshot={shot}", (gallery / page).as_uri())
    image = Image.open(shot)
    assert image.format == "PNG" and image.size == WINDOW
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours = np.unique(pixels, axis=0)
    assert len(colours) > 50  # text, tables, warnings: far from a blank page
    assert (pixels < 100).all(axis=1).mean() > 0.002  # dark text was drawn


@pytest.mark.parametrize("page, count", [("layer-conv1.html", 4), ("layer-conv2.html", 4)])
def test_every_image_of_a_layer_page_loads(gallery, tmp_path, page, count):
    assert (gallery / page).read_text("utf-8").count('loading="lazy"') == count
    assert images_loaded(tmp_path, gallery / page) == (count, count)


def test_the_image_check_sees_a_missing_image(gallery, tmp_path):
    page = gallery / "layer-conv1.html"
    broken = gallery / "broken-conv1.html"
    broken.write_text(page.read_text("utf-8").replace("layers/conv1/f0002.png", "layers/conv1/missing.png"), "utf-8")
    try:
        assert images_loaded(tmp_path, broken) == (3, 4)
    finally:
        broken.unlink()


@pytest.mark.slow
def test_a_diagnostic_page_and_the_diagnostics_index_open_offline(gallery, tmp_path):
    """``zfk occlusion`` into the gallery's folder (after the tests above): its page's figure
    loads from disk, and diagnostics.html renders."""
    from _images import SAMPLES

    photo = tmp_path / "n02123045_cat.jpg"  # the synset in the name gives the true class
    photo.write_bytes((SAMPLES / "chelsea_cat.jpg").read_bytes())
    status, _, _ = zfk(["occlusion", str(photo), "--stride", "56", "--size", "60", "--device", "cpu", "--out", gallery,
                        "--quiet"])
    assert status == 0
    assert images_loaded(tmp_path, gallery / "occlusion" / "index.html") == (1, 1)
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--virtual-time-budget=5000", f"--screenshot={shot}", (gallery / "diagnostics.html").as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert (pixels < 100).all(axis=1).mean() > 0.0005  # its heading and links were drawn
