"""The documentation against the code: the README's Python example runs and does what it says,
docs/cli.md is what scripts/cli_reference.py generates from the argument parser, and every
relative link in README.md and docs/ points at a file (and a heading) that exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def python_blocks(text: str) -> List[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def prose(text: str) -> str:
    """The page without its code: links inside code blocks and spans are examples, not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(page: Path) -> set:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading numbered from -1."""
    seen: Dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(page: Path) -> Iterator[Tuple[str, Path, str]]:
    """(link as written, the file it names, its #fragment or '') for every relative link."""
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        yield target, (page.parent / path).resolve() if path else page, fragment


def test_readme_python_example_runs_and_projects_inside_the_receptive_field(monkeypatch):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) == 1, f"README.md should hold exactly one ```python block, found {len(blocks)}"
    monkeypatch.chdir(ROOT)  # the example opens a sample photograph by its path in the repository
    namespace: dict = {}
    exec(compile(blocks[0], "README.md (python block)", "exec"), namespace)
    pixels, conv5, channel = namespace["pixels"], namespace["conv5"], namespace["channel"]
    x0, y0, x1, y1 = (namespace[n] for n in ("x0", "y0", "x1", "y1"))
    assert pixels.shape == (1, 3, 224, 224)
    assert torch.isfinite(pixels).all()
    # The example claims the strongest map: check it against the activations themselves.
    assert conv5[channel].max() == conv5.max()
    # A single activation reaches the input only inside its receptive field, and does reach it.
    outside = torch.ones(224, 224, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
    assert (pixels[0][:, outside] == 0).all()
    assert (pixels[0][:, y0:y1, x0:x1] != 0).any()


DOC_EXAMPLES = [(page, i) for page in PAGES[1:] for i, _ in enumerate(python_blocks(page.read_text(encoding="utf-8")))]


@pytest.mark.parametrize("page, index", DOC_EXAMPLES, ids=[f"{p.name}-{i}" for p, i in DOC_EXAMPLES])
def test_docs_python_examples_run(page, index, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(compile(python_blocks(page.read_text(encoding="utf-8"))[index], f"{page.name} (python block {index})", "exec"), {})


def load_cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_generated_from_the_parser():
    module = load_cli_reference()
    expected = module.render()
    current = (DOCS / "cli.md").read_text(encoding="utf-8") if (DOCS / "cli.md").exists() else ""
    assert current == expected, "docs/cli.md is out of date: run `python scripts/cli_reference.py`"


def test_cli_reference_lists_every_command_and_option():
    """An independent look at the parser: every sub-command has a section, and every option string
    of every sub-command appears in the page."""
    from zfkernels.cli import build_parser

    module = load_cli_reference()
    text = module.render()
    commands = module.subcommands(build_parser())
    assert commands, "zfk has no sub-commands?"
    for name, sub in commands.items():
        assert f"### `zfk {name}`" in text
        for action in module.actions(sub):
            for option in action.option_strings:
                assert option in text, f"{option} of zfk {name} is missing from docs/cli.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target, path, fragment in relative_links(page):
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(f"{target}: no heading #{fragment} in {path.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_checker_finds_a_broken_link(tmp_path):
    """The check above can fail: a missing file and a missing heading are both reported."""
    (tmp_path / "a.md").write_text("# Title\n\n[ok](#title) [gone](missing.md) [bad](#nowhere)\n"
                                   "`[in code](ignored.md)`\n", encoding="utf-8")
    found = [(t, p.exists(), f in anchors(p) if p.exists() else None) for t, p, f in relative_links(tmp_path / "a.md")]
    assert found == [("#title", True, True), ("missing.md", False, None), ("#nowhere", True, False)]


def test_readme_is_short_and_points_to_the_docs():
    text = README.read_text(encoding="utf-8")
    size = len(text.encode("utf-8"))  # bytes, as `wc -c` counts: at least the characters
    assert size <= 15_000, f"README.md has {size} bytes; the reference belongs in docs/"
    assert any(path == (DOCS / "index.md").resolve() for _, path, _ in relative_links(README))
