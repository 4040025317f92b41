"""Drift policies, evaluations, alert machines and alerts in the collector's database.

Plain functions over a store connection (``collector.store.engine.Conn``): writers run on the store's
writer thread (``Store.write(fn)``), readers on a read connection
(``Store.read()``). Every change is audited (``collector.store.audit``) in the same
transaction. The alert machine itself is ``collector.monitoring.drift.AlertTracker``;
here it is only loaded and saved; the SQL is ``collector.store.alerts``. One evaluation's tracker
read, step and write run in turn across collectors (``collector.store.audit.take_turn``), so
several collectors on one PostgreSQL open an alert once.

Every resolution says why in the alert's ``resolved_reason`` (and its audit entry): the
column was clean for k evaluations in a row, or its version is no longer served.

Alerts follow their model version's life: a version that is no longer served
(``served``: no connected agent reports it and none of its windows ended in the
last UNSERVED_SECONDS) gets its open alerts resolved with that reason at its next
evaluation, and its alert machine is reset and no longer stepped, so the
page stops listing version 1's alerts once version 2 has replaced it. The
alerts stay in the history (``outrider alerts --all``), with the reason in
their ``resolved_reason`` and in the audit trail. 15 minutes rides out an agent's or the
collector's restart (agents reconnect within seconds to a minute) and is short
against the hour the default span still holds the old version's windows.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf import json_format

from agent.errors import FailedPrecondition, InvalidArgument, NotFound
from collector.monitoring.drift import AlertTracker, DriftConfig
from collector.store import alerts as alert_store
from collector.store import audit, fleet
from collector.store.engine import Conn
from protos import collector_pb2 as pb

OPEN, ACKNOWLEDGED, RESOLVED = "open", "acknowledged", alert_store.RESOLVED
UNSERVED_SECONDS = 900.0  # no connected agent and no window of a version for this long: no longer served


# ------------------------------------------------------------ drift policy

def get_config(db: Conn, model_name: str) -> tuple[DriftConfig, bool]:
    """The model's policy and whether it is the default (nothing stored)."""
    stored = alert_store.drift_config(db, model_name)
    if stored is None:
        return DriftConfig(), True
    return DriftConfig.from_dict(json.loads(stored)), False


def parse_config(text: str) -> DriftConfig:
    try:
        data = json.loads(text or "{}")
    except ValueError as exc:
        raise InvalidArgument(f"drift config is not valid JSON: {exc}") from None
    return DriftConfig.from_dict(data)


def set_config(db: Conn, model_name: str, config: DriftConfig, actor: str, now_ns: int) -> None:
    """Replace the model's policy, audited (before: the policy in force, defaults included)."""
    before, _ = get_config(db, model_name)
    alert_store.put_drift_config(db, model_name, json.dumps(config.to_dict()), actor, now_ns)
    audit.append(db, actor, "drift_config.set", f"model/{model_name}", model_name=model_name,
                 before=before.to_dict(), after=config.to_dict(), now_ns=now_ns)


# ------------------------------------------------------------ evaluations

Connected = Callable[[str, str], bool]  # (agent_id, run_id) -> its stream is open now


def served(db: Conn, model_name: str, model_version: str, now_ns: int, connected: Connected | None = None,
           quiet_seconds: float = UNSERVED_SECONDS) -> bool:
    """Whether a version is still served: a connected agent reports it, or one of its windows
    (raw or rolled up) ended within the last ``quiet_seconds``. ``connected`` (the collector's
    open streams) confirms the agents table, whose flag outlives a collector killed mid-stream."""
    runs = fleet.connected_runs(db, model_name, model_version)
    if any(connected is None or connected(agent_id, run_id) for agent_id, run_id in runs):
        return True
    return fleet.window_ended_since(db, model_name, model_version, now_ns - int(quiet_seconds * 1e9))


