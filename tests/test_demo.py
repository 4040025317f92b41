"""``outrider demo`` and the CLI's help, through the real entry point (``python -m agent.cli``)."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from agent.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
FINAL = re.compile(r"rows sent: (-?\d+); stored by the collector: (\d+); dropped: (\d+); errors: (\d+); "
                   r"windows: (\d+)")


def outrider(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # the table says "µs"
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, encoding="utf-8", timeout=timeout)


def window_table(stdout: str) -> list[dict[str, float]]:
    """The rows under the header line, keyed by column name (names hold single spaces)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("agent"))
    names = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(dict(zip(names, map(float, line.split()), strict=True)))
    return rows


def test_demo_shows_the_drift_it_sends():
    """A collector and two agents: every row sent is stored; the drift shows in the windows."""
    result = outrider("demo", "--fast")
    assert result.returncode == 0, result.stderr
    final = FINAL.search(result.stdout.strip().splitlines()[-1])
    assert final, result.stdout
    sent, stored, dropped, errors, windows = map(int, final.groups())
    assert sent > 0 and sent == stored + dropped
    assert errors == 0
    assert windows >= 4

    table = window_table(result.stdout)
    assert len(table) == windows
    assert {w["agent"] for w in table} == {1.0, 2.0}
    assert sum(w["rows"] for w in table) == stored
    full = [w for w in table if w["rows"] >= 100]  # the flushes at shutdown can be tiny
    assert abs(full[0]["X[0] mean"]) < 0.3
    assert full[-1]["X[0] mean"] > 1.0  # X[0] moved by 1.5 sigma half way
    assert "demo-agent-1" in result.stdout and "demo-agent-2" in result.stdout  # outrider status


def test_help_lists_the_commands():
    result = outrider("--help", timeout=60)
    assert result.returncode == 0, result.stderr
    commands = re.findall(r"^ {4}(\S+)", result.stdout, re.MULTILINE)
    assert {"agent", "demo"} <= set(commands), result.stdout


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser, help) for every subcommand, however deeply nested."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            # a parser added without help= has no entry here, which is what we look for
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if sub.prog.endswith(" " + name):  # skip aliases: each parser once
                    yield (*path, name), sub, helps.get(name)
                    yield from subcommands(sub, (*path, name))


def test_every_command_has_help():
    found = list(subcommands(build_parser()))
    assert {path for path, _, _ in found} >= {("agent",), ("agent", "serve"), ("demo",)}
    for path, parser, text in found:
        assert text and text.strip(), f"'outrider {' '.join(path)}' has no help text"
        parser.format_help()  # a bad %-format in any option's help fails here
