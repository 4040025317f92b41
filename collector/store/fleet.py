"""The fleet as the database sees it: agent runs, the models they serve, recent traffic, profiles.

Read by the web page, the Prometheus scrape and the alert rules (is a version still served?).
Plain functions over a ``Conn``, the same SQL on SQLite and PostgreSQL. Functions named
``*_or_empty`` read tolerantly (``tolerant``): the page lists what there is.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from collector.store.engine import Conn, StoreError

MISSING = ("no such table", "no such column", "does not exist")  # SQLite's words, then PostgreSQL's


def tolerant(db: Conn, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows as dicts; [] when a table or column is not there (an older file, a feature not yet migrated)."""
    try:
        # inside a transaction on PostgreSQL a failed statement poisons the rest: undo only its own
        with db.savepoint() if db.in_transaction else contextlib.nullcontext():
            return list(db.query(sql, list(params)))
    except StoreError as exc:
        if any(s in str(exc) for s in MISSING):
            return []
        raise


# ------------------------------------------------------------ agents

def connected_runs(db: Conn, model_name: str, model_version: str) -> list[tuple[str, str]]:
    """(agent_id, run_id) of the runs the table marks connected that serve this version."""
    return [(a, r) for a, r in db.execute("SELECT agent_id, run_id FROM agents WHERE model_name = ?"
                                          " AND model_version = ? AND connected = 1",
                                          [model_name, model_version]).fetchall()]


def connected_agents(db: Conn) -> list[tuple[str, str, str, str, bool, str]]:
    """(agent_id, run_id, model, version, managed, desired_version) of every run marked connected."""
    return [(a, r, m, v, bool(managed), d) for a, r, m, v, managed, d in db.execute(
        "SELECT agent_id, run_id, model_name, model_version, managed, desired_version FROM agents"
        " WHERE connected = 1").fetchall()]


def latest_agents(db: Conn, limit: int) -> list[dict[str, Any]]:
    """The newest run of each agent, with how many runs came before it (``restarts``)."""
    return tolerant(db, "SELECT a.*, (SELECT count(*) - 1 FROM agents b WHERE b.agent_id = a.agent_id) AS restarts"
                        " FROM agents a WHERE NOT EXISTS (SELECT 1 FROM agents b WHERE b.agent_id = a.agent_id AND"
                        " (b.started_ns, b.first_seen_ns, b.run_id) > (a.started_ns, a.first_seen_ns, a.run_id))"
                        " ORDER BY a.model_name, a.agent_id LIMIT ?", [limit])


def run_totals(db: Conn) -> list[tuple[str, str, float, float]]:
    """(model, version, rows, dropped rows) summed over every run's stored totals."""
    d = db.dialect  # total(), not sum(): a float never overflows, where sum() over old runs could
    return [(m, v, n or 0, lost or 0) for m, v, n, lost in db.execute(
        f"SELECT model_name, model_version, {d.total('rows')}, {d.total('dropped_rows')} FROM agents"
        " GROUP BY model_name, model_version")]


# ------------------------------------------------------------ models

def model_names(db: Conn) -> list[str]:
    """Every model the collector knows: registered, profiled, served or with windows."""
    return [r["name"] for r in tolerant(db, "SELECT name FROM model_versions UNION SELECT model_name FROM profiles"
                                            " UNION SELECT model_name FROM agents WHERE model_name != ''"
                                            " UNION SELECT DISTINCT model_name FROM windows ORDER BY 1")]


def production_versions(db: Conn) -> dict[str, int]:
    """Model -> its version in production."""
    return {r["name"]: r["version"] for r in tolerant(
        db, "SELECT name, version FROM model_versions WHERE stage = 'production'")}


def recent_traffic(db: Conn, since_ns: int) -> list[dict[str, Any]]:
    """Per model: rows and dropped rows of the raw windows that ended at or after ``since_ns``."""
    return tolerant(db, "SELECT model_name, sum(rows) AS rows, sum(dropped_rows) AS dropped FROM windows"
                        " WHERE end_ns >= ? GROUP BY model_name", [since_ns])


def window_ended_since(db: Conn, model_name: str, model_version: str, since_ns: int) -> bool:
    """Whether a window of the version (raw or rolled up) ended at or after ``since_ns``."""
    params = [model_name, model_version, since_ns]
    return any(db.execute(f"SELECT 1 FROM {table} WHERE model_name = ? AND model_version = ? AND end_ns >= ?"
                          " LIMIT 1", params).fetchone() for table in ("windows", "rollups"))


def monitored_versions(db: Conn, name: str) -> list[str]:
    """Versions of ``name`` with traffic, a profile or evaluations, newest activity first."""
    rows = tolerant(db, "SELECT model_version AS v, max(at) AS at FROM ("
                        " SELECT model_version, evaluated_ns AS at FROM evaluations WHERE model_name = ?"
                        " UNION ALL SELECT model_version, attached_ns FROM profiles WHERE model_name = ?"
                        " UNION ALL SELECT model_version, max(end_ns) FROM windows WHERE model_name = ?"
                        " GROUP BY model_version) AS activity GROUP BY model_version ORDER BY at DESC, model_version DESC",
                    [name, name, name])
    return [r["v"] for r in rows]


def profiled_versions(db: Conn) -> list[tuple[str, str]]:
    """(model, version) of every reference profile, sorted."""
    return [(m, v) for m, v in db.execute("SELECT model_name, model_version FROM profiles"
                                          " ORDER BY model_name, model_version").fetchall()]


def profiled_models(db: Conn) -> set[str]:
    return {m for (m,) in db.execute("SELECT DISTINCT model_name FROM profiles")}
