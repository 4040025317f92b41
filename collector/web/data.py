"""What the web page reads, over the collector's read connection.

Only reads, on ``Store.read()`` (a read-only connection): the page can never change anything.
The SQL lives in the store (``collector.store.fleet``: agents, models, traffic;
``collector.store.listings``: registry and governance tables; alerts and evaluations through
``collector.monitoring.alerts``); here it is shaped for the page. Tables of features still being
built are read tolerantly: empty is fine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from collector.monitoring import alerts
from collector.store import fleet as fleet_rows
from collector.store import listings, paging
from collector.store.engine import Conn
from collector.store.store import Store
from protos import collector_pb2 as pb
from protos import summary_pb2

NS = 1_000_000_000
RATE_SECONDS = 300  # rows/s and recent drops are measured over the last five minutes
MAX_AGENTS = 500
HISTORY = 60  # drift evaluations plotted
MAX_WINDOWS = 300  # recent windows merged for the distributions and the shadow comparison
WINDOW_BYTES = 32 * 1024 * 1024  # ... and at most this much of them


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
    return fleet_rows.model_names(db)


def latest_agents(db: Conn) -> list[dict[str, Any]]:
    """The newest run of each agent, with how many runs came before it."""
    return fleet_rows.latest_agents(db, MAX_AGENTS)


def fleet(store: Store, now_ns: int, agents: list[dict[str, Any]]) -> list[ModelLine]:
    db = store.read()
    lines = {name: ModelLine(name) for name in model_names(db)}
    for name, version in fleet_rows.production_versions(db).items():
        lines.setdefault(name, ModelLine(name)).production = str(version)
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
    for r in fleet_rows.recent_traffic(db, since):
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
    out = listings.model_versions(db, name)
    for r in out:
        try:
            r["gate_result"] = json.loads(r["gate"]) if r["gate"] else {}
            r["metrics_parsed"] = json.loads(r["metrics"] or "{}")
        except ValueError:
            r["gate_result"], r["metrics_parsed"] = {}, {}
    return out


def monitored_versions(db: Conn, name: str) -> list[str]:
    """Versions with traffic, a profile or evaluations, newest evaluation first."""
    return fleet_rows.monitored_versions(db, name)


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
    return listings.rollouts(db, name, kind, limit)


def shadow(db: Conn, name: str) -> dict[str, Any] | None:
    return listings.shadow(db, name)


# ------------------------------------------------------------ governance


def approvals(db: Conn, pending: bool, limit: int = 50) -> list[dict[str, Any]]:
    return listings.approvals(db, pending, limit)


def retraining(db: Conn, active: bool, limit: int = 50) -> list[dict[str, Any]]:
    return listings.retraining_requests(db, active, limit)


def audit_page(db: Conn, model: str, before: int, limit: int) -> list[dict[str, Any]]:
    """``limit`` rows older than id ``before`` (0: the newest), newest first."""
    if not model.isprintable():  # no stored name is (ingest refuses them), and PostgreSQL cannot compare a NUL
        return []
    return listings.audit_page(db, model, before, limit)
