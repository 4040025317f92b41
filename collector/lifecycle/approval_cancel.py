"""Withdrawing a pending request (a promotion, or a rollback opened by the rollback policy).

Only whoever asked may withdraw a request, or an admin (a policy-opened
rollback request was asked by the collector itself, so only an admin can
withdraw it; an approver who disagrees rejects it instead). The request moves
``pending → cancelled``, with who, when and why, audited in the same
transaction. Runs inside ``Store.write``; the caller (the servicer) says
whether the caller is an admin.
"""
from __future__ import annotations

from collector.store.engine import Conn

from agent.errors import FailedPrecondition, NotFound, PermissionDenied
from collector.lifecycle import approvals
from collector.store import audit, governance
from protos import collector_pb2 as pb


def cancel(db: Conn, approval_id: int, actor: str, reason: str, now_ns: int, *,
           admin: bool = False) -> pb.Approval:
    audit.take_turn(db)  # read the request as another collector's decision left it
    found = governance.approval(db, approval_id)
    if found is None:
        raise NotFound(f"there is no approval {approval_id}; list them with: outrider approvals list --all")
    model, version, requested_by, state, decided_by = (found[k] for k in ("model", "version", "requested_by",
                                                                          "state", "decided_by"))
    if state != "pending":
        raise FailedPrecondition(f"approval {approval_id} is already {state}" + (f" (by {decided_by})" if decided_by
                                 else "") + "; only pending requests can be cancelled")
    if requested_by != actor and not admin:
        raise PermissionDenied(f"approval {approval_id} was requested by {requested_by}; only they or an admin may "
                               "cancel it (an approver may reject it: outrider reject ID --reason TEXT)")
    governance.decide_approval(db, approval_id, "cancelled", actor, now_ns, reason)
    audit.append(db, actor, "approval.cancel", f"approval/{approval_id}", model_name=model,
                 before={"state": "pending"}, after={"state": "cancelled", "model": model, "version": version},
                 reason=reason, now_ns=now_ns)
    return approvals.get(db, approval_id)
