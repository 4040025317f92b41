"""Retraining requests: opened by an operator or by the drift policy, decided by operators.

States: ``open`` → ``accepted`` → ``completed`` (linked to the new registry
version that answers it), or ``open | accepted`` → ``rejected`` (with a
reason) | ``cancelled``. At most one open or accepted request per model
version (a partial unique index). Each request carries its evidence as JSON:
the drifted features, their statistics, the window range and the model
version. Every change is audited in the same transaction; the servicer (or
the evaluator, for policy-opened requests) tells the webhook afterwards
(``event``).

Every function here takes the writer's ``db`` and runs inside ``Store.write``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from google.protobuf import json_format
from collector.store.engine import Conn

from agent.errors import FailedPrecondition, InvalidArgument, NotFound
from collector.store import audit, governance, versions
from protos import collector_pb2 as pb

OPEN, ACCEPTED, COMPLETED, REJECTED, CANCELLED = "open", "accepted", "completed", "rejected", "cancelled"
STATES = (OPEN, ACCEPTED, COMPLETED, REJECTED, CANCELLED)
ACTIVE = (OPEN, ACCEPTED)
STATS = ("rows", "p_adjusted", "psi", "ks_d", "ks_p", "wasserstein", "chi2", "chi2_p", "js",
         "missing_rate", "reference_missing_rate")


def get(db: Conn, request_id: int) -> pb.RetrainingRequest:
    row = governance.retraining_request(db, request_id)
    if row is None:
        raise NotFound(f"there is no retraining request {request_id}; list them with: outrider retrain list --all")
    return _message(row)


def listing(db: Conn, include_closed: bool = False, model_name: str = "") -> list[pb.RetrainingRequest]:
    """Open and accepted requests (every request with ``include_closed``), of ``model_name`` if given,
    oldest first."""
    return [r for _, r in listing_rows(db, include_closed, model_name)]


def listing_rows(db: Conn, include_closed: bool = False, model_name: str = "", *,
                 after_id: int = 0) -> Iterator[tuple[tuple[int], pb.RetrainingRequest]]:
    """``listing`` read lazily as ((id,), request); ``after_id``: only later requests."""
    for r in governance.retraining_requests(db, include_closed, model_name, after_id):
        yield (r["id"],), _message(r)


def active(db: Conn, model: str, version: str) -> int | None:
    return governance.active_retraining(db, model, version)


def open_request(db: Conn, model: str, version: str, actor: str, reason: str, evidence: dict[str, Any],
                 now_ns: int) -> pb.RetrainingRequest:
    audit.take_turn(db)  # another collector's request, committed meanwhile, is seen here
    existing = active(db, model, version)
    if existing is not None:
        raise FailedPrecondition(f"{model} version {version} already has an active retraining request "
                                 f"({existing}, {get(db, existing).state})")
    evidence = {"model_version": version, **evidence}
    request_id = governance.insert_retraining(db, model, version, actor, now_ns, reason, json.dumps(evidence))
    audit.append(db, actor, "retraining.open", f"retraining/{request_id}", model_name=model, before=None,
                 after={"state": OPEN, "model": model, "version": version}, reason=reason, now_ns=now_ns)
    return get(db, request_id)


def change(db: Conn, request_id: int, state: str, actor: str, reason: str, now_ns: int,
           completed_version: int = 0) -> pb.RetrainingRequest:
    """Move a request to ``state`` (accepted, completed, rejected, cancelled) if the machine allows it."""
    audit.take_turn(db)
    current = get(db, request_id)
    allowed = {ACCEPTED: (OPEN,), COMPLETED: (ACCEPTED,), REJECTED: ACTIVE, CANCELLED: ACTIVE}[state]
    if current.state not in allowed:
        hint = " (accept it first)" if state == COMPLETED and current.state == OPEN else ""
        raise FailedPrecondition(f"retraining request {request_id} is {current.state}; only "
                                 f"{' or '.join(allowed)} requests can be {state}{hint}")
    after: dict[str, Any] = {"state": state}
    if state == COMPLETED:
        if not completed_version:
            raise InvalidArgument("completing a retraining request needs the new version (--version N)")
        registered = versions.registered_ns(db, current.model_name)
        if completed_version not in registered:
            raise FailedPrecondition(f"model {current.model_name!r} has no registered version {completed_version}; "
                                     "register the retrained model first (outrider models register)")
        old = current.model_version
        newer = (completed_version > int(old) if old.isdigit()
                 else registered[completed_version] > current.opened_unix_nano)
        if not newer:
            raise FailedPrecondition(f"version {completed_version} is not newer than version {old} of the request")
        after["completed_version"] = completed_version
    elif completed_version:
        raise InvalidArgument(f"--version is only for completing a request, not for {state}")
    governance.update_retraining(db, request_id, state, actor, now_ns, completed_version or current.completed_version,
                                 reason)
    audit.append(db, actor, f"retraining.{state}", f"retraining/{request_id}", model_name=current.model_name,
                 before={"state": current.state}, after=after, reason=reason, now_ns=now_ns)
    return get(db, request_id)


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def drift_evidence(evaluation: pb.DriftEvaluation, alert_ids: list[int]) -> dict[str, Any]:
    """The evidence of a policy-opened request: the evaluation's drifted columns and their statistics."""
    drifted = [c for c in evaluation.columns if c.drifted]
    return {"features": [c.name for c in drifted],
            "statistics": {c.name: {**{s: _finite(getattr(c, s)) for s in STATS}, "reason": c.reason}
                           for c in drifted},
            "window": {"start_unix_nano": evaluation.window_start_unix_nano,
                       "end_unix_nano": evaluation.window_end_unix_nano, "rows": evaluation.rows},
            "evaluation_id": evaluation.id, "alerts": alert_ids}