def record(db: Conn, evaluation: pb.DriftEvaluation, k: int, now_ns: int, *,
           is_served: bool = True) -> list[pb.Alert]:
    """Store one evaluation, step the model version's alert machine with it, and
    open or resolve alerts; returns the alerts that changed (for the webhook).
    A version no longer served (``is_served`` False: see ``served``) does not step
    its machine: its open alerts are resolved with that reason (``resolve_unserved``)."""
    drifted = sum(c.drifted for c in evaluation.columns)
    evaluation.id = alert_store.insert_evaluation(db, evaluation.model_name, evaluation.model_version,
                                              evaluation.evaluated_unix_nano, evaluation.evaluated, drifted)
    alert_store.set_evaluation_body(db, evaluation.id, evaluation.SerializeToString())
    # several collectors on one database: the machine's read, step and write are one turn
    audit.take_turn(db)
    if not is_served:
        return resolve_unserved(db, evaluation.model_name, evaluation.model_version, now_ns)
    if not evaluation.evaluated:
        return []
    key = (evaluation.model_name, evaluation.model_version)
    state = alert_store.tracker_state(db, *key)
    tracker = AlertTracker.from_dict(json.loads(state)) if state else AlertTracker(k=k)
    tracker.k = k  # a changed policy applies from the next step on
    changed = []
    for column, event in tracker.observe(evaluation.columns):
        if event == "opened":
            changed.append(_open(db, evaluation, column, now_ns))
        else:
            changed.extend(_resolve(db, evaluation, column, k, now_ns))
    alert_store.save_tracker(db, *key, json.dumps(tracker.to_dict()))
    return changed


def _open(db: Conn, evaluation: pb.DriftEvaluation, column: str, now_ns: int) -> pb.Alert:
    col = next(c for c in evaluation.columns if c.name == column)
    kind = column if column in ("performance", "estimated_performance") else "drift"
    alert_id = alert_store.insert_alert(db, {
        "model_name": evaluation.model_name, "model_version": evaluation.model_version, "column": column,
        "kind": kind, "state": OPEN, "opened_ns": now_ns, "summary": col.reason,
        "evaluation_id": evaluation.id})
    audit.append(db, audit.COLLECTOR, "alert.open", f"alert/{alert_id}", model_name=evaluation.model_name,
                 after={"state": OPEN, "model_version": evaluation.model_version, "column": column, "kind": kind,
                        "evaluation_id": evaluation.id}, reason=col.reason, now_ns=now_ns)
    return alert(db, alert_id)


def _resolve(db: Conn, evaluation: pb.DriftEvaluation, column: str, k: int, now_ns: int) -> list[pb.Alert]:
    rows = alert_store.unresolved(db, evaluation.model_name, evaluation.model_version, column)
    reason = clean_reason(column, k, evaluation.id)
    for alert_id, state in rows:
        _resolve_one(db, alert_id, state, evaluation.model_name, reason, now_ns)
    return [alert(db, i) for i, _ in rows]


def clean_reason(column: str, k: int, evaluation_id: int) -> str:
    """Why an alert resolved by itself: its column's last ``k`` verdicts were clean."""
    times = "1 evaluation" if k == 1 else f"{k} evaluations in a row"
    return f"{column} clean for {times} (the last: evaluation {evaluation_id})"


def _resolve_one(db: Conn, alert_id: int, state: str, model_name: str, reason: str, now_ns: int) -> None:
    alert_store.update_alert(db, alert_id, {"state": RESOLVED, "resolved_ns": now_ns, "resolved_reason": reason})
    audit.append(db, audit.COLLECTOR, "alert.resolve", f"alert/{alert_id}", model_name=model_name,
                 before={"state": state}, after={"state": RESOLVED}, reason=reason, now_ns=now_ns)


def resolve_unserved(db: Conn, model_name: str, model_version: str, now_ns: int,
                     quiet_seconds: float = UNSERVED_SECONDS) -> list[pb.Alert]:
    """Resolve every open or acknowledged alert of a version that is no longer served, saying
    so (in the alert's ``resolved_reason`` and the audit trail), and reset its alert machine."""
    rows = alert_store.unresolved(db, model_name, model_version)
    alert_store.delete_tracker(db, model_name, model_version)
    reason = (f"version {model_version} of {model_name} is no longer served: no connected agent reports it and "
              f"none of its windows ended in the last {quiet_seconds / 60:g} min")
    for alert_id, state in rows:
        _resolve_one(db, alert_id, state, model_name, reason, now_ns)
    return [alert(db, i) for i, _ in rows]


