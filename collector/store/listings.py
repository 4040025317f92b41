"""Newest-first listings of the registry and governance tables, as the web page shows them.

Rows as dicts, read tolerantly (``fleet.tolerant``: a table not there yet lists nothing). The
domain modules that own these tables keep their own readers for the RPCs; these are the page's
plain views, bounded by ``limit``.
"""
from __future__ import annotations

from typing import Any

from collector.store.engine import Conn
from collector.store.fleet import tolerant


def _where(filters: dict[str, Any]) -> tuple[str, list[Any]]:
    """``WHERE a = ? AND ...`` of the filters that are set (falsy ones are left out)."""
    used = {k: v for k, v in filters.items() if v}
    if not used:
        return "", []
    return "WHERE " + " AND ".join(f"{k} = ?" for k in used), list(used.values())


def model_versions(db: Conn, name: str) -> list[dict[str, Any]]:
    """The registry's versions of ``name``, newest first."""
    return tolerant(db, "SELECT * FROM model_versions WHERE name = ? ORDER BY version DESC", [name])


def rollouts(db: Conn, name: str = "", kind: str = "", limit: int = 20) -> list[dict[str, Any]]:
    """Pushes of a version (or a shadow) to the agents, newest first, each with its agents' acks (``acks``)."""
    clause, params = _where({"model": name, "kind": kind})
    out = tolerant(db, f"SELECT * FROM rollouts {clause} ORDER BY id DESC LIMIT ?", [*params, limit])
    for r in out:
        r["acks"] = tolerant(db, "SELECT * FROM rollout_acks WHERE rollout_id = ? ORDER BY agent_id", [r["id"]])
    return out


def shadow(db: Conn, name: str) -> dict[str, Any] | None:
    """The model's current shadow row, None without one."""
    found = tolerant(db, "SELECT * FROM shadows WHERE model = ?", [name])
    return found[0] if found else None


def approvals(db: Conn, pending: bool, limit: int) -> list[dict[str, Any]]:
    where = "state = 'pending'" if pending else "state != 'pending'"
    return tolerant(db, f"SELECT * FROM approvals WHERE {where} ORDER BY id DESC LIMIT ?", [limit])


def retraining_requests(db: Conn, active: bool, limit: int) -> list[dict[str, Any]]:
    where = "state IN ('open', 'accepted')" if active else "state NOT IN ('open', 'accepted')"
    return tolerant(db, f"SELECT * FROM retraining_requests WHERE {where} ORDER BY id DESC LIMIT ?", [limit])


def audit_page(db: Conn, model: str, before: int, limit: int) -> list[dict[str, Any]]:
    """``limit`` audit rows older than id ``before`` (0: the newest), of ``model`` if given, newest first."""
    where, params = [], []
    if model:
        where.append("model_name = ?")
        params.append(model)
    if before > 0:
        where.append("id < ?")
        params.append(before)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    return tolerant(db, f"SELECT * FROM audit {clause} ORDER BY id DESC LIMIT ?", [*params, limit])
