"""``outrider collector serve``: its flags, and starting and stopping the collector.

It registers the ``outrider collector`` group itself (listed in ``agent.cli.OPTIONAL_COMMANDS`` before
``collector.cli.cli``, keeping the help's order), so it uses the operators' helpers and nothing uses it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent.cli import (UsageError, add_flag, add_log_level, check_listen, configure_logging, first_line,
                       listen_address, pem_path, positive, stop_signals)
from collector.cli.cli import COLLECTOR_ENV, DEFAULT_COLLECTOR, non_negative, non_negative_int


def register(subparsers: argparse._SubParsersAction) -> None:
    collector = subparsers.add_parser("collector", help="run the collector that agents stream to",
                                      description="Run the collector: it stores agents' windows and answers operators.")
    commands = collector.add_subparsers(dest="collector_command", metavar="COMMAND", required=True)
    add_serve(commands)


def add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="receive windows from agents and answer operators (gRPC)",
        description="Receive agents' window summaries into a database and answer operators' queries: a SQLite "
                    "file (the default), or PostgreSQL for several collectors sharing one database. "
                    "Without --auth-file it runs unauthenticated and only on a loopback address. "
                    "Stops gracefully on SIGTERM/SIGINT; SIGUSR1 prints every thread's stack to stderr.")
    add_flag(serve, "--db", prefix=COLLECTOR_ENV, default="outrider.db",
             metavar="PATH|URL", help="the SQLite database file, or a PostgreSQL database as "
                                      "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (needs psycopg: "
                                      "pip install 'outrider[postgres]'; prefer the password in ~/.pgpass or "
                                      "PGPASSWORD to one in the URL)")
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
    add_flag(serve, "--raw-retention", prefix=COLLECTOR_ENV, default="3660", type=positive(int), metavar="S",
             help="seconds raw windows are kept before they are merged into minutes; keep it at least a minute "
                  "longer than the drift span (1 h), or every evaluation re-reads the minute a rollup pass changed")
    add_flag(serve, "--minute-retention", prefix=COLLECTOR_ENV, default="86400", type=positive(int), metavar="S",
             help="seconds minute buckets are kept before they are merged into hours")
    add_flag(serve, "--hour-retention", prefix=COLLECTOR_ENV, default="2592000", type=positive(int), metavar="S",
             help="seconds hour buckets are kept before they are merged into days")
    add_flag(serve, "--day-retention", prefix=COLLECTOR_ENV, default="34560000", type=positive(int), metavar="S",
             help="seconds day buckets are kept before they are deleted")
    add_flag(serve, "--sample-retention", prefix=COLLECTOR_ENV, default="604800", type=positive(int), metavar="S",
             help="seconds the rows agents sample (agent serve --sample-rows) are kept for 'outrider data export'")
    add_flag(serve, "--synchronous", prefix=COLLECTOR_ENV, default="full", choices=("full", "normal"),
             type=str.lower,
             help="full: an ack means the window is on disk (the WAL is fsynced at every group commit); "
                  "normal: fsync only at checkpoints, faster, but may lose acked windows on power loss")
    add_flag(serve, "--max-clock-skew", prefix=COLLECTOR_ENV, default="600", type=positive(float), metavar="S",
             help="refuse windows that end more than S seconds after the collector's clock (windows that start "
                  "before --day-retention are refused too: they would be deleted at once)")
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
    add_flag(serve, "--max-reply-mb", prefix=COLLECTOR_ENV, default="3", type=positive(float), metavar="MB",
             help="largest reply to an operator's call, in MiB: list calls continue with page tokens past it "
                  "(gRPC clients refuse replies over 4 MiB unless told otherwise)")
    add_flag(serve, "--collector-id", prefix=COLLECTOR_ENV, type=_collector_id, metavar="ID",
             help="this collector's name among several on one PostgreSQL database (leases, heartbeats, which "
                  "collector holds each agent's stream); default HOST:PID-RANDOM")
    add_flag(serve, "--heartbeat-interval", prefix=COLLECTOR_ENV, default="5", type=positive(float), metavar="S",
             help="seconds between this collector's heartbeats in the database; another collector counts this "
                  "one's agents as connected while its heartbeat is fresh")
    add_flag(serve, "--heartbeat-timeout", prefix=COLLECTOR_ENV, type=positive(float), metavar="S",
             help="a collector whose heartbeat is older than S seconds is gone: its agents are not connected "
                  "(default: 3 heartbeat intervals; use the same value on every collector)")
    add_flag(serve, "--lease-ttl", prefix=COLLECTOR_ENV, type=positive(float), metavar="S",
             help="the background loops (rollups, retention, drift evaluation, alerts, policies) run on one "
                  "collector at a time, under a lease it renews every pass; if it dies the lease lapses after "
                  "S seconds and another collector takes over (default: 3 times the longer of --rollup-interval "
                  "and --drift-interval; must be longer than both)")
    add_flag(serve, "--resync-interval", prefix=COLLECTOR_ENV, default="10", type=positive(float), metavar="S",
             help="on PostgreSQL, seconds between checks for rollouts and profiles made through other collectors "
                  "that no notification brought (a listener that was reconnecting)")
    serve.set_defaults(func=serve_command)


def _collector_id(text: str) -> str:
    from agent.errors import InvalidArgument
    from collector.api.fleet import check_id

    try:
        return check_id(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def serve_command(args: argparse.Namespace) -> int:
    from agent.errors import OutriderError
    from agent.metrics import start_for_cli
    from collector.api.metrics import CollectorMetrics
    from collector.api.server import serve_collector
    from collector.base.auth import AuthConfig, is_loopback
    from collector.base.ingest import Limits
    from collector.lifecycle.gate import GatePolicy
    from collector.store.engine import describe, is_url
    from collector.store.rollup import RetentionPolicy

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
    db: str | Path = args.db
    if not is_url(args.db):
        db = Path(args.db)
        if not db.parent.is_dir():
            raise UsageError(f"directory {db.parent} of --db {db} does not exist; create it or pass another --db")
    retention = RetentionPolicy(raw_seconds=args.raw_retention, minute_seconds=args.minute_retention,
                                hour_seconds=args.hour_retention, day_seconds=args.day_retention,
                                sample_seconds=args.sample_retention)
    _check_fleet_timing(args)
    check_listen(args.listen)
    if args.http and auth is None and not is_loopback(args.http):
        raise UsageError(f"refusing to serve the web page on {args.http} without --auth-file: anyone who can reach "
                         "it could read everything; pass --auth-file FILE or use loopback (e.g. 127.0.0.1:8080)")
    if args.http:
        check_listen(args.http, "--http")
    metrics = start_for_cli(CollectorMetrics, args.metrics)

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
                                      rollback_action=args.rollback_action, metrics=metrics, http=args.http,
                                      max_reply_bytes=int(args.max_reply_mb * 1024 * 1024),
                                      limits=Limits(max_clock_skew_seconds=args.max_clock_skew,
                                                    max_window_age_seconds=float(args.day_retention)),
                                      synchronous=args.synchronous.upper(),
                                      collector_id=args.collector_id or "",
                                      heartbeat_interval=args.heartbeat_interval,
                                      heartbeat_timeout=args.heartbeat_timeout,
                                      resync_interval=args.resync_interval, lease_ttl=args.lease_ttl)
        except OSError as exc:
            flag = "--http" if "web page" in str(exc) else "--listen"
            raise UsageError(f"{first_line(exc)}; pick a free port on a local address with {flag}") from None
        except OutriderError as exc:  # the store's errors too (collector.store.engine)
            raise UsageError(f"cannot use {describe(db)} as the collector's database: {first_line(exc)}; "
                             "fix or pass another --db") from None
        if auth is None:
            print("outrider: warning: no --auth-file: running unauthenticated, on loopback only",
                  file=sys.stderr, flush=True)
        print(f"collector listening on {running.address} (db: {describe(db)})", flush=True)
        if running.web is not None:
            print(f"web page on {running.web.url}", flush=True)
        try:
            stop.wait()
        finally:
            running.stop(args.grace_seconds)
            if metrics is not None:
                metrics.close()
    return 0


def _check_fleet_timing(args: argparse.Namespace) -> None:
    """A heartbeat timeout or lease that lapses between renewals would make agents flicker between
    connected and not, or hand the background loops from collector to collector at every pass."""
    if args.heartbeat_timeout is not None and args.heartbeat_timeout <= args.heartbeat_interval:
        raise UsageError(f"--heartbeat-timeout {args.heartbeat_timeout:g} must be longer than --heartbeat-interval "
                         f"{args.heartbeat_interval:g} (3 intervals is the default)")
    longest = max(args.rollup_interval, args.drift_interval)
    if args.lease_ttl is not None and args.lease_ttl <= longest:
        raise UsageError(f"--lease-ttl {args.lease_ttl:g} must be longer than the longest loop interval "
                         f"({longest:g} s, from --rollup-interval/--drift-interval), or the lease lapses between "
                         "passes; leave it out for 3 intervals")


def _webhook(args: argparse.Namespace) -> Any:
    from urllib.parse import urlparse

    from collector.monitoring.webhook import Webhook

    if not args.webhook_url:
        if args.webhook_secret:
            raise UsageError("--webhook-secret needs --webhook-url: pass the URL alerts should be POSTed to")
        return None
    if urlparse(args.webhook_url).scheme not in ("http", "https"):
        raise UsageError(f"--webhook-url {args.webhook_url!r} is not an http(s) URL; pass e.g. https://hooks.example/outrider")
    return Webhook(args.webhook_url, args.webhook_secret or "")


def _server_tls(args: argparse.Namespace) -> Any:
    from collector.base.auth import TLSFiles

    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together: pass both PEM files")
    paths = [pem_path(flag, value) for flag, value in
             (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key), ("--tls-client-ca", args.tls_client_ca))]
    return TLSFiles(*paths)