def policy(db: Conn, evaluation: pb.DriftEvaluation, after_evaluations: int,
           now_ns: int) -> pb.RetrainingRequest | None:
    """Open a request for the evaluated model version when one of its drift alerts has stayed
    open (or acknowledged) for ``after_evaluations`` consecutive evaluations, unless one is
    already open or accepted. 0 disables."""
    if after_evaluations <= 0 or not evaluation.evaluated:
        return None
    model, version = evaluation.model_name, evaluation.model_version
    if _replaced(db, model, version):
        return None  # retraining a version nobody serves any more helps nobody
    # Alerts opened before the newest request of this version were that request's evidence: once it is
    # closed (completed, rejected, cancelled) the same alerts must not open another one.
    last = governance.last_retraining_opened(db, model, version)
    long_open = []
    for alert in governance.unresolved_alerts(db, model, version, opened_after_ns=last, kind="drift"):
        # evaluations since (and with) the one that opened the alert; it has been open through all of them
        if governance.evaluations_since(db, model, version, alert["evaluation_id"] or 0) >= after_evaluations:
            long_open.append(alert["id"])
    if not long_open or active(db, model, version) is not None:
        return None
    reason = (f"drift alert{'s' if len(long_open) > 1 else ''} {', '.join(map(str, long_open))} open for "
              f"{after_evaluations} or more evaluations")
    return open_request(db, model, version, audit.COLLECTOR, reason, drift_evidence(evaluation, long_open), now_ns)


def _replaced(db: Conn, model: str, version: str) -> bool:
    """A registered version that is no longer production while another one is."""
    if not version.isdigit():
        return False  # served from a file, not from the registry: its stage is unknown
    stages = versions.stages(db, model)
    return int(version) in stages and stages[int(version)] != "production" and "production" in stages.values()


def event(request: pb.RetrainingRequest) -> dict[str, Any]:
    """The webhook body for a request that changed state."""
    return {"event": f"retraining.{request.state}",
            "retraining": json_format.MessageToDict(request, preserving_proto_field_name=True)}


def _message(r: dict[str, Any]) -> pb.RetrainingRequest:
    return pb.RetrainingRequest(id=r["id"], model_name=r["model"], model_version=r["version"], state=r["state"],
                                opened_by=r["opened_by"], opened_unix_nano=r["opened_ns"], reason=r["reason"],
                                evidence_json=r["evidence"], decided_by=r["decided_by"],
                                decided_unix_nano=r["decided_ns"], completed_version=r["completed_version"],
                                note=r["note"])
