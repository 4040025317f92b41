"""``outrider demo`` and the CLI's help, through the real entry point (``python -m agent.cli``)."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from agent.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
FINAL = re.compile(r"requests: (\d+); rows: (\d+); failed: (\d+); answered by version: (\{.*\})")


def outrider(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, encoding="utf-8", timeout=timeout)


def test_demo_tells_the_whole_story():
    """Register, approve, serve by name, drift, retraining request, shadow, promote, a gate refusal, a bad
    promotion rolled back by policy + approval, audit verified; no request fails through the swaps."""
    result = outrider("demo", "--fast", "--http", "127.0.0.1:0")
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert re.search(r"web page: http://127\.0\.0\.1:\d+/", out)
    assert "approval 1 approved: demo-classifier version 1 is now production" in out
    assert re.search(r"demo-agent-1 .*demo-classifier@1", out) and re.search(r"demo-agent-2 .*demo-classifier@1", out)
    assert "alert opened on X[0]" in out
    assert re.search(r"retraining request 1: demo-classifier version 1 is completed", out)
    assert re.search(r"label agreement +- +\d+(\.\d+)?% of \d+ rows", out)  # the shadow report
    assert "gate: FAILED" in out and "evaluation gate of demo-classifier version 3 has not passed" in out
    assert "approval 4 approved: demo-classifier version 2 is now production" in out  # the rollback
    assert re.search(r"rollback +2 +4 .* 2 ok, 0 failed, 0 pending", out)
    assert re.search(r"audit trail intact: \d+ entries", out)
    requests, rows, failed, versions = FINAL.search(out).groups()
    assert int(failed) == 0 and int(requests) > 0 and int(rows) > 0
    assert set(json.loads(versions)) == {"1", "2", "4"}  # served in turn, swapped under load


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
