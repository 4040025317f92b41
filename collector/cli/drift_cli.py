"""Operators' drift commands: ``outrider drift``, ``outrider alerts``, ``outrider drift-config``.

Like every operator command they talk to the collector's OpsService only.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from agent.cli import UsageError, add_flag, positive
from collector.cli.cli import _ask, _ask_pages, _client_flags, age, listing, plain, print_json, table

SPARK = "▁▂▃▄▅▆▇█"


def register(subparsers: argparse._SubParsersAction) -> None:
    drift = subparsers.add_parser(
        "drift", help="a model's drift per column: verdict, PSI, KS, Wasserstein, recent history",
        description="Show the latest drift evaluation of a model (each version with a reference profile): one row "
                    "per column with its verdict and statistics, and a sparkline of its effect size over the last "
                    "evaluations (1 = its threshold). --now evaluates first.")
    drift.add_argument("model", metavar="MODEL", help="model name")
    add_flag(drift, "--version", metavar="V", help="model version (default: every version with a profile)")
    drift.add_argument("--now", action="store_true", help="evaluate now (needs the operator role)")
    add_flag(drift, "--history", default="20", type=positive(int), metavar="N",
             help="evaluations in the sparkline")
    _client_flags(drift)
    drift.set_defaults(func=drift_command)

    alerts = subparsers.add_parser(
        "alerts", help="list drift and performance alerts; 'alerts ack ID' acknowledges one",
        description="List open (and acknowledged) alerts, newest first; --all includes resolved ones, with when "
                    "and why each was resolved (RESOLVED, WHY RESOLVED; resolved_reason in --json).")
    actions = alerts.add_subparsers(dest="alerts_action", metavar="ACTION")
    alerts.add_argument("--model", metavar="NAME", help="only this model's alerts")
    alerts.add_argument("--all", action="store_true", help="include resolved alerts")
    _client_flags(alerts)
    alerts.set_defaults(func=alerts_command, json_list="alerts")
    ack = actions.add_parser("ack", help="acknowledge an alert (it still resolves by itself)",
                             description="Acknowledge an alert: you have seen it. Needs the operator role.")
    ack.add_argument("id", type=int, metavar="ID", help="the alert's id (outrider alerts)")
    ack.add_argument("--note", default="", help="why, or what is being done")
    _client_flags(ack)
    ack.set_defaults(func=ack_command, json_list=None)

    config = subparsers.add_parser(
        "drift-config", help="show or set a model's drift thresholds",
        description="Show a model's drift policy, or replace it with --set (JSON; fields not given take their "
                    "defaults, '{}' restores all defaults). Setting needs the operator role.")
    config.add_argument("model", metavar="MODEL", help="model name")
    config.add_argument("--set", metavar="JSON", help='e.g. \'{"wasserstein_threshold": 0.15, "consecutive": 2}\'')
    _client_flags(config)
    config.set_defaults(func=config_command)


def sparkline(values: list[float]) -> str:
    """Effect size relative to its threshold: ▁ at 0, █ at twice the threshold or more; · not evaluated."""
    return "".join("·" if math.isnan(v) else SPARK[min(len(SPARK) - 1, int(v / 2 * (len(SPARK) - 1) + 0.5))]
                   for v in values)


def _missing(column: Any) -> str:
    """Missing-value rates, reference -> current (infinite values are counted in the test, not here)."""
    if math.isnan(column.missing_rate) or math.isnan(column.reference_missing_rate):
        return "-"
    return f"{column.reference_missing_rate:.1%}→{column.missing_rate:.1%}"


def _span(seconds: float) -> str:
    if not seconds:
        return "-"
    return f"{seconds / 60:g}m" if seconds % 60 == 0 else f"{seconds:g}s"


def _num(value: float, digits: int = 3) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}g}"


def drift_command(args: argparse.Namespace) -> int:
    from collector.monitoring.drift import verdict_label  # late: numpy and the sketches only for this command
    from collector.monitoring.effect import config_of, ratio
    from protos import collector_pb2 as pb

    request = pb.DriftRequest(model_name=args.model, model_version=args.version or "", history=args.history)
    if args.now:
        _ask(args, "EvaluateDrift", request)
    reply = _ask(args, "Drift", request)
    if args.json:
        print_json(plain(reply))
        return 0
    config = config_of(json.loads(_ask(args, "GetDriftConfig", pb.DriftConfigRequest(model_name=args.model))
                                  .config_json))
    now = time.time_ns()
    for latest in reply.latest:
        history = [e for e in reply.history if e.model_version == latest.model_version][::-1] + [latest]
        print(f"{latest.model_name} version {latest.model_version}: evaluated {age(latest.evaluated_unix_nano, now)}, "
              f"{latest.rows} rows — {latest.reason}")
        if not latest.columns:
            continue
        rows = []
        for col in latest.columns:
            series = [next((ratio(c, config) for c in e.columns if c.name == col.name), math.nan)
                      if e.evaluated else math.nan for e in history]
            rows.append([col.name, verdict_label(col), col.method or "-", _span(col.span_seconds), _num(col.psi),
                         _num(col.ks_d), _num(col.ks_p, 2), _num(col.wasserstein), _num(col.js), _missing(col),
                         _num(col.p_adjusted, 2), col.rows, sparkline(series)])
        print(table(["COLUMN", "VERDICT", "METHOD", "SPAN", "PSI", "KS D", "KS P", "WASSERSTEIN", "JS", "MISSING",
                     "P ADJ", "ROWS", "HISTORY"], rows))
        for col in latest.columns:  # why: every drift, and every reference column left uncompared
            if col.drifted or verdict_label(col) == "NOT COMPARED":
                print(f"  {col.name}: {col.reason}")
        if not math.isnan(latest.accuracy) or not math.isnan(latest.mae):
            print(f"realised performance: accuracy {_num(latest.accuracy)} (reference "
                  f"{_num(latest.reference_accuracy)}), MAE {_num(latest.mae)} (reference {_num(latest.reference_mae)})")
        if any(c.name == "estimated_performance" for c in latest.columns):  # the profile has a calibration
            print(f"estimated accuracy (from confidence, no labels): {_num(latest.estimated_accuracy)} (reference "
                  f"{_num(latest.reference_estimated_accuracy)})"
                  + (f"; realised {_num(latest.accuracy)}" if not math.isnan(latest.accuracy) else ""))
        print()
    return 0


def alerts_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    page = _ask_pages(args, "ListAlerts", pb.ListAlertsRequest(model_name=args.model or "",
                                                                include_resolved=args.all), "alerts")
    if args.json:
        print_json(listing("alerts", [plain(a) for a in page.items], page.next_page_token))
        return 0
    if not page.items:
        print("no open alerts" if not args.all else "no alerts")
        return 0
    now = time.time_ns()
    headers = ["ID", "STATE", "MODEL", "COLUMN", "KIND", "OPENED", "BY", "SUMMARY"]
    rows = [[a.id, a.state, f"{a.model_name}@{a.model_version}", a.column, a.kind, age(a.opened_unix_nano, now),
             a.acknowledged_by or "-", a.summary] for a in page.items]
    if any(a.resolved_reason for a in page.items):  # --all: when and why each resolved one was resolved
        headers += ["RESOLVED", "WHY RESOLVED"]
        for row, a in zip(rows, page.items):
            row += [age(a.resolved_unix_nano, now), a.resolved_reason or "-"]
    print(table(headers, rows))
    return 0


def ack_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    reply = _ask(args, "AckAlert", pb.AckAlertRequest(id=args.id, note=args.note))
    if args.json:
        print_json(plain(reply))
    else:
        print(f"alert {reply.id} ({reply.model_name} {reply.model_version} {reply.column}) acknowledged "
              f"by {reply.acknowledged_by}")
    return 0


def config_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    if args.set is not None:
        try:
            json.loads(args.set)
        except ValueError as exc:
            raise UsageError(f"--set is not valid JSON ({exc}); e.g. --set '{{\"consecutive\": 2}}'") from None
        reply = _ask(args, "SetDriftConfig", pb.DriftConfigRequest(model_name=args.model, config_json=args.set))
    else:
        reply = _ask(args, "GetDriftConfig", pb.DriftConfigRequest(model_name=args.model))
    config = json.loads(reply.config_json)
    if args.json:
        print_json({"model_name": reply.model_name, "is_default": reply.is_default, "config": config})
        return 0
    print(f"drift policy of {reply.model_name}" + (" (defaults)" if reply.is_default else "") + ":")
    print(table(["FIELD", "VALUE"], [[k, v] for k, v in config.items()]))
    return 0
