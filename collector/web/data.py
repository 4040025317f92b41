"""What the web page reads: plain queries over the collector's read connection.

Only SELECTs, on ``Store.read()`` (a ``query_only`` connection): the page can
never change anything. Where a core module already has a reader (alerts,
approvals, retraining, registry rows) it is used; the rest (fleet rates, the
rollouts and shadows tables, the audit trail by pages) is read here. Tables of
features still being built are read tolerantly: empty is fine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from collector.store.engine import Conn, StoreError

from collector.monitoring import alerts

from collector.store import paging
from collector.store.store import Store
from protos import collector_pb2 as pb
from protos import summary_pb2

NS = 1_000_000_000
RATE_SECONDS = 300  # rows/s and recent drops are measured over the last five minutes
MAX_AGENTS = 500
HISTORY = 60  # drift evaluations plotted
MAX_WINDOWS = 300  # recent windows merged for the distributions and the shadow comparison
WINDOW_BYTES = 32 * 1024 * 1024  # ... and at most this much of them


def _rows(db: Conn, sql: str, params: list[Any] | tuple = ()) -> list[dict[str, Any]]:
    """Rows as dicts; [] when a table is not there (an older file, or a feature not yet migrated)."""
    try:
        return list(db.query(sql, list(params)))
    except StoreError as exc:
        if any(s in str(exc) for s in ("no such table", "no such column", "does not exist")):
            return []
        raise


@dataclass
class ModelLine:
    name: str
    production: str = ""
    versions_served: set[str] = field(default_factory=set)
    agents_connected: int = 0
    rows_per_second: float = 0.0
    dropped_recent: int = 0
    dropped_total: int = 0
    rows_total: int = 0
    open_alerts: int = 0


def model_names(db: Conn) -> list[str]:
    return [r["name"] for r in _rows(db, "SELECT name FROM model_versions UNION SELECT model_name FROM profiles"
                                         " UNION SELECT model_name FROM agents WHERE model_name != ''"
                                         " UNION SELECT DISTINCT model_name FROM windows ORDER BY 1")]


def latest_agents(db: Conn) -> list[dict[str, Any]]:
    """The newest run of each agent, with how many runs came before it."""
    return _rows(db, "SELECT a.*, (SELECT count(*) - 1 FROM agents b WHERE b.agent_id = a.agent_id) AS restarts"
                     " FROM agents a WHERE NOT EXISTS (SELECT 1 FROM agents b WHERE b.agent_id = a.agent_id AND"
                     " (b.started_ns, b.first_seen_ns, b.run_id) > (a.started_ns, a.first_seen_ns, a.run_id))"
                     " ORDER BY a.model_name, a.agent_id LIMIT ?", [MAX_AGENTS])


def fleet(store: Store, now_ns: int, agents: list[dict[str, Any]]) -> list[ModelLine]:
    db = store.read()
    lines = {name: ModelLine(name) for name in model_names(db)}
    for r in _rows(db, "SELECT name, version FROM model_versions WHERE stage = 'production'"):
        lines[r["name"]].production = str(r["version"])
    for a in agents:
        line = lines.setdefault(a["model_name"], ModelLine(a["model_name"]))
        if a["connected"]:
            line.agents_connected += 1
            line.versions_served.add(a["model_version"])
    for t in store.model_totals():
        line = lines.setdefault(t.model_name, ModelLine(t.model_name))
        line.dropped_total += t.dropped_rows
        line.rows_total += t.rows
    since = now_ns - RATE_SECONDS * NS
    for r in _rows(db, "SELECT model_name, sum(rows) AS rows, sum(dropped_rows) AS dropped FROM windows"
                       " WHERE end_ns >= ? GROUP BY model_name", [since]):
        line = lines.setdefault(r["model_name"], ModelLine(r["model_name"]))
        line.rows_per_second = r["rows"] / RATE_SECONDS
        line.dropped_recent = r["dropped"]
    for a in agents:  # rows an agent's spool had to give up never reach a window: count them too
        if a["model_name"] in lines:
            lines[a["model_name"]].dropped_total += a.get("spool_dropped_rows", 0)
    for alert in alerts.alerts(db):
        if alert.model_name in lines:
            lines[alert.model_name].open_alerts += 1
    return sorted(lines.values(), key=lambda line: line.name)


# ------------------------------------------------------------ one model


def versions(db: Conn, name: str) -> list[dict[str, Any]]:
    """The registry's versions of ``name``, newest first, with the gate result parsed."""
    out = _rows(db, "SELECT * FROM model_versions WHERE name = ? ORDER BY version DESC", [name])
    for r in out:
        try:
            r["gate_result"] = json.loads(r["gate"]) if r["gate"] else {}
            r["metrics_parsed"] = json.loads(r["metrics"] or "{}")
        except ValueError:
            r["gate_result"], r["metrics_parsed"] = {}, {}
    return out


