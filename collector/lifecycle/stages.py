"""A model version's stage row and the one way to change it: read by approvals and rollouts alike.

``collector.lifecycle.approvals`` decides when a version moves (requests, two-person approval)
and ``collector.lifecycle.rollout`` carries out rollbacks; both move stages through ``move``,
so every stage change writes its audit row. Runs inside ``Store.write`` with the writer's ``db``.
"""
from __future__ import annotations

from typing import Any

from collector.store.engine import Conn

from agent.errors import InvalidArgument, NotFound
from collector.store import audit


def version(db: Conn, name: str, version: int) -> dict[str, Any]:
    """The row of ``version`` of ``name`` (stage and gate); NotFound when there is none."""
    if not version:
        raise InvalidArgument("a version number is required")
    rows = list(db.query("SELECT name, version, stage, gate, gate_passed FROM model_versions"
                         " WHERE name = ? AND version = ?", [name, version]))
    if not rows:
        raise NotFound(f"model {name!r} has no version {version}")
    return rows[0]


def move(db: Conn, name: str, version: int, before: str, after: str, actor: str, reason: str,
         now_ns: int) -> None:
    """Move ``version`` of ``name`` from stage ``before`` to ``after``, with its audit row."""
    db.execute("UPDATE model_versions SET stage = ?, stage_ns = ? WHERE name = ? AND version = ?",
               [after, now_ns, name, version])
    audit.append(db, actor, "model.stage", f"model/{name}/{version}", model_name=name,
                 before={"stage": before}, after={"stage": after}, reason=reason, now_ns=now_ns)
