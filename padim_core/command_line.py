"""The shape of every padim command's --help: a paragraph, every flag with its default, an example."""

from __future__ import annotations

import argparse
import textwrap


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and example as written; each flag's default, where it has one, after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS, False, []) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def command_parser(prog: str, description: str, example: str) -> argparse.ArgumentParser:
    """A parser for `prog` whose --help shows `description` (a module docstring: its paragraphs
    re-wrapped at 100 columns) and `example`."""
    paragraphs = [" ".join(part.split()) for part in textwrap.dedent(description).strip().split("\n\n")]
    return argparse.ArgumentParser(
        prog=prog, description="\n\n".join(textwrap.fill(text, 100) for text in paragraphs),
        epilog=f"example:\n  {example}", formatter_class=HelpFormatter,
    )
