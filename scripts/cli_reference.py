"""Write docs/cli.md, the command-line reference, from ``zfkernels.cli.build_parser()``.

    python scripts/cli_reference.py           # regenerate docs/cli.md
    python scripts/cli_reference.py --check   # exit 1 if docs/cli.md is out of date

The page is generated, never edited by hand: every command's description, usage and options come
from the argument parser itself, so the reference cannot drift from what ``zfk --help`` says
(``tests/test_docs.py`` compares the file with this script's output).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List

ROOT = Path(__file__).resolve().parents[1]
CLI_MD = ROOT / "docs" / "cli.md"
# argparse wraps usage lines to the terminal's width (read from $COLUMNS); a fixed width makes the
# page the same on every machine.
WIDTH = "100"


@contextmanager
def fixed_width() -> Iterator[None]:
    """Format help at :data:`WIDTH` columns, whatever the terminal."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def actions(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    """The parser's arguments in definition order (argparse has no public accessor for them)."""
    return list(parser._actions)


def subcommands(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    """The parser's sub-commands by name, in the order they were added."""
    for action in actions(parser):
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def subcommand_help(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """The one-line ``help=`` each sub-command was added with."""
    for action in actions(parser):
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._get_subactions()}
    return {}


def inline(text: str) -> str:
    """Help text as one Markdown line: whitespace collapsed, table pipes escaped, and ``<`` escaped
    outside code spans (so ``<layer>`` is not taken for an HTML tag)."""
    parts = " ".join(text.split()).split("`")
    parts[::2] = [part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for part in parts[::2]]
    return "`".join(parts).replace("|", "\\|")


def invocation(action: argparse.Action) -> str:
    """How an argument is written on the command line, e.g. ``--label CLASS [CLASS ...]``."""
    if action.metavar is not None:
        metavar = str(action.metavar)
    elif action.choices is not None:
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        metavar = action.dest if not action.option_strings else action.dest.upper()
    if action.nargs == 0:
        value = ""
    elif action.nargs == "?":
        value = f"[{metavar}]"
    elif action.nargs == "*":
        value = f"[{metavar} ...]"
    elif action.nargs == "+":
        value = f"{metavar} [{metavar} ...]"
    elif isinstance(action.nargs, int):
        value = " ".join([metavar] * action.nargs)
    else:
        value = metavar
    if not action.option_strings:
        return value
    return ", ".join(action.option_strings) + (f" {value}" if value else "")


def description(text: str) -> List[str]:
    """A raw description as Markdown: plain paragraphs as they are, indented blocks fenced."""
    lines: List[str] = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        rows = block.rstrip().split("\n")
        if any(row.startswith((" ", "\t")) for row in rows):
            lines += ["```text", *rows, "```", ""]
        else:
            lines += [inline(row) for row in rows] + [""]
    return lines


def options_table(parser: argparse.ArgumentParser) -> List[str]:
    """A table of the parser's arguments (positional first, then options), ``--help`` left out."""
    listed = [
        a for a in actions(parser)
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.help != argparse.SUPPRESS
    ]
    listed.sort(key=lambda a: bool(a.option_strings))  # stable: positional arguments first
    if not listed:
        return []
    rows = ["| argument | meaning |", "|---|---|"]
    for action in listed:
        rows.append(f"| `{invocation(action).replace('|', chr(92) + '|')}` | {inline(action.help or '')} |")
    return rows + [""]


def command_section(name: str, parser: argparse.ArgumentParser, summary: str, level: int) -> List[str]:
    """One command's section: its summary, usage, description and options, then its sub-commands."""
    lines = [f"{'#' * level} `{name}`", ""]
    if summary:
        lines += [inline(summary), ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    if parser.description:
        lines += description(parser.description)
    lines += options_table(parser)
    helps = subcommand_help(parser)
    for sub_name, sub in subcommands(parser).items():
        lines += command_section(f"{name} {sub_name}", sub, helps.get(sub_name, ""), level + 1)
    return lines


def render() -> str:
    """The whole of docs/cli.md, from ``zfkernels.cli.build_parser()``."""
    from zfkernels.cli import build_parser

    with fixed_width():
        parser = build_parser()
        lines = [
            "# Command-line reference",
            "",
            "Generated from `zfkernels.cli.build_parser()` by `python scripts/cli_reference.py`; do not",
            "edit by hand. `zfk COMMAND --help` prints the same text.",
            "",
        ]
        helps = subcommand_help(parser)
        if helps:
            lines += ["| command | what it does |", "|---|---|"]
            lines += [f"| [`zfk {n}`](#zfk-{n}) | {inline(h)} |" for n, h in helps.items()]
            lines += [""]
        lines += command_section(parser.prog, parser, "", 2)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description="Write docs/cli.md from zfk's argument parser.")
    parser.add_argument("--check", action="store_true", help="only check that docs/cli.md is up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = CLI_MD.read_text(encoding="utf-8") if CLI_MD.exists() else ""
        if current != text:
            print(f"{CLI_MD.relative_to(ROOT)} is out of date: run `python scripts/cli_reference.py`", file=sys.stderr)
            return 1
        return 0
    CLI_MD.write_text(text, encoding="utf-8")
    print(f"wrote {CLI_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    sys.exit(main(sys.argv[1:]))
