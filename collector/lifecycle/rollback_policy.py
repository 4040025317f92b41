"""The rollback policy: a promotion that degrades production severely is rolled back (or proposed).

Run after every recorded drift evaluation, in the same write transaction as the
alerts it just stepped. It fires when all of these hold:

- the evaluated version is the model's production version, made production
  by a promotion (not a rollback: rolling back a rollback would ping-pong)
  less than ``watch_seconds`` ago;
- a *severe* alert of that version is open (or acknowledged) and opened since
  the promotion: a performance alert (realised accuracy fell by
  ``accuracy_drop``, or MAE rose by ``mae_increase``, see
  ``collector.monitoring.evaluation.performance_drift``) or a drift alert on a
  prediction (output) column. Drift of input features alone says the world
  changed, not that the new version is worse, so it is left to retraining;
- a version was production before it (archived, never retired);
- no rollback request of the model is pending, and none was made since this
  promotion: one per promotion, so a rejected request is not reopened at the
  next evaluation.

Then, with ``action`` 'request' (the default), a rollback request
(``approvals.request_rollback``, kind 'rollback') waits for an approver;
with 'act' the previous version is production again at once
(``rollout.rollback``) and the caller pushes the rollout to the agents after
the commit. Either way the actor is ``collector``, the reason says why in a
line, an audit row ``rollback.policy`` carries the evidence (alerts, their
statistics, the evaluation, promotion time), and ``announce`` tells the
webhook after the commit.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from collector.store.engine import Conn

from agent.errors import InvalidArgument, OutriderError
from collector.lifecycle import approvals, rollout
from collector.store import audit, governance, rollouts, versions
from protos import collector_pb2 as pb
from protos import summary_pb2

log = logging.getLogger(__name__)

ACTIONS = ("request", "act")
NS = 1_000_000_000
_SUMMARY_CHARS = 300  # of each alert's summary in the one-line reason


@dataclass(frozen=True)
class RollbackPolicy:
    """``watch_seconds`` after a promotion in which severe degradation triggers ``action`` (0: never)."""

    watch_seconds: float = 3600.0
    action: str = "request"

    def __post_init__(self) -> None:
        if not (isinstance(self.watch_seconds, (int, float)) and 0 <= self.watch_seconds < math.inf):
            raise InvalidArgument(f"rollback watch must be a finite number of seconds >= 0, got {self.watch_seconds!r}")
        if self.action not in ACTIONS:
            raise InvalidArgument(f"rollback action must be one of {', '.join(ACTIONS)}, got {self.action!r}")


@dataclass(frozen=True)
class RollbackOutcome:
    """What the policy did: a request opened (``approval``) or a rollback made (``rollout_id``)."""

    model_name: str
    from_version: int
    to_version: int
    action: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    approval: pb.Approval | None = None
    rollout_id: int = 0


def _promotion(db: Conn, model: str, version: str) -> tuple[int, int] | None:
    """(production version, promoted_ns) when ``version`` is production and a promotion made it so."""
    prod = versions.production(db, model)
    if prod is None or str(prod["version"]) != version:
        return None
    last = rollouts.latest(db, model, ("promote", "rollback"))
    if last is None:  # promoted before rollouts were recorded: the stage change is the promotion
        return prod["version"], prod["stage_ns"]
    if last["kind"] != "promote" or last["version"] != prod["version"]:
        return None
    return prod["version"], last["started_ns"]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _severe_alerts(db: Conn, evaluation: pb.DriftEvaluation, since_ns: int) -> list[dict[str, Any]]:
    predictions = {c.name for c in evaluation.columns if c.role == summary_pb2.ColumnSummary.PREDICTION}
    rows = governance.unresolved_alerts(db, evaluation.model_name, evaluation.model_version,
                                        opened_since_ns=since_ns)
    return [{"id": a["id"], "kind": a["kind"], "column": a["column"], "summary": a["summary"],
             "opened_unix_nano": a["opened_ns"], "evaluation_id": a["evaluation_id"] or 0}
            for a in rows if a["kind"] == "performance" or a["column"] in predictions]


def _already_asked(db: Conn, model: str, promoted_ns: int) -> bool:
    return governance.rollback_asked_since(db, model, promoted_ns)


def apply(db: Conn, evaluation: pb.DriftEvaluation, policy: RollbackPolicy,
          now_ns: int) -> RollbackOutcome | None:
    """Inside the writer's transaction, after ``alerts.record``: request or make a rollback when the
    policy says so (see the module doc). A rollback that cannot be made (e.g. the previous version
    was retired) is logged and changes nothing; the evaluation's own writes stand."""
    if policy.watch_seconds <= 0 or not evaluation.model_version.isdigit():
        return None
    model = evaluation.model_name
    promoted = _promotion(db, model, evaluation.model_version)
    if promoted is None:
        return None
    current, promoted_ns = promoted
    if now_ns - promoted_ns >= policy.watch_seconds * NS:
        return None
    target = rollout.previous_production(db, model, current)
    if not target:
        return None  # the first production version: nothing to go back to
    severe = _severe_alerts(db, evaluation, promoted_ns)
    if not severe or _already_asked(db, model, promoted_ns):
        return None
    minutes = (now_ns - promoted_ns) / NS / 60
    what = "; ".join(f"{a['kind']} alert {a['id']} on {a['column']}: {a['summary'][:_SUMMARY_CHARS]}" for a in severe)
    reason = (f"rollback policy: {what}; version {current} was promoted {minutes:.0f} min ago (watch "
              f"{policy.watch_seconds:g} s); back to version {target}")[:approvals.MAX_REASON_CHARS]
    evidence = {"alerts": severe, "evaluation_id": evaluation.id, "promoted_unix_nano": promoted_ns,
                "watch_seconds": policy.watch_seconds, "from_version": current, "to_version": target,
                "rows": evaluation.rows, "window": {"start_unix_nano": evaluation.window_start_unix_nano,
                                                   "end_unix_nano": evaluation.window_end_unix_nano},
                **{k: _finite(getattr(evaluation, k)) for k in ("accuracy", "reference_accuracy", "mae",
                                                                "reference_mae")}}
    try:
        with db.savepoint():  # a refused rollback must not undo the evaluation's alerts
            if policy.action == "act":
                outcome = RollbackOutcome(model, current, target, "act", reason, evidence,
                                          rollout_id=rollout.rollback(db, model, target, audit.COLLECTOR, reason,
                                                                      now_ns))
            else:
                outcome = RollbackOutcome(model, current, target, "request", reason, evidence,
                                          approval=approvals.request_rollback(db, model, target, audit.COLLECTOR,
                                                                              reason, now_ns))
            made = ({"rollout": outcome.rollout_id} if outcome.rollout_id else {"approval": outcome.approval.id})
            audit.append(db, audit.COLLECTOR, "rollback.policy", f"model/{model}/{current}", model_name=model,
                         before={"production": current},
                         after={"action": policy.action, **made, "evidence": evidence}, reason=reason, now_ns=now_ns)
    except OutriderError as exc:  # the store's integrity errors (collector.store.engine) are OutriderErrors
        log.warning("rollback policy for %s version %d could not %s: %s", model, current,
                    "roll back" if policy.action == "act" else "request a rollback", exc)
        return None
    return outcome


