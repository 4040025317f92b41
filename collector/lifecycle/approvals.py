"""Model versions' stages and the two-person approval of promotions to production.

Stages: ``candidate`` (on register) → ``staging`` → ``production`` →
``archived`` → ``retired``. Operators move a version between candidate and
staging themselves (``set_stage``). Production is reached only through a
request (``request``) that another person with the approver role approves
(``decide``): the version becomes production and the previous production
version archived, in one transaction with the request's new state and their
audit rows. A version whose gate did not pass can be requested only with an
admin's written override, itself audited. A request may also be a rollback
(kind 'rollback', opened by the rollback policy with ``request_rollback``):
approved, it is carried out by ``collector.lifecycle.rollout.rollback``.

A shadow runs a staging version only (rules in ``collector.lifecycle.rollout``): promoting
the shadowed version stops its shadow in the same transaction; moving it back
to candidate, or retiring a version still in shadow, is refused until the
shadow is stopped.

Every function here takes the writer's ``db`` and runs inside ``Store.write``
(or reads through ``Store.read``); who may call which is checked by the
caller (the servicer): roles by the auth interceptor, the admin-only override
and "not your own request" here, given the caller's identity.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from collector.store.engine import Conn

from agent.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from collector.base.auth import LOCAL
from collector.lifecycle import rollout, stages
from collector.store import audit, governance, versions
from protos import collector_pb2 as pb

STAGES = ("candidate", "staging", "production", "archived", "retired")
REQUESTABLE = ("candidate", "staging")  # stages a promotion can be requested from
STATES = ("pending", "approved", "rejected", "cancelled")
MAX_REASON_CHARS = 2000


def check_reason(reason: str, what: str, required: bool = True) -> str:
    reason = reason.strip()
    if required and not reason:
        raise InvalidArgument(f"{what} needs a reason (--reason TEXT): say why, for the audit trail")
    if len(reason) > MAX_REASON_CHARS:
        raise InvalidArgument(f"the reason is {len(reason)} characters; at most {MAX_REASON_CHARS} are kept")
    return reason


def set_stage(db: Conn, name: str, version: int, stage: str, actor: str, reason: str, now_ns: int) -> None:
    """candidate ↔ staging; any other move has its own command."""
    if stage not in STAGES:
        raise InvalidArgument(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    if stage not in REQUESTABLE:
        how = {"production": f"request it with: outrider models promote {name} {version} --reason TEXT "
                             "(another approver must approve)",
               "archived": "a version is archived when another one is promoted to production",
               "retired": "retire archived versions with: outrider models retire"}[stage]
        raise FailedPrecondition(f"cannot set stage {stage} directly: {how}")
    audit.take_turn(db)
    row = stages.version(db, name, version)
    _not_retired(row)
    if row["stage"] not in REQUESTABLE:
        raise FailedPrecondition(f"{name} version {version} is {row['stage']}; only candidate and staging "
                                 "versions move between candidate and staging")
    if row["stage"] == stage:
        raise FailedPrecondition(f"{name} version {version} is already {stage}")
    _not_shadowed(db, name, version, f"moving it to {stage}")
    stages.move(db, name, version, row["stage"], stage, actor, reason, now_ns)


def _not_shadowed(db: Conn, name: str, version: int, doing: str) -> None:
    if rollout.shadowed(db, name, version):
        raise FailedPrecondition(f"{name} version {version} runs in shadow; stop the shadow before {doing}: "
                                 f"outrider shadow stop {name} --reason TEXT")


def _not_retired(row: dict[str, Any], then: str = "") -> None:
    if row["stage"] == "retired":
        raise FailedPrecondition(f"{row['name']} version {row['version']} is retired; a retired version can never "
                                 f"be promoted, served or given another stage{then}")


def retire(db: Conn, name: str, version: int, actor: str, reason: str, now_ns: int) -> None:
    """archived → retired, for good: the version can never be promoted, served or restaged again
    (also enforced by a trigger); its record and audit rows stay, its artifact may be removed
    after the retention period (``Registry.remove_retired_artifacts``)."""
    audit.take_turn(db)
    row = stages.version(db, name, version)
    if row["stage"] != "archived":
        raise FailedPrecondition(f"{name} version {version} is {row['stage']}; only archived versions can be "
                                 "retired" + (" (it already is)" if row["stage"] == "retired" else ""))
    _not_shadowed(db, name, version, "retiring it")
    versions.retire(db, name, version, reason, now_ns)
    audit.append(db, actor, "model.retire", f"model/{name}/{version}", model_name=name,
                 before={"stage": "archived"}, after={"stage": "retired"}, reason=reason, now_ns=now_ns)


def _failed_checks(row: dict[str, Any]) -> list[str]:
    if not row["gate"]:
        return ["not run"]
    return [c["name"] for c in json.loads(row["gate"]).get("checks", []) if not c["passed"]]


def request(db: Conn, name: str, version: int, actor: str, reason: str, override: str,
            now_ns: int) -> pb.Approval:
    """A pending request to make ``version`` production. ``override`` (non-empty only when an
    admin asked) lets a version whose gate did not pass be requested."""
    audit.take_turn(db)
    row = stages.version(db, name, version)
    _not_retired(row)
    if row["stage"] not in REQUESTABLE:
        raise FailedPrecondition(f"{name} version {version} is {row['stage']}; only candidate and staging "
                                 "versions can be promoted")
    pending = governance.pending_promotion(db, name, version)
    if pending:
        raise FailedPrecondition(f"{name} version {version} already has a pending promotion request "
                                 f"(approval {pending})")
    passed = bool(row["gate"]) and bool(row["gate_passed"])
    if passed and override:
        raise InvalidArgument(f"the gate of {name} version {version} passed: there is nothing to override")
    if not passed and not override:
        raise FailedPrecondition(
            f"the evaluation gate of {name} version {version} has not passed ({', '.join(_failed_checks(row))}); "
            "fix the model, or an admin may override with --override-gate REASON")
    approval_id = governance.insert_approval(db, name, version, actor, now_ns, reason, gate_override=override)
    if override:
        audit.append(db, actor, "model.gate_override", f"model/{name}/{version}", model_name=name,
                     before={"gate_passed": False, "failed": _failed_checks(row)},
                     after={"approval": approval_id}, reason=override, now_ns=now_ns)
    audit.append(db, actor, "approval.request", f"approval/{approval_id}", model_name=name, before=None,
                 after={"state": "pending", "model": name, "version": version, "stage": "production",
                        **({"gate_override": True} if override else {})}, reason=reason, now_ns=now_ns)
    return get(db, approval_id)


def decide(db: Conn, approval_id: int, actor: str, approve: bool, reason: str, now_ns: int) -> pb.Approval:
    """Approve (the version becomes production, the previous production version archived, and a
    rollout starts: kind "promote", or "rollback" for a rollback request) or reject a pending
    request. Nobody decides their own request. A shadow of the promoted version stops in the same
    transaction (an unshadow rollout). The caller pushes the rollouts after the commit (they share
    ``now_ns``, the approval's ``decided_unix_nano``: ``RolloutPusher.push_started``)."""
    audit.take_turn(db)  # two collectors deciding at once: the second reads what the first committed
    a = governance.approval(db, approval_id)
    if a is None:
        raise NotFound(f"there is no approval {approval_id}; list them with: outrider approvals list --all")
    if a["state"] != "pending":
        raise FailedPrecondition(f"approval {approval_id} is already {a['state']}"
                                 + (f" (by {a['decided_by']})" if a["decided_by"] else "")
                                 + "; only pending requests can be decided")
    if approve and a["requested_by"] == actor:
        raise PermissionDenied(own_request(approval_id, actor))
    name, version = a["model"], a["version"]
    state = "approved" if approve else "rejected"
    if approve and a["kind"] == "rollback":  # checked again now: the versions may have moved since the request
        rollout.rollback(db, name, version, actor, f"approval {approval_id}: {a['reason']}", now_ns)
    elif approve:
        row = stages.version(db, name, version)
        _not_retired(row, "; reject this request")
        if row["stage"] not in REQUESTABLE:
            raise FailedPrecondition(f"{name} version {version} is now {row['stage']}; only candidate and staging "
                                     "versions can be promoted (reject this request)")
        if not (row["gate"] and row["gate_passed"]) and not a["gate_override"]:
            raise FailedPrecondition(f"the evaluation gate of {name} version {version} no longer passes "
                                     f"({', '.join(_failed_checks(row))}); reject this request")
        current = versions.production(db, name)
        previous = current["version"] if current else 0
        if previous:
            stages.move(db, name, previous, "production", "archived", actor,
                        f"replaced by version {version} (approval {approval_id})", now_ns)
        stages.move(db, name, version, row["stage"], "production", actor, f"approval {approval_id}: {a['reason']}",
                    now_ns)
        # the caller pushes it to the agents after the commit (RolloutPusher.push_started)
        rollout.start_rollout(db, name, version, "promote", actor, f"approval {approval_id}: {a['reason']}", now_ns,
                              from_version=previous)
        # a shadow runs staging versions only: it stops with the promotion (pushed with it, same started_ns)
        rollout.clear_shadow_of(db, name, [version], actor, "promoted to production", now_ns)
        rollout.clear_shadow_of(db, name, [previous], actor, f"archived: replaced by version {version}", now_ns)
    governance.decide_approval(db, approval_id, state, actor, now_ns, reason)
    audit.append(db, actor, f"approval.{'approve' if approve else 'reject'}", f"approval/{approval_id}",
                 model_name=name, before={"state": "pending"},
                 after={"state": state, "model": name, "version": version, "kind": a["kind"]}, reason=reason,
                 now_ns=now_ns)
    return get(db, approval_id)


def own_request(approval_id: int, actor: str) -> str:
    """Why ``actor`` may not approve approval ``approval_id``, their own request, and what to do."""
    text = f"the requester cannot approve their own request: another approver must approve approval {approval_id}"
    if actor == LOCAL.name:  # no auth file: everyone is 'local', so the second person can never come
        text += ("; without --auth-file every caller is the same identity 'local', so nobody else can: for "
                 "two-person approval run the collector with --auth-file listing two operator tokens, one with "
                 "role approver, and have each person pass their own --token (see docs/governance.md, "
                 "'One person, or two identities')")
    return text


def request_rollback(db: Conn, name: str, to_version: int, actor: str, reason: str, now_ns: int) -> pb.Approval:
    """A pending request (kind 'rollback') to make archived ``to_version`` production again (0: the
    version production before the current one, resolved now so that the approver sees which);
    ``decide`` carries it out when another person approves it. For the rollback policy, whose
    actor is ``audit.COLLECTOR``."""
    audit.take_turn(db)
    current, target = rollout.rollback_target(db, name, to_version)
    pending = governance.pending_rollback(db, name)
    if pending:
        raise FailedPrecondition(f"{name} already has a pending rollback request (approval {pending})")
    approval_id = governance.insert_approval(db, name, target, actor, now_ns, reason, kind="rollback")
    audit.append(db, actor, "approval.request", f"approval/{approval_id}", model_name=name, before=None,
                 after={"state": "pending", "model": name, "version": target, "stage": "production",
                        "kind": "rollback", "from_version": current}, reason=reason, now_ns=now_ns)
    return get(db, approval_id)


def get(db: Conn, approval_id: int) -> pb.Approval:
    row = governance.approval(db, approval_id)
    if row is None:
        raise NotFound(f"there is no approval {approval_id}")
    return _message(row)


def listing(db: Conn, include_decided: bool = False, model_name: str = "") -> list[pb.Approval]:
    """Pending requests (every request with ``include_decided``), of ``model_name`` if given, oldest first."""
    return [a for _, a in listing_rows(db, include_decided, model_name)]


def listing_rows(db: Conn, include_decided: bool = False, model_name: str = "", *,
                 after_id: int = 0) -> Iterator[tuple[tuple[int], pb.Approval]]:
    """``listing`` read lazily as ((id,), approval); ``after_id``: only later requests."""
    for r in governance.approvals(db, include_decided, model_name, after_id):
        yield (r["id"],), _message(r)


def _message(r: dict[str, Any]) -> pb.Approval:
    return pb.Approval(id=r["id"], model_name=r["model"], version=r["version"], requested_by=r["requested_by"],
                       requested_unix_nano=r["requested_at"], reason=r["reason"], state=r["state"],
                       decided_by=r["decided_by"], decided_unix_nano=r["decided_at"],
                       decision_reason=r["decision_reason"], gate_override_reason=r["gate_override"],
                       kind=r["kind"])
