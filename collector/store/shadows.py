"""The reads of a shadow report (``collector.monitoring.shadow``): when a shadow started, which stored
windows fall in its range, their bodies. The same SQL on SQLite and PostgreSQL (``rowid`` is a real
column of windows and rollups there)."""
from __future__ import annotations

from typing import Any

from collector.store.engine import Conn

TABLES = ("windows", "rollups")


def current(db: Conn, model: str) -> tuple[int, int] | None:
    """(version, started_ns) of the model's current shadow."""
    row = db.execute("SELECT version, started_ns FROM shadows WHERE model = ?", [model]).fetchone()
    return (row[0], row[1]) if row else None


def latest_rollout(db: Conn, model: str, version: int = 0) -> tuple[int, int] | None:
    """(version, started_ns) of the model's latest shadow rollout (of ``version`` if given)."""
    sql = "SELECT version, started_ns FROM rollouts WHERE model = ? AND kind = 'shadow'"
    params: list[Any] = [model]
    if version:
        sql += " AND version = ?"
        params.append(version)
    row = db.execute(sql + " ORDER BY id DESC LIMIT 1", params).fetchone()
    return (row[0], row[1]) if row else None


def window_keys(db: Conn, model: str, since_ns: int, limit: int) -> list[tuple[str, int, int]]:
    """(table, rowid, end_ns) of the model's stored windows, raw and rolled up, ending at or after
    ``since_ns``, newest first, at most ``limit``. Read them in one snapshot with ``body``."""
    return [(t, r, e) for t, r, e in db.execute(
        "SELECT * FROM (SELECT 'windows' AS t, rowid, end_ns FROM windows WHERE model_name = ? AND end_ns >= ?"
        " UNION ALL SELECT 'rollups', rowid, end_ns FROM rollups WHERE model_name = ? AND end_ns >= ?) AS stored"
        " ORDER BY end_ns DESC LIMIT ?", [model, since_ns, model, since_ns, limit]).fetchall()]


def body(db: Conn, table: str, rowid: int) -> bytes | None:
    """The stored body of one window key (None when a rollup moved it meanwhile)."""
    if table not in TABLES:
        raise ValueError(f"not a window table: {table}")
    row = db.execute(f"SELECT body FROM {table} WHERE rowid = ?", [rowid]).fetchone()
    return row[0] if row else None
