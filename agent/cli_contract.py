"""What every ``outrider`` command promises its caller: exit codes, errors, JSON, pipes.

One home for the contract, so that a command cannot invent its own: commands raise
one of the errors below (``agent.cli.main`` prints its one line and exits with its
code), print JSON only through ``print_json``, and a reader that goes away (``| head``)
ends the command quietly. ``agent.cli_reference`` renders the table in docs/cli.md
from the constants here.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
# What a shell reports for a process killed by SIGPIPE (128 + 13), as for `cat` or `grep` in a pipe
# whose reader left: `set -o pipefail` scripts treat it as they treat them, and it is not "refused".
EXIT_PIPE = 141
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C

# (code, meaning, when): rendered into docs/cli.md
EXIT_CODES: tuple[tuple[int, str, str], ...] = (
    (EXIT_OK, "done", "the command did what was asked (a list may be empty)"),
    (EXIT_FAILED, "refused or failed",
     "the collector refused (permission, stage, gate, not found, invalid) or failed; `audit verify` found the trail "
     "broken; `models gate` failed; `rollback --wait`: an agent failed or did not answer. One sentence on stderr, "
     "without gRPC code names"),
    (EXIT_USAGE, "usage or local bad input",
     "a bad flag or argument, an unreadable or invalid local file, an address in use; one line on stderr saying "
     "what to fix"),
    (EXIT_UNREACHABLE, "cannot reach or authenticate to the collector",
     "no answer at `--collector` (`OUTRIDER_COLLECTOR`), TLS mismatch (`--tls-ca`), no answer in time, or a "
     "missing or unknown token (`--token`, `OUTRIDER_TOKEN`); the line names the flag that fixes it"),
    (EXIT_INTERRUPTED, "interrupted", "Ctrl-C (SIGINT) stopped a command; servers stop gracefully and exit 0"),
    (EXIT_PIPE, "output closed", "the reader of stdout went away (`outrider audit --json | head -1`): nothing more is "
     "written, no traceback"),
)


class CommandError(Exception):
    """A command cannot do what was asked: one line for stderr, and the exit code that says why."""

    exit_code = EXIT_FAILED


class UsageError(CommandError):
    """A bad argument found after parsing (missing file, invalid model, address in use): exit 2."""

    exit_code = EXIT_USAGE


class Refused(CommandError):
    """The collector refused the request, or failed to carry it out: exit 1."""

    exit_code = EXIT_FAILED


class Unreachable(CommandError):
    """The collector cannot be reached, did not answer in time, or does not accept our credentials: exit 3."""

    exit_code = EXIT_UNREACHABLE


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) as None: RFC 8259 JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def print_json(value: Any) -> None:
    """The one way a command prints JSON: strict (NaN and infinities become null), indented."""
    print(json.dumps(strict(value), indent=2, allow_nan=False))


def say(line: str) -> None:
    """One line on stderr; a closed stderr loses it rather than raising from an error path."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def run(command: Callable[[], int]) -> int:
    """Run ``command`` under the contract: its errors become their line and exit code, a closed
    stdout ends it quietly with ``EXIT_PIPE``, Ctrl-C with ``EXIT_INTERRUPTED``."""
    try:
        code = command()
        sys.stdout.flush()  # inside the try: a pipe closed by its reader shows here, not at exit
        return code
    except CommandError as exc:
        say(f"outrider: error: {exc}")
        return exc.exit_code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _silence_stdout() -> None:
    """Point stdout at /dev/null: the interpreter flushes it once more at exit, and that write
    must not raise again (the documented recipe, docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is no file (captured, in a test)
        pass
