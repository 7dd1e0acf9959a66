"""The documentation against the code: the CLI reference is the parsers', and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def test_cli_reference_is_the_parsers():
    """docs/cli-reference.md is what `python -m fpedit.clidoc` writes from today's parsers: a flag added,
    renamed or given another default without regenerating it fails here."""
    from fpedit.cli import build_parser
    from fpedit.clidoc import render

    committed = (ROOT / "docs" / "cli-reference.md").read_text()
    assert committed == render(build_parser()), (
        "docs/cli-reference.md is out of date: python -m fpedit.clidoc > docs/cli-reference.md"
    )


def test_the_reference_names_every_flag_of_every_command():
    """The generator itself must not drop flags: each parser's option strings appear in its section."""
    import argparse

    from fpedit.cli import build_parser
    from fpedit.clidoc import render, walk

    text = render(build_parser())
    sections = dict(
        zip(re.findall(r"(?m)^## `(.+)`$", text), re.split(r"(?m)^## `.+`$", text)[1:], strict=True)
    )
    for path, parser, _ in walk(build_parser()):
        section = sections[" ".join(path)]
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            for option in action.option_strings:
                assert option in section, (" ".join(path), option)


def test_every_relative_link_in_the_docs_resolves():
    pages = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target, _ in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_the_readme_is_a_front_door():
    """The manual lives in docs/; the README says what fpedit is, how to run it, and where to read on."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    assert "pip install -c requirements/lock.txt" in readme
    assert "docs/index.md" in readme
