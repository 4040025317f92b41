"""Operators' ``outrider retrain open | list | show | accept | complete | reject | cancel``:
requests to retrain a model version, opened by hand or by the collector's drift policy.

``open → accepted → completed`` (linked to the newly registered version), or
``rejected`` / ``cancelled``. Changing one needs the operator role; every
change is audited and sent to the collector's webhook.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from collector.cli.cli import _ask, _ask_pages, _client_flags, age, listing, plain, print_json, table


def register(subparsers: argparse._SubParsersAction) -> None:
    retrain = subparsers.add_parser(
        "retrain", help="requests to retrain a model version (opened by drift policy or by hand)",
        description="Retraining requests carry their evidence (drifted features, statistics, window range, model "
                    "version) and move open -> accepted -> completed (linked to the new version), or to rejected "
                    "or cancelled. The collector's webhook is told of every change.")
    actions = retrain.add_subparsers(dest="retrain_action", metavar="ACTION", required=True)

    opened = actions.add_parser("open", help="open a retraining request by hand",
                                description="Open a retraining request for VERSION of NAME, saying why.")
    opened.add_argument("name", metavar="NAME", help="model name")
    opened.add_argument("version", metavar="VERSION", help="the model version to retrain")
    opened.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in the audit trail)")
    _client_flags(opened)
    opened.set_defaults(func=open_command)

    lister = actions.add_parser("list", help="list retraining requests",
                                description="List open and accepted retraining requests; --all for closed ones too.")
    lister.add_argument("--all", action="store_true", help="completed, rejected and cancelled requests too")
    lister.add_argument("--model", metavar="NAME", help="only requests about this model")
    _client_flags(lister)
    lister.set_defaults(func=list_command, json_list="requests")

    show = actions.add_parser("show", help="show one request with its evidence",
                              description="Show retraining request ID with its evidence.")
    show.add_argument("id", type=int, metavar="ID", help="the request's id (outrider retrain list)")
    _client_flags(show)
    show.set_defaults(func=show_command)

    for action, method, text in (("accept", "AcceptRetraining", "accept an open request"),
                                 ("complete", "CompleteRetraining", "complete an accepted request with the new version"),
                                 ("reject", "RejectRetraining", "reject an open or accepted request, saying why"),
                                 ("cancel", "CancelRetraining", "cancel an open or accepted request")):
        p = actions.add_parser(action, help=text, description=f"{text[0].upper()}{text[1:]} (operator role).")
        p.add_argument("id", type=int, metavar="ID", help="the request's id (outrider retrain list)")
        if action == "complete":
            p.add_argument("--version", type=int, required=True, metavar="N",
                           help="the newly registered version of the same model that answers the request")
        p.add_argument("--reason", required=action == "reject", default="", metavar="TEXT",
                       help="why (kept in the audit trail)" + ("" if action == "reject" else "; optional"))
        _client_flags(p)
        p.set_defaults(func=_changer(method), method=method)


def _plain(r: Any) -> dict[str, Any]:
    out = plain(r)
    text = out.pop("evidence_json", "")
    out["evidence"] = json.loads(text) if text else None
    return out


def _print(r: Any) -> None:
    now = time.time_ns()
    print(f"retraining request {r.id}: {r.model_name} version {r.model_version} is {r.state}")
    print(f"  opened:   by {r.opened_by}, {age(r.opened_unix_nano, now)}: {r.reason}")
    if r.decided_by:
        print(f"  changed:  by {r.decided_by}, {age(r.decided_unix_nano, now)}" + (f": {r.note}" if r.note else ""))
    if r.completed_version:
        print(f"  new version: {r.completed_version}")
    evidence = json.loads(r.evidence_json or "{}")
    if evidence.get("features"):
        print(f"  drifted:  {', '.join(evidence['features'])}")
    window = evidence.get("window") or {}
    if window.get("end_unix_nano"):
        print(f"  window:   {age(window['start_unix_nano'], now)} to {age(window['end_unix_nano'], now)} "
              f"({window.get('rows', 0)} rows)")


def _reply(args: argparse.Namespace, reply: Any) -> int:
    if args.json:
        print_json(_plain(reply))
        return 0
    _print(reply)
    return 0


def open_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    return _reply(args, _ask(args, "OpenRetraining", pb.OpenRetrainingRequest(
        model_name=args.name, model_version=args.version, reason=args.reason)))


def show_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    return _reply(args, _ask(args, "ShowRetraining", pb.RetrainingChange(id=args.id)))


def _changer(method: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from protos import collector_pb2 as pb

        return _reply(args, _ask(args, method, pb.RetrainingChange(id=args.id, reason=args.reason,
                                                                     version=getattr(args, "version", 0) or 0)))
    return run


def list_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    page = _ask_pages(args, "ListRetraining", pb.ListRetrainingRequest(include_closed=args.all,
                                                                        model_name=args.model or ""), "requests")
    if args.json:
        print_json(listing("requests", [_plain(r) for r in page.items], page.next_page_token))
        return 0
    if not page.items:
        print("no open retraining requests" if not args.all else "no retraining requests")
        return 0
    now = time.time_ns()
    print(table(["ID", "MODEL", "VERSION", "STATE", "OPENED BY", "OPENED", "REASON", "CHANGED BY", "NEW VERSION"],
                [[r.id, r.model_name, r.model_version, r.state, r.opened_by, age(r.opened_unix_nano, now), r.reason,
                  r.decided_by or "-", r.completed_version or "-"] for r in page.items]))
    return 0
