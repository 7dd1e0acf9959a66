"""The command-line reference (docs/cli-reference.md), generated from the parsers themselves.

    python -m fpedit.clidoc > docs/cli-reference.md

tests/project/test_docs.py regenerates it and fails when the committed file differs, so the reference can never
describe flags the CLI no longer has. It lists arguments, defaults and help as tables rather than pasting
``--help`` output, whose wrapping changes with the terminal width and the Python version.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

HEADER = """# Command-line reference

Every `fpedit` command with its arguments, defaults and help, generated from the parsers
(`python -m fpedit.clidoc > docs/cli-reference.md`; `tests/project/test_docs.py` fails when this file is out of
date). `fpedit COMMAND --help` prints the same. The guides in [the docs index](index.md) explain when to
use what.
"""


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """``parser``'s subcommands, each with the one-line help it was registered with."""
    found: dict[str, tuple[argparse.ArgumentParser, str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found[name] = (sub, helps.get(name, ""))
    return found


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("fpedit",), summary: str = ""
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """Every parser below ``parser`` (itself first), depth first, in registration order."""
    yield path, parser, summary
    for name, (sub, help_text) in subcommands(parser).items():
        yield from walk(sub, (*path, name), help_text)


def argument_name(action: argparse.Action) -> str:
    metavar = action.metavar if isinstance(action.metavar, str) else None
    if not action.option_strings:
        return metavar or action.dest
    names = ", ".join(action.option_strings)
    takes_value = action.nargs != 0
    if takes_value:
        value = metavar or (
            "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
        )
        names += f" {value}"
    return names


def help_text(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": prog}
    return " ".join(text.split())


def default_text(action: argparse.Action) -> str:
    if (
        not action.option_strings
        or action.nargs == 0
        or action.default in (None, argparse.SUPPRESS, "", [], ())
    ):
        return ""
    default = action.default
    if isinstance(default, (list, tuple)):
        default = " ".join(map(str, default))
    return f"`{default}`"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(parser: argparse.ArgumentParser) -> str:
    """The whole reference as Markdown."""
    out = [HEADER]
    for path, sub, summary in walk(parser):
        rows = [
            action
            for action in sub._actions
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
            and action.help != argparse.SUPPRESS
        ]
        children = subcommands(sub)
        out.append(f"## `{' '.join(path)}`\n")
        about = " ".join((sub.description or summary or "").split())
        if about:
            out.append(cell(about) + "\n")
        if children:
            out.append("Commands: " + ", ".join(f"`{name}`" for name in children) + ".\n")
        if rows:
            out.append("| argument | default | meaning |\n| --- | --- | --- |")
            for action in rows:
                name = cell(argument_name(action))
                out.append(
                    f"| `{name}` | {cell(default_text(action))} | {cell(help_text(action, sub.prog))} |"
                )
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    from fpedit.cli import build_parser

    print(render(build_parser()), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
