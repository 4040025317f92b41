"""docs/cli.md, the CLI reference, generated from the parsers' own help.

``python -m agent.cli_reference`` rewrites it; ``tests/test_docs.py`` fails when
it is stale, so the reference can never drift from what ``--help`` says.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WIDTH = "100"  # argparse wraps to $COLUMNS: fixed, so the file is the same on every terminal


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield " ".join(("outrider", *path)), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def render() -> str:
    """The whole reference: one section per command, its help verbatim."""
    # Flags take defaults from OUTRIDER_* variables: render with none set, at a fixed width.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    with mock.patch.dict(os.environ, {**clean, "COLUMNS": WIDTH}, clear=True):
        from agent.cli import build_parser

        parser = build_parser()
        sections = [(name, p.format_help()) for name, p in _commands(parser)]
    out = ["# CLI reference", "",
           "Generated from the commands' own `--help` by `python -m agent.cli_reference`; a test fails when it",
           "is stale. Every flag also reads an environment variable, shown as `[env ...]`: `OUTRIDER_AGENT_*`",
           "for `outrider agent serve`, `OUTRIDER_COLLECTOR_*` for `outrider collector serve`, `OUTRIDER_*`",
           "for the operators' commands.", ""]
    out += [f"- [`{name}`](#{name.replace(' ', '-')})" for name, _ in sections]
    for name, text in sections:
        out += ["", f"## {name}", "", "```text", text.rstrip(), "```"]
    return "\n".join(out) + "\n"


def main() -> int:
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(render(), encoding="utf-8")
    print(f"wrote {REFERENCE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
