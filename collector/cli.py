"""``outrider collector`` (its ``serve`` is in ``collector.serve_cli``), the operators' ``outrider status`` /
``windows`` / ``attach``, and what every operators' command module shares (flags, asking, errors).

The query commands talk only to the collector's OpsService over gRPC (never
to its database), so they work from any machine the collector lets in.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.cli import EXIT_USAGE, UsageError, add_flag, positive
from collector.cli_format import age, iso, plain, rollout_state, table  # noqa: F401  (other command modules import them from here)

DEFAULT_COLLECTOR = "127.0.0.1:50051"
CALL_TIMEOUT = 30.0
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


COLLECTOR_ENV = "OUTRIDER_COLLECTOR_"  # environment prefix of `outrider collector serve`'s flags


def register(subparsers: argparse._SubParsersAction) -> None:
    collector = subparsers.add_parser("collector", help="run the collector that agents stream to",
                                      description="Run the collector: it stores agents' windows and answers operators.")
    commands = collector.add_subparsers(dest="collector_command", metavar="COMMAND", required=True)
    from collector.serve_cli import add_serve  # it imports this module, so not at the top

    add_serve(commands)

    status = subparsers.add_parser(
        "status", help="show agents, model versions and collector counters",
        description="Show the agents the collector knows, totals per model version, and its counters.")
    _client_flags(status)
    status.set_defaults(func=_one_line_errors(status_command))

    windows = subparsers.add_parser(
        "windows", help="list a model's stored windows, newest first",
        description="List a model's stored windows (raw and rolled up), newest first.")
    # No OUTRIDER_MODEL here: that variable is `agent serve`'s model file.
    windows.add_argument("--model", required=True, metavar="NAME", help="model name")
    add_flag(windows, "--version", metavar="V", help="model version (default: all versions)")
    add_flag(windows, "--since", type=since_time, metavar="WHEN",
             help="windows ending at or after WHEN: a duration back from now (30m, 1h, 2d) "
                  "or a time (2026-11-26T10:00:00Z; UTC when no zone is given)")
    windows.add_argument("--performance", action="store_true",
                         help="also show each window's realised performance (labels joined by the agents)")
    add_flag(windows, "--limit", default="100", type=positive(int), metavar="N",
             help="most windows to list (the collector allows up to 10000)")
    _client_flags(windows)
    windows.set_defaults(func=_one_line_errors(windows_command))

    attach = subparsers.add_parser(
        "attach", help="attach a reference profile to a model version",
        description="Attach a reference profile (made with 'outrider profile') to a model version: drift of "
                    "that version's traffic is measured against it. Replaces the version's previous profile.")
    attach.add_argument("model_name", metavar="MODEL_NAME", help="model name, as the agents report it")
    attach.add_argument("model_version", metavar="MODEL_VERSION", help="model version, as the agents report it")
    attach.add_argument("profile", metavar="PROFILE.pb", help="the file 'outrider profile --out' wrote")
    _client_flags(attach)
    attach.set_defaults(func=_one_line_errors(attach_command))


def _one_line_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """UsageError -> one line and exit 2, here as well as in agent.cli.main: under
    ``python -m agent.cli`` that module runs as ``__main__``, whose UsageError is
    another class than the ``agent.cli.UsageError`` raised here."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except UsageError as exc:
            print(f"outrider: error: {exc}", file=sys.stderr, flush=True)
            return EXIT_USAGE

    return run


def _client_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--collector", default=DEFAULT_COLLECTOR, type=collector_address, metavar="HOST:PORT",
             help="the collector to ask")
    add_flag(parser, "--token", metavar="TOKEN", secret=True, help="operator token, when the collector has an auth file")
    add_flag(parser, "--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA's certificates")
    add_flag(parser, "--tls-client-cert", metavar="PEM", help="this client's certificate, for a collector "
             "that requires one (mutual TLS)")
    add_flag(parser, "--tls-client-key", metavar="PEM", help="the private key of --tls-client-cert")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


# ------------------------------------------------------------------ argument types


