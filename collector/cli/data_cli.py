"""``outrider data export NAME``: the rows agents sampled (``agent serve --sample-rows``), as CSV or JSON lines.

One row per sampled row: ``window_end`` (ISO, UTC), ``agent_id``,
``model_version``, then the model's columns (inputs and outputs, named as in
the window summaries). Numbers print exactly (shortest round trip); a missing
value (NaN, or an empty string) is an empty CSV cell or JSON ``null``; infinities
are ``inf`` / ``-inf``. What was written, and why nothing was, goes to stderr.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from agent.cli import UsageError, add_flag
from agent.cli_contract import say
from collector.cli.cli import _client_flags, connect, iso, metadata, rpc_failure, since_time

EXPORT_TIMEOUT = 3600.0  # a whole export, however many windows
MAX_CHUNK_BYTES = 64 * 1024 * 1024  # one window's sample: 10,000 rows of many columns can pass gRPC's 4 MiB default
FIXED = ("window_end", "agent_id", "model_version")


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="export the rows agents sampled, for retraining",
                                 description="Rows sampled by agents run with --sample-rows.")
    actions = data.add_subparsers(dest="data_action", metavar="ACTION", required=True)
    export = actions.add_parser(
        "export", help="write a model's sampled rows as CSV or JSON lines",
        description="Write the rows agents sampled from the traffic of model NAME (a uniform sample of each window, "
                    "kept by agents run with --sample-rows N and stored by the collector for its --sample-retention), "
                    "oldest window first: window_end, agent_id, model_version, then every input and output column. "
                    "Needs the operator role. --json is the same as --format jsonl.")
    export.add_argument("name", metavar="NAME", help="model name")
    add_flag(export, "--version", metavar="V", help="model version (default: every version)")
    add_flag(export, "--since", type=since_time, metavar="WHEN",
             help="windows ending at or after WHEN: a duration back from now (30m, 1h, 2d) "
                  "or a time (2026-11-26T10:00:00Z; UTC when no zone is given) (default: every stored sample)")
    add_flag(export, "--until", type=since_time, metavar="WHEN", help="windows ending at or before WHEN, as --since "
             "(default: now)")
    add_flag(export, "--format", choices=("csv", "jsonl"), help="csv (with a header row) or jsonl (one JSON object "
             "per row) (default: csv, or jsonl with --json)")
    add_flag(export, "--out", metavar="FILE", help="write to FILE (replaced only when the export succeeds) "
             "instead of stdout")
    _client_flags(export)
    export.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    fmt = args.format or ("jsonl" if args.json else "csv")
    if args.json and fmt != "jsonl":
        raise UsageError("--json writes JSON lines; drop --json or pass --format jsonl")
    if args.since and args.until and args.since > args.until:
        raise UsageError("--since is after --until: pass an earlier --since or a later --until")
    if args.since and not args.until and args.since > time.time_ns():
        raise UsageError("--since is in the future, after the default --until (now): pass an earlier --since")
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise UsageError(f"directory {out.parent} of --out {out} does not exist; create it or pass another --out")
    request = pb.ExportDataRequest(model_name=args.name, model_version=args.version or "",
                                   since_unix_nano=args.since or 0, until_unix_nano=args.until or 0)
    what = f"model {args.name!r}" + (f" version {args.version!r}" if args.version else "")
    windows, rows = _export(_stream(args, request), out, fmt, what)  # a closed stdout: agent.cli.main ends quietly
    where = str(out) if out else "stdout"
    if rows:
        say(f"wrote {rows} rows from {windows} windows of {what} to {where}")
    else:
        say(f"no sampled rows of {what}" + (" in that time" if args.since or args.until else "")
            + ("" if out is None else f"; {out} not written")
            + ": agents keep samples only when run with --sample-rows N (off by default), and the collector "
              "deletes them after its --sample-retention (7 days by default)")
    return 0


def _export(chunks: Iterator[Any], out: Path | None, fmt: str, what: str) -> tuple[int, int]:
    """Write to stdout, or to a file beside ``out`` renamed over it once complete (and only if it has rows)."""
    if out is None:
        windows, rows = _write(chunks, sys.stdout, fmt, what)
        sys.stdout.flush()
        return windows, rows
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            windows, rows = _write(chunks, f, fmt, what)
        if rows:
            os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return windows, rows


def _write(chunks: Iterator[Any], f: IO[str], fmt: str, what: str) -> tuple[int, int]:
    """Write every chunk's rows to ``f``; (windows, rows) written."""
    windows = rows = 0
    header: list[str] | None = None
    writer = csv.writer(f, lineterminator="\n") if fmt == "csv" else None
    for chunk in chunks:
        columns = {c.name: c for c in chunk.sample.columns}
        n = max((len(c.numbers) or len(c.strings) for c in columns.values()), default=0)
        if not n:
            continue
        if header is None:
            header = list(columns)
            if writer is not None:
                writer.writerow([*FIXED, *header])
        extra = [name for name in columns if name not in header]
        if extra and writer is not None:
            raise UsageError(f"a window of {what} version {chunk.model_version!r} has columns the first one has not "
                             f"({', '.join(extra[:5])}): export one --version at a time, or use --format jsonl")
        fixed = [iso(chunk.window_end_unix_nano), chunk.agent_id, chunk.model_version]
        values = [_values(c) for c in columns.values()]
        if writer is not None:
            index = {name: i for i, name in enumerate(columns)}
            for r in range(n):
                writer.writerow(fixed + [_csv(values[index[name]][r]) if name in index else "" for name in header])
        else:
            names = list(columns)
            for r in range(n):
                row = dict(zip(FIXED, fixed))
                row.update((name, _json(column[r])) for name, column in zip(names, values))
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        windows += 1
        rows += n
    return windows, rows


def _values(column: Any) -> list[Any]:
    return list(column.numbers) if column.numbers else list(column.strings)


def _number(value: float) -> Any:
    """Whole numbers without ``.0`` (class labels, counts); others as the shortest exact decimal."""
    if value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _csv(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return _number(value)
    return value


def _json(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return _number(value)
    return value if value != "" else None


def _stream(args: argparse.Namespace, request: Any) -> Iterator[Any]:
    """ExportData's chunks; failures raise the contract's errors, as ``collector.cli.cli._ask``'s do."""
    import grpc

    from protos import collector_pb2_grpc as pb_grpc

    with connect(args, [("grpc.max_receive_message_length", MAX_CHUNK_BYTES)]) as channel:
        try:
            yield from pb_grpc.OpsServiceStub(channel).ExportData(request, metadata=metadata(args),
                                                                  timeout=EXPORT_TIMEOUT)
        except grpc.RpcError as exc:
            raise rpc_failure(args, exc, EXPORT_TIMEOUT) from None