def monitored_versions(db: Conn, name: str) -> list[str]:
    """Versions with traffic, a profile or evaluations, newest evaluation first."""
    rows = _rows(db, "SELECT model_version AS v, max(at) AS at FROM ("
                     " SELECT model_version, evaluated_ns AS at FROM evaluations WHERE model_name = ?"
                     " UNION ALL SELECT model_version, attached_ns FROM profiles WHERE model_name = ?"
                     " UNION ALL SELECT model_version, max(end_ns) FROM windows WHERE model_name = ?"
                     " GROUP BY model_version) GROUP BY model_version ORDER BY at DESC, model_version DESC",
                 [name, name, name])
    return [r["v"] for r in rows]


def evaluations(db: Conn, name: str, version: str) -> list[pb.DriftEvaluation]:
    """The latest evaluations, oldest first (the plots' time order)."""
    return list(reversed(alerts.history(db, name, version, HISTORY)))


def recent_windows(store: Store, name: str, version: str, since_ns: int) -> list[summary_pb2.WindowSummary]:
    """The newest windows since ``since_ns``, oldest first: at most MAX_WINDOWS and WINDOW_BYTES of them
    (each of the page's workers holds what it merges)."""
    rows = store.window_rows(name, version, since_ns, include_summaries=True, limit=MAX_WINDOWS)
    page = paging.take(rows, "windows", max_bytes=WINDOW_BYTES, limit=MAX_WINDOWS)
    return [i.summary for i in reversed(page.items)]


def rollouts(db: Conn, name: str = "", kind: str = "", limit: int = 20) -> list[dict[str, Any]]:
    """Pushes of a version (or a shadow) to the agents, newest first, each with its agents' acks."""
    where, params = [], []
    if name:
        where.append("model = ?")
        params.append(name)
    if kind:
        where.append("kind = ?")
        params.append(kind)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    out = _rows(db, f"SELECT * FROM rollouts {clause} ORDER BY id DESC LIMIT ?", [*params, limit])
    for r in out:
        r["acks"] = _rows(db, "SELECT * FROM rollout_acks WHERE rollout_id = ? ORDER BY agent_id", [r["id"]])
    return out


def shadow(db: Conn, name: str) -> dict[str, Any] | None:
    found = _rows(db, "SELECT * FROM shadows WHERE model = ?", [name])
    return found[0] if found else None


# ------------------------------------------------------------ governance


def approvals(db: Conn, pending: bool, limit: int = 50) -> list[dict[str, Any]]:
    where = "state = 'pending'" if pending else "state != 'pending'"
    return _rows(db, f"SELECT * FROM approvals WHERE {where} ORDER BY id DESC LIMIT ?", [limit])


def retraining(db: Conn, active: bool, limit: int = 50) -> list[dict[str, Any]]:
    where = "state IN ('open', 'accepted')" if active else "state NOT IN ('open', 'accepted')"
    return _rows(db, f"SELECT * FROM retraining_requests WHERE {where} ORDER BY id DESC LIMIT ?", [limit])


def audit_page(db: Conn, model: str, before: int, limit: int) -> list[dict[str, Any]]:
    """``limit`` rows older than id ``before`` (0: the newest), newest first."""
    where, params = [], []
    if model:
        where.append("model_name = ?")
        params.append(model)
    if before > 0:
        where.append("id < ?")
        params.append(before)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    return _rows(db, f"SELECT * FROM audit {clause} ORDER BY id DESC LIMIT ?", [*params, limit])