def collector_address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT; use e.g. {DEFAULT_COLLECTOR}")
    return text


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def since_time(text: str) -> int:
    """A duration back from now (``30m``) or an ISO time, as Unix nanoseconds."""
    match = _DURATION.match(text.strip())
    if match:
        return time.time_ns() - int(float(match[1]) * _UNIT_SECONDS[match[2]] * 1e9)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30m, 1h, 2d) nor a time (2026-11-26T10:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def _pem(flag: str, value: str | None) -> Path | None:
    if not value:
        return None
    path = Path(value)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in text:
        raise UsageError(f"{flag} {path} is not a PEM file (no '-----BEGIN' line)")
    return path


# ------------------------------------------------------------------ the operators' commands



def status_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    reply = _ask(args, "Status", pb.StatusRequest())
    if reply is None:
        return 1
    if args.json:
        print(json.dumps(plain(reply), indent=2))
        return 0
    now = time.time_ns()
    if reply.agents:
        # MODEL: the version served; WANTS: what the collector asked a managed agent to serve
        print(table(["AGENT", "RUN", "HOST", "MODEL", "WANTS", "ROLLOUT", "SHADOW", "CONNECTED", "LAST WINDOW",
                     "WINDOWS", "ROWS", "DROPPED", "SPOOL", "RESTARTS"],
                    [[a.agent_id, a.run_id[:8], a.host or "-", f"{a.model_name}@{a.model_version or '-'}",
                      (a.desired_version or "none") if a.managed else "-", rollout_state(a),
                      f"{a.shadow_version} ({a.shadow_share:.0%})" if a.shadow_version else "-",
                      "yes" if a.connected else "no", age(a.last_window_end_unix_nano, now), a.windows, a.rows,
                      a.dropped_rows + a.spool.dropped_rows, a.spool.windows, a.restarts] for a in reply.agents]))
        for a in reply.agents:
            if a.model_error:
                print(f"  {a.agent_id} run {a.run_id[:8]}: the last command failed, it serves "
                      f"{a.model_version or 'nothing'}: {a.model_error}")
    else:
        print("no agents have connected yet")
    print()
    if reply.models:
        print(table(["MODEL", "VERSION", "WINDOWS", "ROWS", "DROPPED", "ERRORS", "LAST WINDOW"],
                    [[m.model_name, m.model_version or "-", m.windows, m.rows, m.dropped_rows, m.errors,
                      age(m.last_window_end_unix_nano, now)] for m in reply.models]))
    else:
        print("no windows stored yet")
    print()
    c = reply.counters
    print(f"collector {reply.collector_version}: windows stored {c.windows_stored}, duplicate {c.windows_duplicate}, "
          f"rejected {c.windows_rejected}; auth failures {c.auth_failures}; write queue {c.write_queue_depth}")
    return 0


def windows_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    request = pb.ListWindowsRequest(model_name=args.model, model_version=args.version or "",
                                    since_unix_nano=args.since or 0, limit=args.limit,
                                    include_summaries=args.performance)
    reply = _ask(args, "ListWindows", request)
    if reply is None:
        return 1
    if args.json:
        print(json.dumps(plain(reply), indent=2))
        return 0
    if not reply.windows:
        print(f"no windows of model {args.model!r}" + (f" version {args.version!r}" if args.version else "")
              + (" in that time" if args.since else ""))
        return 0
    header = ["END", "AGENT", "SEQ", "LEVEL", "ROWS", "CALLS", "DROPPED", "ERRORS"]
    rows = [[iso(w.end_unix_nano), w.agent_id or "-", w.seq if w.level == "raw" else "-", w.level, w.rows,
             w.calls, w.dropped_rows, w.errors] for w in reply.windows]
    if args.performance:  # realised performance of the labels that arrived in each window
        from collector.evaluation import accuracy, mae

        header += ["LABELED", "ACCURACY", "MAE"]
        for row, w in zip(rows, reply.windows):
            perf = w.summary.performance
            row += [perf.labeled] + [f"{v:.3f}" if v == v else "-" for v in (accuracy(perf), mae(perf))]
    print(table(header, rows))
    return 0


def attach_command(args: argparse.Namespace) -> int:
    from google.protobuf.message import DecodeError

    from protos import collector_pb2 as pb
    from protos import summary_pb2

    path = Path(args.profile)
    try:
        profile = summary_pb2.ReferenceProfile.FromString(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read profile {path}: {exc.strerror or exc}; make one with 'outrider profile'") from None
    except DecodeError:
        raise UsageError(f"{path} is not a reference profile; make one with 'outrider profile --out {path.name}'") from None
    if not profile.columns:
        raise UsageError(f"{path} is not a reference profile (it has no columns); make one with 'outrider profile'")
    request = pb.AttachProfileRequest(model_name=args.model_name, model_version=args.model_version, profile=profile)
    reply = _ask(args, "AttachProfile", request)
    if reply is None:
        return 1
    if args.json:
        print(json.dumps({**plain(reply), "rows": profile.rows, "data_sha256": profile.data_sha256,
                          "data_name": profile.data_name}, indent=2))
        return 0
    print(f"attached profile {path.name} to {reply.model_name} version {reply.model_version}: {reply.columns} "
          f"columns, {profile.rows} rows of {profile.data_name or 'data'} (sha256 {profile.data_sha256[:16]}...)"
          + ("; replaced the previous profile" if reply.replaced else ""))
    return 0


def _ask(args: argparse.Namespace, method: str, request: Any) -> Any:
    """Call OpsService ``method``; a caller's problem raises UsageError (exit 2), the collector's prints and gives None."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's own log lines would break the one-line errors
    import grpc

    from collector.auth import client_credentials
    from protos import collector_pb2_grpc as pb_grpc

    cert, key = args.tls_client_cert, args.tls_client_key
    if bool(cert) != bool(key):
        raise UsageError("--tls-client-cert and --tls-client-key go together: pass both PEM files")
    if args.tls_ca or cert:
        for flag, value in (("--tls-ca", args.tls_ca), ("--tls-client-cert", cert), ("--tls-client-key", key)):
            _pem(flag, value)
        channel = grpc.secure_channel(args.collector, client_credentials(args.tls_ca, cert, key))
    else:
        channel = grpc.insecure_channel(args.collector)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    where = f"the collector at {args.collector}"
    with channel:
        try:
            return getattr(pb_grpc.OpsServiceStub(channel), method)(request, metadata=metadata, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            code, details = exc.code(), _first_line(exc.details() or "")
            if code == grpc.StatusCode.UNAVAILABLE:
                raise UsageError(f"cannot reach {where} ({details}); start it with 'outrider collector serve', "
                                 "point --collector (OUTRIDER_COLLECTOR) at it, and use --tls-ca if it serves TLS") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise UsageError(f"{where} did not answer within {CALL_TIMEOUT:.0f} s; check --collector") from None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise UsageError(f"{where} wants a valid operator token ({details}); "
                                 "pass --token (or set OUTRIDER_TOKEN)") from None
            if code == grpc.StatusCode.PERMISSION_DENIED:
                raise UsageError(f"{where} refused: {details}") from None
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                raise UsageError(details) from None
            print(f"outrider: error: {where} failed: {code.name}: {details}", file=sys.stderr, flush=True)
            return None


# ------------------------------------------------------------------ output


def _first_line(exc: BaseException | str) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else (type(exc).__name__ if isinstance(exc, BaseException) else "")
