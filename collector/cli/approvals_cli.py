"""Operators' ``outrider approvals list``, ``outrider approve ID`` and ``outrider reject ID``:
deciding requests to promote a model version to production (made with ``outrider models promote``).

The collector enforces the rules: deciding needs the approver role, and nobody
approves their own request; the identity is the operator token's.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from collector.cli.cli import _ask, _ask_pages, _client_flags, age, listing, plain, print_json, table


def register(subparsers: argparse._SubParsersAction) -> None:
    approvals = subparsers.add_parser(
        "approvals", help="list requests to promote model versions to production",
        description="List promotion requests (pending ones; --all for decided ones too). Approve one with "
                    "'outrider approve ID', reject it with 'outrider reject ID --reason TEXT'.")
    actions = approvals.add_subparsers(dest="approvals_action", metavar="ACTION", required=True)
    lister = actions.add_parser("list", help="list promotion and rollback requests",
                                 description="List requests, oldest first: pending ones, or all with --all. KIND is "
                                             "promote (make a version production) or rollback (make an archived "
                                             "version production again; opened by the rollback policy).")
    lister.add_argument("--all", action="store_true", help="decided requests too")
    lister.add_argument("--model", metavar="NAME", help="only requests about this model")
    _client_flags(lister)
    lister.set_defaults(func=list_command, json_list="approvals")
    cancel = actions.add_parser("cancel", help="withdraw a pending request (its requester, or an admin)",
                                description="Cancel pending request ID, saying why. Only whoever requested it, or "
                                            "an admin, may cancel it; an approver who disagrees rejects it instead.")
    cancel.add_argument("id", type=int, metavar="ID", help="the request's id (outrider approvals list)")
    cancel.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in the audit trail)")
    _client_flags(cancel)
    cancel.set_defaults(func=cancel_command)

    approve = subparsers.add_parser(
        "approve", help="approve a promotion request (approver role; not your own request)",
        description="Approve pending request ID: its version becomes production (for a rollback request: again) "
                    "and the previous production version is archived. Needs the approver role, and someone other "
                    "than the requester.")
    approve.add_argument("id", type=int, metavar="ID", help="the request's id (outrider approvals list)")
    approve.add_argument("--reason", default="", metavar="TEXT", help="a note for the audit trail")
    _client_flags(approve)
    approve.set_defaults(func=approve_command)

    reject = subparsers.add_parser(
        "reject", help="reject a promotion request (approver role)",
        description="Reject pending request ID, saying why. The version keeps its stage.")
    reject.add_argument("id", type=int, metavar="ID", help="the request's id (outrider approvals list)")
    reject.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in the audit trail)")
    _client_flags(reject)
    reject.set_defaults(func=reject_command)


def list_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    page = _ask_pages(args, "ListApprovals", pb.ListApprovalsRequest(include_decided=args.all,
                                                                      model_name=args.model or ""), "approvals")
    if args.json:
        print_json(listing("approvals", [plain(a) for a in page.items], page.next_page_token))
        return 0
    if not page.items:
        print("no pending promotion requests" if not args.all else "no promotion requests")
        return 0
    now = time.time_ns()
    print(table(["ID", "KIND", "MODEL", "VERSION", "STATE", "REQUESTED BY", "REQUESTED", "REASON", "DECIDED BY",
                 "DECISION"],
                [[a.id, a.kind or "promote", a.model_name, a.version,
                  a.state + (" (gate overridden)" if a.gate_override_reason else ""),
                  a.requested_by, age(a.requested_unix_nano, now), a.reason, a.decided_by or "-",
                  a.decision_reason or "-"] for a in page.items]))
    return 0


def _decided(args: argparse.Namespace, reply: Any) -> int:
    if args.json:
        print_json(plain(reply))
        return 0
    if reply.state == "cancelled":
        print(f"approval {reply.id} cancelled: {reply.model_name} version {reply.version} keeps its stage")
    elif reply.state == "approved" and reply.kind == "rollback":
        print(f"approval {reply.id} approved: {reply.model_name} version {reply.version} is now production again "
              f"(rolled back to version {reply.version})")
    elif reply.state == "approved":
        print(f"approval {reply.id} approved: {reply.model_name} version {reply.version} is now production")
    else:
        print(f"approval {reply.id} rejected: {reply.model_name} version {reply.version} keeps its stage")
    return 0


def approve_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    return _decided(args, _ask(args, "Approve", pb.DecisionRequest(id=args.id, reason=args.reason)))


def reject_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    return _decided(args, _ask(args, "Reject", pb.DecisionRequest(id=args.id, reason=args.reason)))


def cancel_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    return _decided(args, _ask(args, "CancelApproval", pb.DecisionRequest(id=args.id, reason=args.reason)))