def event(outcome: RollbackOutcome) -> dict[str, Any]:
    """The webhook body: a rollback requested (waiting for an approver) or performed."""
    body: dict[str, Any] = {
        "event": "rollback.performed" if outcome.action == "act" else "rollback.requested",
        "model_name": outcome.model_name, "from_version": outcome.from_version, "to_version": outcome.to_version,
        "reason": outcome.reason, "evidence": outcome.evidence}
    if outcome.approval is not None:
        body["approval"] = json_format.MessageToDict(outcome.approval, preserving_proto_field_name=True)
    if outcome.rollout_id:
        body["rollout_id"] = outcome.rollout_id
    return body


def announce(outcome: RollbackOutcome, webhook: Any = None,
             push_rollout: Callable[[int], Any] | None = None) -> None:
    """After the commit: push a rollback made to the agents, log, and tell the webhook."""
    if outcome.rollout_id:
        log.warning("rollback policy rolled %s back from version %d to %d (rollout %d): %s", outcome.model_name,
                    outcome.from_version, outcome.to_version, outcome.rollout_id, outcome.reason)
        if push_rollout is not None:
            try:
                push_rollout(outcome.rollout_id)
            except Exception:  # the agents hear of it when they reconnect; the rollback itself stands
                log.exception("pushing rollout %d to %s's agents failed", outcome.rollout_id, outcome.model_name)
    elif outcome.approval is not None:
        log.warning("rollback of %s from version %d to %d requested (approval %d): %s", outcome.model_name,
                    outcome.from_version, outcome.to_version, outcome.approval.id, outcome.reason)
    if webhook is not None:
        webhook.notify(event(outcome))
