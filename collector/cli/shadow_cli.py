"""Operators' ``outrider shadow start | stop | report``: a staging version beside production.

The shadow version sees a share of the live requests on the model's managed
agents; its outputs are discarded, and how it compares with production
(label agreement, score differences, latency, requests it had to skip) is
summarised in each production window. ``report`` shows both side by side.
Starting and stopping need the operator role; reading the report, viewer.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

from collector.cli.cli import _ask, _client_flags, iso, plain, print_json, since_time, table


def share(text: str) -> float:
    """An argparse type: a share of requests, more than 0 and at most 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and at most 1 (0.1: a tenth of requests)")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    shadow = subparsers.add_parser(
        "shadow", help="run a staging version in shadow beside production, and compare them",
        description="A shadow version sees a share of live requests on the model's managed agents; its outputs "
                    "are discarded and compared with production's (label agreement, score difference, latency).")
    actions = shadow.add_subparsers(dest="shadow_action", metavar="ACTION", required=True)

    start = actions.add_parser("start", help="put a staging version in shadow (operator role)",
                               description="Put staging VERSION of NAME in shadow on the model's managed agents, "
                                           "replacing any shadow that runs.")
    start.add_argument("name", metavar="NAME", help="model name")
    start.add_argument("version", type=int, metavar="VERSION", help="a staging version of the model")
    start.add_argument("--share", type=share, default=0.1, metavar="X",
                       help="share of live requests the shadow also answers, in (0, 1] (default: 0.1)")
    start.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in the audit trail)")
    _client_flags(start)
    start.set_defaults(func=start_command)

    stop = actions.add_parser("stop", help="stop the model's shadow (operator role)",
                              description="Stop the shadow of NAME on its managed agents.")
    stop.add_argument("name", metavar="NAME", help="model name")
    stop.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in the audit trail)")
    _client_flags(stop)
    stop.set_defaults(func=stop_command)

    report = actions.add_parser(
        "report", help="production and shadow side by side",
        description="Compare the shadow version with production over the same requests: calls, label agreement, "
                    "score difference quantiles (shadow minus production), latency p50/p99, skipped requests.")
    report.add_argument("name", metavar="NAME", help="model name")
    report.add_argument("--version", type=int, default=0, metavar="V",
                        help="the shadow version (default: the one running now, else the latest one)")
    report.add_argument("--since", type=since_time, metavar="WHEN",
                        help="windows ending at or after WHEN: a duration back from now (30m, 1h, 2d) or a time "
                             "(2026-11-26T10:00:00Z); default: since the shadow started")
    _client_flags(report)
    report.set_defaults(func=report_command)


def _rollout_line(made: Any) -> str:
    return f"rollout {made.id}, sent to {len(made.agents)} managed agent(s)" + (
        "" if made.agents else "; agents that connect later get it")


def start_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    made = _ask(args, "SetShadow", pb.SetShadowRequest(model_name=args.name, version=args.version, share=args.share,
                                                       reason=args.reason))
    if args.json:
        print_json(plain(made))
        return 0
    print(f"shadow of {made.model_name}: version {made.version} on {made.share:.0%} of requests "
          f"({_rollout_line(made)})")
    print(f"compare it with production with: outrider shadow report {made.model_name}")
    return 0


def stop_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    made = _ask(args, "ClearShadow", pb.SetShadowRequest(model_name=args.name, reason=args.reason))
    if args.json:
        print_json(plain(made))
        return 0
    print(f"shadow of {made.model_name} (version {made.version}) stopped ({_rollout_line(made)})")
    return 0


def _ms(us: float) -> str:
    return "-" if math.isnan(us) else f"{us / 1000:.3g} ms"


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1%}"


def _diff(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:+.4f}"


def report_command(args: argparse.Namespace) -> int:
    from collector.monitoring.shadow import figures
    from protos import collector_pb2 as pb

    reply = _ask(args, "ShadowReport", pb.ShadowReportRequest(model_name=args.name, version=args.version,
                                                             since_unix_nano=args.since or 0))
    f = figures(reply)
    if args.json:
        print_json({**plain(reply), "figures": f.to_dict()})
        return 0
    since = f"since {iso(args.since)}" if args.since else "since the shadow started"
    production = reply.production_version or "-"
    print(f"{reply.model_name}: shadow version {reply.shadow_version} beside production version {production}, {since}")
    if not f.shadow_calls and not f.skipped and not f.shadow_errors:
        print("no shadow traffic in that time: are managed agents serving the model, with requests coming in?")
        return 0
    print(table(["", "PRODUCTION", "SHADOW"], [
        ["calls", str(f.production_calls), f"{f.shadow_calls} ({_pct(f.shadow_share)} of production)"],
        ["errors", "-", str(f.shadow_errors)],
        ["skipped (queue full)", "-", f"{f.skipped} ({_pct(f.skipped_share)} of those chosen)"],
        ["latency p50", _ms(f.production_latency_p50_us), _ms(f.shadow_latency_p50_us)],
        ["latency p99", _ms(f.production_latency_p99_us), _ms(f.shadow_latency_p99_us)],
        ["label agreement", "-", f"{_pct(f.agreement)} of {f.label_rows} rows" if f.label_rows else "-"],
        ["score diff p5 / p50 / p95", "-",
         " / ".join(_diff(x) for x in (f.score_diff_p5, f.score_diff_p50, f.score_diff_p95))],
    ]))
    return 0