def history(db: Conn, model_name: str, model_version: str, limit: int) -> list[pb.DriftEvaluation]:
    """The model version's evaluations, newest first."""
    return [e for _, e in itertools.islice(history_rows(db, model_name, model_version, limit=limit), limit)]


def history_rows(db: Conn, model_name: str, model_version: str, *,
                 limit: int | None = None) -> Iterator[tuple[tuple[int, int], pb.DriftEvaluation]]:
    """The model version's evaluations, newest first, read lazily as ((evaluated_ns, id), evaluation)."""
    rows = alert_store.evaluation_rows(db, model_name, model_version, None if limit is None else limit + 1)
    for at, evaluation_id, body in rows:
        yield (at, evaluation_id), pb.DriftEvaluation.FromString(body)


# ------------------------------------------------------------ alerts

def alert(db: Conn, alert_id: int) -> pb.Alert:
    row = alert_store.alert_row(db, alert_id)
    if row is None:
        raise NotFound(f"no alert {alert_id}; list them with: outrider alerts")
    return _alert(row)


def _alert(r: dict[str, Any]) -> pb.Alert:
    return pb.Alert(id=r["id"], model_name=r["model_name"], model_version=r["model_version"], column=r["column"],
                    kind=r["kind"], state=r["state"], opened_unix_nano=r["opened_ns"],
                    resolved_unix_nano=r["resolved_ns"], acknowledged_unix_nano=r["acknowledged_ns"],
                    acknowledged_by=r["acknowledged_by"], summary=r["summary"],
                    evaluation_id=r["evaluation_id"] or 0, resolved_reason=r["resolved_reason"])


def alerts(db: Conn, model_name: str = "", include_resolved: bool = False, limit: int = 1000) -> list[pb.Alert]:
    """The newest ``limit`` alerts (of ``model_name``; open and acknowledged only unless
    ``include_resolved``), newest first."""
    rows = alert_rows(db, model_name, include_resolved, limit=limit)
    return [a for _, a in itertools.islice(rows, limit)]


def resolved(db: Conn, model_name: str, limit: int) -> list[pb.Alert]:
    """The model's ``limit`` most recently resolved alerts, newest resolution first."""
    return [_alert(r) for r in alert_store.resolved_rows(db, model_name, limit)]


def alert_rows(db: Conn, model_name: str = "", include_resolved: bool = False, *, before_id: int = 0,
               limit: int | None = None) -> Iterator[tuple[tuple[int], pb.Alert]]:
    """``alerts`` read lazily as ((id,), alert), newest first; ``before_id``: only older ones."""
    for r in alert_store.alert_rows(db, model_name, include_resolved, before_id=before_id,
                                limit=None if limit is None else limit + 1):
        yield (r["id"],), _alert(r)


def acknowledge(db: Conn, alert_id: int, actor: str, note: str, now_ns: int) -> pb.Alert:
    """An operator has seen it: open -> acknowledged (it still resolves by itself)."""
    # as in ``record``: two collectors acking at once (or one resolving it) take turns, reading the state
    # once it is theirs
    audit.take_turn(db)
    current = alert(db, alert_id)
    if current.state == RESOLVED:
        raise FailedPrecondition(f"alert {alert_id} is already resolved")
    if current.state == ACKNOWLEDGED:
        raise FailedPrecondition(f"alert {alert_id} was already acknowledged by {current.acknowledged_by}")
    alert_store.update_alert(db, alert_id, {"state": ACKNOWLEDGED, "acknowledged_ns": now_ns,
                                            "acknowledged_by": actor, "note": note})
    audit.append(db, actor, "alert.ack", f"alert/{alert_id}", model_name=current.model_name,
                 before={"state": current.state}, after={"state": ACKNOWLEDGED}, reason=note, now_ns=now_ns)
    return alert(db, alert_id)


def event(changed: pb.Alert) -> dict[str, Any]:
    """The webhook body for an alert that opened or resolved."""
    return {"event": "alert.resolved" if changed.state == RESOLVED else "alert.opened",
            "alert": json_format.MessageToDict(changed, preserving_proto_field_name=True)}
