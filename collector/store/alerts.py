"""The SQL of drift policies, evaluations, alert machines and alerts (``collector.monitoring.alerts`` holds the rules).

Tables ``drift_configs``, ``evaluations``, ``alert_trackers`` and ``alerts`` (migration 3). Plain
functions over a ``Conn``, the same text on SQLite and PostgreSQL: ``"column"`` is quoted (a reserved
word on PostgreSQL), limits use ``NO_LIMIT``.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from collector.store.dialect import NO_LIMIT
from collector.store.engine import Conn

RESOLVED = "resolved"


# ------------------------------------------------------------ drift policy

def drift_config(db: Conn, model_name: str) -> str | None:
    """The model's stored policy (JSON), None when it has none."""
    row = db.execute("SELECT config FROM drift_configs WHERE model_name = ?", [model_name]).fetchone()
    return row[0] if row else None


def put_drift_config(db: Conn, model_name: str, config_json: str, actor: str, now_ns: int) -> None:
    db.upsert("drift_configs", {"model_name": model_name, "config": config_json, "updated_ns": now_ns,
                                "updated_by": actor}, key=["model_name"])


# ------------------------------------------------------------ evaluations

def insert_evaluation(db: Conn, model_name: str, model_version: str, evaluated_ns: int, evaluated: bool,
                      drifted_columns: int) -> int:
    """A new evaluation row without its body (the body carries the id: ``set_evaluation_body``)."""
    return db.insert("evaluations", {"model_name": model_name, "model_version": model_version,
                                     "evaluated_ns": evaluated_ns, "evaluated": int(evaluated),
                                     "drifted_columns": drifted_columns, "body": b""}, returning="id")


def set_evaluation_body(db: Conn, evaluation_id: int, body: bytes) -> None:
    db.update("evaluations", {"id": evaluation_id}, {"body": body})


def evaluation_rows(db: Conn, model_name: str, model_version: str,
                    limit: int | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(evaluated_ns, id, body) of the version's evaluations, newest first (all when ``limit`` is None)."""
    yield from db.execute("SELECT evaluated_ns, id, body FROM evaluations WHERE model_name = ? AND model_version = ?"
                          " ORDER BY evaluated_ns DESC, id DESC LIMIT ?",
                          [model_name, model_version, NO_LIMIT if limit is None else limit])


def latest_evaluated_body(db: Conn, model_name: str, model_version: str) -> bytes | None:
    """The body of the version's newest evaluation that had enough rows to judge."""
    row = db.execute("SELECT body FROM evaluations WHERE model_name = ? AND model_version = ? AND evaluated = 1"
                     " ORDER BY evaluated_ns DESC, id DESC LIMIT 1", [model_name, model_version]).fetchone()
    return row[0] if row else None


def delete_evaluations_before(db: Conn, cutoff_ns: int) -> int:
    return db.execute("DELETE FROM evaluations WHERE evaluated_ns < ?", [cutoff_ns]).rowcount


# ------------------------------------------------------------ alert machines

def tracker_state(db: Conn, model_name: str, model_version: str) -> str | None:
    """The version's alert machine (JSON), None before its first step."""
    row = db.execute("SELECT state FROM alert_trackers WHERE model_name = ? AND model_version = ?",
                     [model_name, model_version]).fetchone()
    return row[0] if row else None


def save_tracker(db: Conn, model_name: str, model_version: str, state_json: str) -> None:
    db.upsert("alert_trackers", {"model_name": model_name, "model_version": model_version, "state": state_json},
              key=["model_name", "model_version"])


def delete_tracker(db: Conn, model_name: str, model_version: str) -> None:
    db.execute("DELETE FROM alert_trackers WHERE model_name = ? AND model_version = ?", [model_name, model_version])


# ------------------------------------------------------------ alerts

def insert_alert(db: Conn, row: dict[str, Any]) -> int:
    return db.insert("alerts", row, returning="id")


def update_alert(db: Conn, alert_id: int, fields: dict[str, Any]) -> None:
    db.update("alerts", {"id": alert_id}, fields)


def unresolved(db: Conn, model_name: str, model_version: str, column: str | None = None) -> list[tuple[int, str]]:
    """(id, state) of the version's open and acknowledged alerts (of ``column`` if given), oldest first."""
    sql = "SELECT id, state FROM alerts WHERE model_name = ? AND model_version = ? AND state != ?"
    params: list[Any] = [model_name, model_version, RESOLVED]
    if column is not None:
        sql += ' AND "column" = ?'
        params.append(column)
    return [(i, s) for i, s in db.execute(sql + " ORDER BY id", params).fetchall()]


def alert_row(db: Conn, alert_id: int) -> dict[str, Any] | None:
    return next(db.query("SELECT * FROM alerts WHERE id = ?", [alert_id]), None)


def resolved_rows(db: Conn, model_name: str, limit: int) -> list[dict[str, Any]]:
    """The model's ``limit`` most recently resolved alerts, newest resolution first."""
    return list(db.query("SELECT * FROM alerts WHERE state = ? AND model_name = ?"
                         " ORDER BY resolved_ns DESC, id DESC LIMIT ?", [RESOLVED, model_name, limit]))


def alert_rows(db: Conn, model_name: str = "", include_resolved: bool = False, *, before_id: int = 0,
               limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Alerts newest first (of ``model_name``; open and acknowledged only unless ``include_resolved``;
    ``before_id``: only older ones), read lazily."""
    where, params = [], []
    if model_name:
        where.append("model_name = ?")
        params.append(model_name)
    if not include_resolved:
        where.append("state != ?")
        params.append(RESOLVED)
    if before_id:
        where.append("id < ?")
        params.append(before_id)
    sql = "SELECT * FROM alerts" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
    yield from db.query(sql, [*params, NO_LIMIT if limit is None else limit])


def counts_by_model_and_state(db: Conn, states: Sequence[str]) -> dict[tuple[str, str], int]:
    """How many alerts each (model, state) has, for the given states."""
    marks = ", ".join("?" * len(states))
    return {(m, s): n for m, s, n in db.execute(
        f"SELECT model_name, state, count(*) FROM alerts WHERE state IN ({marks}) GROUP BY model_name, state",
        list(states))}
