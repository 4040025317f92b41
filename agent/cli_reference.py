"""docs/cli.md, the CLI reference: the contract every command keeps (from the constants that
make it), then each command's own help.

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


def commands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(``outrider ...``, parser) of every command that runs something, however deeply nested."""
    for name, sub in _commands(parser):
        if sub.get_default("func") is not None:
            yield name, sub


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def contract(parser: argparse.ArgumentParser) -> list[str]:
    """docs/cli.md's table of what every command promises, from the constants that make it so."""
    from agent.cli_contract import EXIT_CODES, EXIT_FAILED, EXIT_PIPE, EXIT_UNREACHABLE
    from collector.cli.cli import RPC_OUTCOMES

    out = ["## The contract", "",
           "What every command promises, whatever it does (`agent.cli_contract`; `tests/test_cli_contract.py`",
           "checks it for every command the parser knows).", "",
           "| exit code | means | when |", "|---|---|---|"]
    out += [f"| {code} | {meaning} | {_cell(when)} |" for code, meaning, when in EXIT_CODES]
    by_code: dict[int, list[str]] = {}
    for name, (kind, _) in RPC_OUTCOMES.items():
        by_code.setdefault(kind.exit_code, []).append(f"`{name}`")
    out += ["", "The collector's answers, as exit codes (one place: `collector.cli.cli.RPC_OUTCOMES`): "
            + "; ".join(f"{', '.join(names)} → {code}" for code, names in sorted(by_code.items(), reverse=True))
            + f"; any other status (`INTERNAL`, `UNKNOWN`, ...) → {EXIT_FAILED}. The line on stderr says what the "
              "collector said, in words, and for "
            + f"{EXIT_UNREACHABLE} which flag or variable fixes it.", ""]
    listed = [(name, sub.get_default("json_list")) for name, sub in commands(parser) if sub.get_default("json_list")]
    out += ["| output | rule |", "|---|---|",
            "| `--json` | strict JSON (RFC 8259) on stdout, indented: NaN and ±infinity print as `null`, 64-bit "
            "integers as numbers; messages and warnings go to stderr |",
            "| one object | every command that is not a list prints one JSON object |",
            "| lists | `{\"<key>\": [...], \"next_page_token\": \"\"}`: the List call's own reply with every page "
            "merged (the CLI follows `next_page_token` until the end or `--limit`); `next_page_token` is `\"\"` unless "
            "`--limit` stopped the listing early, then `--page-token` goes on from it. Keys: "
            + ", ".join(f"`{name.removeprefix('outrider ')}` → `{key}`" for name, key in listed) + " |",
            "| `data export --json` | JSON lines: one object per sampled row (NaN → `null`, infinities → "
            "`\"inf\"`/`\"-inf\"`), the summary on stderr |",
            f"| pipes | a reader that stops early (`outrider audit --json \\| head -1`) ends the command quietly: no "
            f"traceback, exit {EXIT_PIPE} |", ""]
    status = dict(commands(parser))["outrider status"]
    shared = [a for a in status._actions if a.option_strings and a.option_strings[0] in
              ("--collector", "--token", "--tls-ca", "--tls-client-cert", "--tls-client-key")]
    out += ["| operators' flag | environment variable | what |", "|---|---|---|"]
    for action in shared:
        env = action.help.rsplit("[env ", 1)[1].rstrip("]")
        what = action.help.rsplit(" [env ", 1)[0] % {"default": action.default}
        out.append(f"| `{action.option_strings[0]}` | `{env}` | {_cell(what)} |")
    out += ["", "Every other flag reads an environment variable too, shown as `[env ...]` below: `OUTRIDER_AGENT_*` "
            "for `outrider agent serve`, `OUTRIDER_COLLECTOR_*` for `outrider collector serve`, `OUTRIDER_*` for the "
            "operators' commands; a flag on the command line wins.", ""]
    return out


def render() -> str:
    """The whole reference: the contract, then one section per command, its help verbatim."""
    # Flags take defaults from OUTRIDER_* variables: render with none set, at a fixed width.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    with mock.patch.dict(os.environ, {**clean, "COLUMNS": WIDTH}, clear=True):
        from agent.cli import build_parser

        parser = build_parser()
        sections = [(name, p.format_help()) for name, p in _commands(parser)]
        table = contract(parser)
    out = ["# CLI reference", "",
           "Generated from the commands' own `--help` by `python -m agent.cli_reference`; a test fails when it",
           "is stale.", ""]
    out += table
    out += ["## Commands", ""]
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
