"""Operators' ``outrider rollback``, ``outrider rollouts`` and ``outrider rollout show``.

A rollback is immediate (no approval: it returns to a version that was approved
before) and needs the operator role. Each rollout lists every managed agent it
was sent to with its answer: pending, ok, or failed with the agent's error;
``rollback --wait`` follows them until all have answered.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from agent.cli import UsageError, add_flag
from agent.cli_contract import EXIT_FAILED, CommandError, say
from collector.cli.cli import (_ask, _ask_pages, _client_flags, add_paging, age, iso, listing, non_negative, plain,
                               print_json, print_page, table)

POLL_SECONDS = 0.5
PAGE_LIMIT = 1000  # the most rollouts the collector gives per ListRollouts call (collector.lifecycle.rollout.MAX_LIST_LIMIT)


def register(subparsers: argparse._SubParsersAction) -> None:
    rollback = subparsers.add_parser(
        "rollback", help="make the previous (or a named archived) version production again, at once",
        description="Make the version of NAME that was production before the current one (or archived VERSION, "
                    "with --to) production again and push it to the model's managed agents; the current version "
                    "is archived. No approval is needed: the version was approved before. Retired versions can "
                    "never be rolled back to. With --wait, follows every agent's answer and exits 1 if any "
                    "failed or did not answer in time.")
    rollback.add_argument("name", metavar="NAME", help="model name")
    rollback.add_argument("--to", type=int, default=0, metavar="VERSION",
                          help="the archived version to return to (default: the previous production version)")
    rollback.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in the audit trail)")
    add_flag(rollback, "--wait", type=non_negative, default="0", metavar="SECONDS",
             help="wait up to SECONDS for every agent to answer (0: do not wait)")
    _client_flags(rollback)
    rollback.set_defaults(func=rollback_command)

    rollouts = subparsers.add_parser(
        "rollouts", help="list pushes of versions and shadows to agents, newest first",
        description="List rollouts (promotions, rollbacks, shadow changes) of NAME, or of every model, newest "
                    "first, with how many agents answered ok, failed or are pending.")
    rollouts.add_argument("name", nargs="?", default="", metavar="NAME", help="only this model")
    add_paging(rollouts, 50, "rollouts, the newest")
    _client_flags(rollouts)
    rollouts.set_defaults(func=list_command, json_list="rollouts")

    one = subparsers.add_parser("rollout", help="show one rollout and every agent's answer",
                                description="Show a rollout: what was pushed, by whom and why, and each agent's "
                                            "answer.")
    actions = one.add_subparsers(dest="rollout_action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="show a rollout and every agent's answer",
                              description="Show rollout ID and each agent's answer (pending, ok, failed).")
    show.add_argument("id", type=int, metavar="ID", help="the rollout's id (outrider rollouts)")
    _client_flags(show)
    show.set_defaults(func=show_command)


# ------------------------------------------------------------------ output


def _counts(r: Any) -> dict[str, int]:
    counts = {"ok": 0, "failed": 0, "pending": 0}
    for a in r.agents:
        counts[a.state] = counts.get(a.state, 0) + 1
    return counts


def _what(r: Any) -> str:
    if r.kind in ("promote", "rollback"):
        return f"{r.kind} {r.model_name} to version {r.version}" + (f" (from {r.from_version})" if r.from_version
                                                                    else "")
    if r.kind == "shadow":
        return f"shadow {r.model_name} version {r.version} on {r.share:.0%} of requests"
    return f"unshadow {r.model_name} (version {r.version})"


def _ack_line(a: Any) -> str:
    return f"  {a.agent_id} run {a.run_id[:8]}: {a.state}" + (f": {a.error}" if a.error else "")


def _print_rollout(r: Any) -> None:
    print(f"rollout {r.id}: {_what(r)}")
    print(f"  by {r.actor}, {age(r.started_unix_nano, time.time_ns())} ({iso(r.started_unix_nano)}): {r.reason}")
    if not r.agents:
        print("  no managed agent of this model was connected; agents that connect later get it")
        return
    now = time.time_ns()
    print(table(["AGENT", "RUN", "STATE", "ANSWERED", "ERROR"],
                [[a.agent_id, a.run_id[:8], a.state, age(a.unix_nano, now) if a.unix_nano else "-", a.error or "-"]
                 for a in r.agents]))


# ------------------------------------------------------------------ commands


def _wait(args: argparse.Namespace, made: Any) -> Any:
    """Poll the rollout until no agent is pending or --wait has passed, printing each answer as it comes."""
    from protos import collector_pb2 as pb

    deadline = time.monotonic() + args.wait
    told: set[tuple[str, str]] = set()
    current = made
    while True:
        for a in current.agents:
            if a.state != "pending" and (a.agent_id, a.run_id) not in told:
                told.add((a.agent_id, a.run_id))
                if not args.json:
                    print(_ack_line(a), flush=True)
        if not any(a.state == "pending" for a in current.agents) or time.monotonic() >= deadline:
            return current
        time.sleep(POLL_SECONDS)
        try:
            current = _ask(args, "ShowRollout", pb.ShowRolloutRequest(id=made.id))
        except CommandError as exc:  # the rollback itself is made: say where to follow it
            raise type(exc)(f"{exc}; the rollback was made, follow it with: outrider rollout show {made.id}") from None


def rollback_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    if not 0 <= args.to < 2**32:
        raise UsageError(f"--to must be a version number (outrider models list {args.name}), got {args.to}")
    made = _ask(args, "Rollback", pb.RollbackRequest(model_name=args.name, to_version=args.to, reason=args.reason))
    if not args.json:
        print(f"rolled back {made.model_name} to version {made.version} (version {made.from_version} archived): "
              f"rollout {made.id}, sent to {len(made.agents)} agent(s)")
    if not args.wait:
        if args.json:
            print_json(plain(made))
        elif made.agents:
            print(f"follow the agents' answers with: outrider rollout show {made.id}")
        return 0
    final = _wait(args, made)
    counts = _counts(final)
    if args.json:
        print_json(plain(final))
    else:
        for a in final.agents:
            if a.state == "pending":
                print(f"  {a.agent_id} run {a.run_id[:8]}: no answer within {args.wait:g} s")
        print(f"{counts['ok']} ok, {counts['failed']} failed, {counts['pending']} without an answer")
    if counts["failed"] or counts["pending"]:
        say(f"outrider: error: not every agent serves {final.model_name} version {final.version}; "
            f"see: outrider rollout show {final.id}")
        return EXIT_FAILED
    return 0


def list_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    page = _ask_pages(args, "ListRollouts", pb.ListRolloutsRequest(model_name=args.name), "rollouts",
                      limit=args.limit, page_limit=PAGE_LIMIT)
    if args.json:
        print_json(listing("rollouts", [plain(r) for r in page.items], page.next_page_token))
        return 0
    if not page.items:
        print("no rollouts" + (f" of {args.name}" if args.name else ""))
        return 0
    now = time.time_ns()
    rows = []
    for r in page.items:
        c = _counts(r)
        rows.append([r.id, r.model_name, r.kind, r.version, r.from_version or "-", r.actor,
                     age(r.started_unix_nano, now), f"{c['ok']} ok, {c['failed']} failed, {c['pending']} pending",
                     r.reason])
    print(table(["ID", "MODEL", "KIND", "VERSION", "FROM", "BY", "STARTED", "AGENTS", "REASON"], rows))
    print_page(args, page, len(rows))
    return 0


def show_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    if not 0 < args.id < 2**63:
        raise UsageError(f"ID must be a rollout's id (outrider rollouts), got {args.id}")
    reply = _ask(args, "ShowRollout", pb.ShowRolloutRequest(id=args.id))
    if args.json:
        print_json(plain(reply))
        return 0
    _print_rollout(reply)
    return 0
