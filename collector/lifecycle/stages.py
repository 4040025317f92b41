"""A model version's stage row and the one way to change it: read by approvals and rollouts alike.

``collector.lifecycle.approvals`` decides when a version moves (requests, two-person approval)
and ``collector.lifecycle.rollout`` carries out rollbacks; both move stages through ``move``,
so every stage change writes its audit row. Runs inside ``Store.write`` with the writer's ``db``.
"""
from __future__ import annotations

from typing import Any

from collector.store.engine import Conn

from agent.errors import InvalidArgument, NotFound
from collector.store import audit, versions


def version(db: Conn, name: str, version: int) -> dict[str, Any]:
    """The row of ``version`` of ``name`` (stage and gate); NotFound when there is none."""
    if not version:
        raise InvalidArgument("a version number is required")
    row = versions.stage_row(db, name, version)
    if row is None:
        raise NotFound(f"model {name!r} has no version {version}")
    return row


def move(db: Conn, name: str, version: int, before: str, after: str, actor: str, reason: str,
         now_ns: int) -> None:
    """Move ``version`` of ``name`` from stage ``before`` to ``after``, with its audit row."""
    versions.set_stage(db, name, version, after, now_ns)
    audit.append(db, actor, "model.stage", f"model/{name}/{version}", model_name=name,
                 before={"stage": before}, after={"stage": after}, reason=reason, now_ns=now_ns)
