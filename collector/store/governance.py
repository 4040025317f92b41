"""Governance rows and their turn-taking: approvals (promotion and rollback requests), retraining requests,
and the alerts and evaluations the lifecycle's policies read as evidence.

Plain reads and writes for ``collector.lifecycle`` (approvals, approval_cancel, retraining,
rollback_policy): the rules, messages and audit rows stay there. The one-pending-approval and
one-active-retraining rules are partial unique indexes (``collector.store.migrations``) on both engines.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from collector.store.engine import Conn


def _one(rows: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
    """The first row, reading them all (so that no statement stays open on the connection)."""
    found = list(rows)
    return found[0] if found else None


# ------------------------------------------------------------ approvals


def approval(db: Conn, approval_id: int) -> dict[str, Any] | None:
    return _one(db.query("SELECT * FROM approvals WHERE id = ?", [approval_id]))


def pending_promotion(db: Conn, model: str, version: int) -> int | None:
    """The id of the pending request (of either kind) for this version, if any."""
    row = db.execute("SELECT id FROM approvals WHERE model = ? AND version = ? AND state = 'pending'",
                     [model, version]).fetchone()
    return row[0] if row else None


def pending_rollback(db: Conn, model: str) -> int | None:
    row = db.execute("SELECT id FROM approvals WHERE model = ? AND kind = 'rollback' AND state = 'pending'",
                     [model]).fetchone()
    return row[0] if row else None


def rollback_asked_since(db: Conn, model: str, since_ns: int) -> bool:
    """Whether a rollback of the model is pending, or was requested at or after ``since_ns``."""
    return db.execute("SELECT 1 FROM approvals WHERE model = ? AND kind = 'rollback' AND (state = 'pending'"
                      " OR requested_at >= ?) LIMIT 1", [model, since_ns]).fetchone() is not None


def insert_approval(db: Conn, model: str, version: int, requested_by: str, requested_at: int, reason: str,
                    gate_override: str = "", kind: str = "promote") -> int:
    """A pending request; its id."""
    return db.insert("approvals", {"model": model, "version": version, "requested_by": requested_by,
                                   "requested_at": requested_at, "reason": reason, "state": "pending",
                                   "gate_override": gate_override, "kind": kind}, returning="id")


def decide_approval(db: Conn, approval_id: int, state: str, decided_by: str, decided_at: int, reason: str) -> None:
    db.execute("UPDATE approvals SET state = ?, decided_by = ?, decided_at = ?, decision_reason = ? WHERE id = ?",
               [state, decided_by, decided_at, reason, approval_id])


def approvals(db: Conn, include_decided: bool = False, model: str = "", after_id: int = 0
              ) -> Iterator[dict[str, Any]]:
    """Pending requests (all with ``include_decided``), of ``model`` if given, with ids past ``after_id``, by id."""
    return _listing(db, "approvals", None if include_decided else "state = 'pending'", model, after_id)


def _listing(db: Conn, table: str, still_open: str | None, model: str, after_id: int) -> Iterator[dict[str, Any]]:
    """Rows of a requests ``table`` by id past ``after_id``: those matching ``still_open`` (None: all), of
    ``model`` if given."""
    where, params = ["id > ?"], [after_id]
    if still_open:
        where.append(still_open)
    if model:
        where.append("model = ?")
        params.append(model)
    return db.query(f"SELECT * FROM {table} WHERE {' AND '.join(where)} ORDER BY id", params)


# ------------------------------------------------------------ retraining requests


def retraining_request(db: Conn, request_id: int) -> dict[str, Any] | None:
    return _one(db.query("SELECT * FROM retraining_requests WHERE id = ?", [request_id]))


def active_retraining(db: Conn, model: str, version: str) -> int | None:
    """The id of the version's open or accepted request, if any."""
    row = db.execute("SELECT id FROM retraining_requests WHERE model = ? AND version = ?"
                     " AND state IN ('open', 'accepted')", [model, version]).fetchone()
    return row[0] if row else None


def last_retraining_opened(db: Conn, model: str, version: str) -> int:
    """When the version's newest request was opened (0: never)."""
    return db.execute("SELECT max(opened_ns) FROM retraining_requests WHERE model = ? AND version = ?",
                      [model, version]).fetchone()[0] or 0


def insert_retraining(db: Conn, model: str, version: str, opened_by: str, opened_ns: int, reason: str,
                      evidence_json: str) -> int:
    """An open request; its id."""
    return db.insert("retraining_requests", {"model": model, "version": version, "state": "open",
                                             "opened_by": opened_by, "opened_ns": opened_ns, "reason": reason,
                                             "evidence": evidence_json}, returning="id")


def update_retraining(db: Conn, request_id: int, state: str, decided_by: str, decided_ns: int,
                      completed_version: int, note: str) -> None:
    db.execute("UPDATE retraining_requests SET state = ?, decided_by = ?, decided_ns = ?, completed_version = ?,"
               " note = ? WHERE id = ?", [state, decided_by, decided_ns, completed_version, note, request_id])


def retraining_requests(db: Conn, include_closed: bool = False, model: str = "", after_id: int = 0
                        ) -> Iterator[dict[str, Any]]:
    """Open and accepted requests (all with ``include_closed``), of ``model`` if given, past ``after_id``, by id."""
    return _listing(db, "retraining_requests", None if include_closed else "state IN ('open', 'accepted')", model,
                    after_id)


# ------------------------------------------------------------ evidence for the policies


def unresolved_alerts(db: Conn, model: str, version: str, *, opened_after_ns: int = -1,
                      opened_since_ns: int | None = None, kind: str = "") -> list[dict[str, Any]]:
    """id, kind, column, summary, opened_ns, evaluation_id of the version's alerts not resolved, opened
    after ``opened_after_ns`` (or at or after ``opened_since_ns``), of ``kind`` if given, by id."""
    where, params = ["model_name = ?", "model_version = ?", "state != 'resolved'"], [model, version]
    if opened_since_ns is not None:
        where.append("opened_ns >= ?")
        params.append(opened_since_ns)
    else:
        where.append("opened_ns > ?")
        params.append(opened_after_ns)
    if kind:
        where.append("kind = ?")
        params.append(kind)
    return list(db.query('SELECT id, kind, "column", summary, opened_ns, evaluation_id FROM alerts'
                         f" WHERE {' AND '.join(where)} ORDER BY id", params))


def evaluations_since(db: Conn, model: str, version: str, first_id: int) -> int:
    """How many evaluations of the version that evaluated something have an id of at least ``first_id``."""
    return db.execute("SELECT count(*) FROM evaluations WHERE model_name = ? AND model_version = ?"
                      " AND evaluated = 1 AND id >= ?", [model, version, first_id]).fetchone()[0]
