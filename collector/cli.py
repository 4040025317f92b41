"""``outrider collector serve``, and the operators' ``outrider status`` / ``windows`` / ``attach``.

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

from agent.cli import (EXIT_USAGE, UsageError, add_flag, add_log_level, check_listen, configure_logging, listen_address,
                       positive, stop_signals)
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
    serve = commands.add_parser(
        "serve", help="receive windows from agents and answer operators (gRPC)",
        description="Receive agents' window summaries into a SQLite file and answer operators' queries. "
                    "Without --auth-file it runs unauthenticated and only on a loopback address. "
                    "Stops gracefully on SIGTERM/SIGINT; SIGUSR1 prints every thread's stack to stderr.")
    add_flag(serve, "--db", prefix=COLLECTOR_ENV, default="outrider.db",
             metavar="PATH", help="the SQLite database file")
    add_flag(serve, "--listen", prefix=COLLECTOR_ENV, default=DEFAULT_COLLECTOR, type=listen_address,
             metavar="HOST:PORT",
             help="address to serve on; port 0 picks a free port")
    add_flag(serve, "--auth-file", prefix=COLLECTOR_ENV, metavar="FILE",
             help="TOML file of [[agent]] and [[operator]] tokens; required to listen beyond loopback")
    add_flag(serve, "--tls-cert", prefix=COLLECTOR_ENV,
             metavar="PEM", help="serve TLS with this certificate (needs --tls-key)")
    add_flag(serve, "--tls-key", prefix=COLLECTOR_ENV, metavar="PEM", help="the private key of --tls-cert")
    add_flag(serve, "--tls-client-ca", prefix=COLLECTOR_ENV, metavar="PEM",
             help="require client certificates signed by this CA (mutual TLS)")
    add_flag(serve, "--raw-retention", prefix=COLLECTOR_ENV, default="3600", type=positive(int), metavar="S",
             help="seconds raw windows are kept before they are merged into minutes")
    add_flag(serve, "--minute-retention", prefix=COLLECTOR_ENV, default="86400", type=positive(int), metavar="S",
             help="seconds minute buckets are kept before they are merged into hours")
    add_flag(serve, "--hour-retention", prefix=COLLECTOR_ENV, default="2592000", type=positive(int), metavar="S",
             help="seconds hour buckets are kept before they are merged into days")
    add_flag(serve, "--day-retention", prefix=COLLECTOR_ENV, default="34560000", type=positive(int), metavar="S",
             help="seconds day buckets are kept before they are deleted")
    add_flag(serve, "--sample-retention", prefix=COLLECTOR_ENV, default="604800", type=positive(int), metavar="S",
             help="seconds the rows agents sample (agent serve --sample-rows) are kept for 'outrider data export'")
    add_flag(serve, "--rollup-interval", prefix=COLLECTOR_ENV, default="60", type=positive(float), metavar="S",
             help="seconds between retention passes")
    add_log_level(serve, COLLECTOR_ENV)
    add_flag(serve, "--grace-seconds", prefix=COLLECTOR_ENV, default="10", type=positive(float), metavar="S",
             help="time in-flight calls get to finish on shutdown")
    add_flag(serve, "--drift-interval", prefix=COLLECTOR_ENV, default="60", type=float, metavar="S",
             help="seconds between drift evaluations of every model version with a profile (0: on demand only)")
    add_flag(serve, "--evaluation-retention", prefix=COLLECTOR_ENV, default="604800", type=positive(float),
             metavar="S", help="seconds drift evaluations are kept for history")
    add_flag(serve, "--webhook-url", prefix=COLLECTOR_ENV, metavar="URL",
             help="POST alerts that open or resolve here, as JSON")
    add_flag(serve, "--webhook-secret", prefix=COLLECTOR_ENV, metavar="SECRET", secret=True,
             help="sign webhook bodies with HMAC-SHA256 (header X-Outrider-Signature: sha256=...)")
    add_flag(serve, "--gate-accuracy-tolerance", prefix=COLLECTOR_ENV, default="0.01", type=non_negative,
             metavar="X", help="evaluation gate: largest drop in holdout accuracy (absolute) a new model version "
                               "may show against the baseline")
    add_flag(serve, "--gate-mae-tolerance", prefix=COLLECTOR_ENV, default="0.05", type=non_negative, metavar="X",
             help="evaluation gate: largest relative rise in holdout MAE (0.05: +5 %%) against the baseline")
    add_flag(serve, "--gate-latency-budget-ms", prefix=COLLECTOR_ENV, default="50", type=positive(float),
             metavar="MS", help="evaluation gate: largest p99 latency of single-row calls")
    add_flag(serve, "--retired-artifact-retention", prefix=COLLECTOR_ENV, default="2592000", type=non_negative,
             metavar="S", help="seconds a retired model version's artifact file is kept before it is removed "
                               "(its record and audit trail are kept forever)")
    add_flag(serve, "--retrain-after-evaluations", prefix=COLLECTOR_ENV, default="10", type=non_negative_int,
             metavar="K", help="open a retraining request when a drift alert has stayed open for K consecutive "
                               "evaluations (0: never)")
    add_flag(serve, "--rollback-watch-seconds", prefix=COLLECTOR_ENV, default="3600", type=non_negative,
             metavar="S", help="for S seconds after a promotion, a performance alert or a drift alert on a "
                               "prediction of the new production version triggers --rollback-action (0: never)")
    add_flag(serve, "--rollback-action", prefix=COLLECTOR_ENV, default="request", choices=("request", "act"),
             help="request: open a rollback request for an approver; act: roll back at once")
    add_flag(serve, "--metrics", prefix=COLLECTOR_ENV, type=listen_address, metavar="HOST:PORT",
             help="serve Prometheus metrics at http://HOST:PORT/metrics (default: none); it has no auth, "
                  "so keep it on loopback or a scrape-only network")
    add_flag(serve, "--http", prefix=COLLECTOR_ENV, type=listen_address, metavar="HOST:PORT",
             help="serve the read-only web page (fleet, drift plots, registry, approvals, audit trail) at "
                  "http://HOST:PORT/ (default: none); with --auth-file it asks for an operator token (viewer or "
                  "above), without one HOST must be loopback")
    serve.set_defaults(func=_one_line_errors(serve_command))

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


# ------------------------------------------------------------------ collector serve


def serve_command(args: argparse.Namespace) -> int:
    import sqlite3

    from agent.errors import OutriderError
    from collector.auth import AuthConfig, is_loopback
    from collector.gate import GatePolicy
    from collector.rollup import RetentionPolicy
    from collector.server import serve_collector

    configure_logging(args.log_level)
    auth = None
    if args.auth_file:
        try:
            auth = AuthConfig.from_file(args.auth_file)
        except OutriderError as exc:
            raise UsageError(f"{exc}; fix --auth-file (see 'outrider collector serve --help')") from None
    elif not is_loopback(args.listen):
        raise UsageError(f"refusing to listen on {args.listen} without --auth-file: anyone who can reach it could "
                         "write and read data; pass --auth-file FILE or listen on loopback (e.g. 127.0.0.1:50051)")
    tls = _server_tls(args)
    db = Path(args.db)
    if not db.parent.is_dir():
        raise UsageError(f"directory {db.parent} of --db {db} does not exist; create it or pass another --db")
    retention = RetentionPolicy(raw_seconds=args.raw_retention, minute_seconds=args.minute_retention,
                                hour_seconds=args.hour_retention, day_seconds=args.day_retention,
                                sample_seconds=args.sample_retention)
    check_listen(args.listen)
    if args.http and auth is None and not is_loopback(args.http):
        raise UsageError(f"refusing to serve the web page on {args.http} without --auth-file: anyone who can reach "
                         "it could read everything; pass --auth-file FILE or use loopback (e.g. 127.0.0.1:8080)")
    if args.http:
        try:
            check_listen(args.http)
        except UsageError as exc:
            raise UsageError(str(exc).replace("with --listen", "with --http")) from None
    metrics = _start_metrics(args.metrics)

    with stop_signals() as stop:
        try:
            running = serve_collector(db, args.listen, auth=auth, tls=tls, retention=retention,
                                      rollup_interval=args.rollup_interval, drift_interval=args.drift_interval,
                                      evaluation_keep_seconds=args.evaluation_retention,
                                      webhook=_webhook(args),
                                      gate_policy=GatePolicy(args.gate_accuracy_tolerance, args.gate_mae_tolerance,
                                                             args.gate_latency_budget_ms),
                                      retired_artifact_retention=args.retired_artifact_retention,
                                      retrain_after_evaluations=args.retrain_after_evaluations,
                                      rollback_watch_seconds=args.rollback_watch_seconds,
                                      rollback_action=args.rollback_action, metrics=metrics, http=args.http)
        except OSError as exc:
            flag = "--http" if "web page" in str(exc) else "--listen"
            raise UsageError(f"{_first_line(exc)}; pick a free port on a local address with {flag}") from None
        except (OutriderError, sqlite3.Error) as exc:
            raise UsageError(f"cannot use {db} as the collector's database: {_first_line(exc)}; "
                             "pass another --db") from None
        if auth is None:
            print("outrider: warning: no --auth-file: running unauthenticated, on loopback only",
                  file=sys.stderr, flush=True)
        print(f"collector listening on {running.address} (db {db})", flush=True)
        if running.web is not None:
            print(f"web page on {running.web.url}", flush=True)
        try:
            stop.wait()
        finally:
            running.stop(args.grace_seconds)
            if metrics is not None:
                metrics.close()
    return 0


def _start_metrics(listen: str | None) -> Any:
    if not listen:
        return None
    from agent.metrics import start_for_cli
    from collector.metrics import CollectorMetrics

    metrics = CollectorMetrics()
    start_for_cli(metrics, listen)
    return metrics


def _webhook(args: argparse.Namespace) -> Any:
    from urllib.parse import urlparse

    from collector.webhook import Webhook

    if not args.webhook_url:
        if args.webhook_secret:
            raise UsageError("--webhook-secret needs --webhook-url: pass the URL alerts should be POSTed to")
        return None
    if urlparse(args.webhook_url).scheme not in ("http", "https"):
        raise UsageError(f"--webhook-url {args.webhook_url!r} is not an http(s) URL; pass e.g. https://hooks.example/outrider")
    return Webhook(args.webhook_url, args.webhook_secret or "")


def _server_tls(args: argparse.Namespace) -> Any:
    from collector.auth import TLSFiles

    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together: pass both PEM files")
    paths = [_pem(flag, value) for flag, value in
             (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key), ("--tls-client-ca", args.tls_client_ca))]
    return TLSFiles(*paths)


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
