"""Operators' ``outrider audit`` (list the trail) and ``outrider audit verify`` (check its hash chain).

Like every operator command they talk to the collector's OpsService only.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from agent.cli_contract import EXIT_FAILED, say
from collector.cli.cli import (PAGE_LIMIT, _ask, _ask_pages, _client_flags, add_paging, iso, listing, plain, print_json,
                               print_page, table)


def register(subparsers: argparse._SubParsersAction) -> None:
    audit = subparsers.add_parser(
        "audit", help="list the audit trail; 'audit verify' checks that nobody edited it",
        description="List audited state changes, newest first: who did what to which object, when, "
                    "from what to what, and why (the table shows only the fields that changed; --json everything).")
    actions = audit.add_subparsers(dest="audit_action", metavar="ACTION")
    audit.add_argument("--model", metavar="NAME", help="only entries about this model")
    add_paging(audit, 100, "entries, the newest")
    _client_flags(audit)
    audit.set_defaults(func=list_command, json_list="entries")
    verify = actions.add_parser(
        "verify", help="check the audit trail's hash chain; exit 1 naming the first broken row",
        description="Walk the audit trail's hash chain. Exit 0 when it is intact; exit 1 with one line naming "
                    "the first row that was edited, or that follows deleted rows.")
    _client_flags(verify)
    verify.set_defaults(func=verify_command, json_list=None)


def change(before: str, after: str) -> str:
    """``before → after``; for two JSON objects only the keys that differ, so a policy change reads at a glance."""
    try:
        old, new = json.loads(before or "null"), json.loads(after or "null")
    except ValueError:
        return f"{before or '-'} → {after or '-'}"
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        old, new = {k: old[k] for k in keys if k in old}, {k: new[k] for k in keys if k in new}
        if not keys:
            return "(unchanged)"
    return f"{_compact(old)} → {_compact(new)}"


def _compact(value: Any) -> str:
    return "-" if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


def list_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    page = _ask_pages(args, "ListAudit", pb.ListAuditRequest(model_name=args.model or ""), "entries",
                      limit=args.limit, page_limit=PAGE_LIMIT)
    if args.json:
        print_json(listing("entries", [plain(e) for e in page.items], page.next_page_token))
        return 0
    if not page.items:
        print("no audit entries" + (f" about {args.model}" if args.model else ""))
        return 0
    print(table(["ID", "TIME", "ACTOR", "ACTION", "OBJECT", "BEFORE → AFTER", "REASON"],
                [[e.id, iso(e.at_unix_nano), e.actor, e.action, e.object, change(e.before, e.after), e.reason or "-"]
                 for e in page.items]))
    print_page(args, page, len(page.items))
    return 0


def verify_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    reply = _ask(args, "VerifyAudit", pb.VerifyAuditRequest())
    if args.json:
        print_json(plain(reply))
    elif reply.ok:
        print(f"audit trail intact: {reply.entries} entries")
    if reply.ok:
        return 0
    say(f"outrider: error: audit trail broken at row {reply.first_broken_id}: {reply.problem}")
    return EXIT_FAILED
