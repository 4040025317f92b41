"""Rollout rows: rollouts, their acks per agent run, shadows, and managed agents' desired and served state.

Plain reads and writes for ``collector.lifecycle.rollout`` (which plans the commands, checks the rules and
writes the audit rows). SQL for both engines.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from collector.store.dialect import NO_LIMIT
from collector.store.engine import Conn


def _one(rows: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
    """The first row, reading them all (so that no statement stays open on the connection)."""
    found = list(rows)
    return found[0] if found else None


# ------------------------------------------------------------ rollouts


def insert(db: Conn, model: str, version: int, kind: str, actor: str, reason: str, started_ns: int,
           from_version: int = 0, share: float = 0.0) -> int:
    """A rollout row; its id."""
    return db.insert("rollouts", {"model": model, "version": version, "kind": kind, "actor": actor,
                                  "reason": reason, "started_ns": started_ns, "from_version": from_version,
                                  "share": share}, returning="id")


def get(db: Conn, rollout_id: int) -> dict[str, Any] | None:
    return _one(db.query("SELECT * FROM rollouts WHERE id = ?", [rollout_id]))


def exists(db: Conn, rollout_id: int) -> bool:
    return db.execute("SELECT 1 FROM rollouts WHERE id = ?", [rollout_id]).fetchone() is not None


def latest(db: Conn, model: str, kinds: Iterable[str]) -> dict[str, Any] | None:
    """The model's newest rollout of one of ``kinds``."""
    kinds = list(kinds)
    return _one(db.query(f"SELECT * FROM rollouts WHERE model = ? AND kind IN ({', '.join('?' * len(kinds))})"
                         " ORDER BY id DESC LIMIT 1", [model, *kinds]))


def made_production_from(db: Conn, model: str, version: int) -> int | None:
    """from_version of the newest promote or rollback that made ``version`` production; None if none did."""
    row = db.execute("SELECT from_version FROM rollouts WHERE model = ? AND version = ? AND kind IN"
                     " ('promote', 'rollback') ORDER BY id DESC LIMIT 1", [model, version]).fetchone()
    return row[0] if row else None


def kinds_started(db: Conn, model: str, started_ns: int) -> set[str]:
    """The kinds of the model's rollouts started at ``started_ns`` (one transaction's clock reading)."""
    return {k for (k,) in db.execute("SELECT kind FROM rollouts WHERE model = ? AND started_ns = ?",
                                     [model, started_ns]).fetchall()}


def listing(db: Conn, model: str = "", before_id: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Rollouts (of ``model`` if given) older than ``before_id`` (0: all), newest first, at most ``limit``."""
    where, params = ["id < ?"], [before_id or 2**63 - 1]
    if model:
        where.append("model = ?")
        params.append(model)
    return db.query(f"SELECT * FROM rollouts WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
                    [*params, NO_LIMIT if limit is None else limit])


# ------------------------------------------------------------ acks


def acks(db: Conn, rollout_id: int) -> list[dict[str, Any]]:
    return list(db.query("SELECT * FROM rollout_acks WHERE rollout_id = ? ORDER BY agent_id, run_id", [rollout_id]))


def add_pending_ack(db: Conn, rollout_id: int, agent_id: str, run_id: str) -> None:
    """A pending ack, unless the run has one for this rollout already (an answer is kept)."""
    db.insert("rollout_acks", {"rollout_id": rollout_id, "agent_id": agent_id, "run_id": run_id,
                               "state": "pending", "error": "", "at_ns": 0}, ignore=True)


def set_ack(db: Conn, rollout_id: int, agent_id: str, run_id: str, state: str, error: str, at_ns: int) -> None:
    db.upsert("rollout_acks", {"rollout_id": rollout_id, "agent_id": agent_id, "run_id": run_id, "state": state,
                               "error": error, "at_ns": at_ns}, key=["rollout_id", "agent_id", "run_id"])


# ------------------------------------------------------------ shadows


def shadow(db: Conn, model: str) -> dict[str, Any] | None:
    """The model's shadow with its version's artifact: version, share, started_ns, actor, sha256, size,
    schema, feature_names."""
    return _one(db.query("SELECT s.version, s.share, s.started_ns, s.actor, v.sha256, v.size, v.schema,"
                         " v.feature_names FROM shadows s JOIN model_versions v"
                         " ON v.name = s.model AND v.version = s.version WHERE s.model = ?", [model]))


def shadowed(db: Conn, model: str, version: int) -> bool:
    return db.execute("SELECT 1 FROM shadows WHERE model = ? AND version = ?", [model, version]).fetchone() is not None


def set_shadow(db: Conn, model: str, version: int, share: float, started_ns: int, actor: str) -> None:
    db.upsert("shadows", {"model": model, "version": version, "share": share, "started_ns": started_ns,
                          "actor": actor}, key=["model"])


def delete_shadow(db: Conn, model: str) -> None:
    db.execute("DELETE FROM shadows WHERE model = ?", [model])


# ------------------------------------------------------------ agents' state


def set_desired_version(db: Conn, agent_id: str, run_id: str, version: str) -> None:
    db.execute("UPDATE agents SET desired_version = ? WHERE agent_id = ? AND run_id = ?", [version, agent_id, run_id])


def set_served_state(db: Conn, agent_id: str, run_id: str, fields: dict[str, Any], now_ns: int) -> None:
    """What the agent run serves now (``fields``: model_version, model_sha256, model_error, shadow_version,
    shadow_share), seen at ``now_ns``; the run's row is made if it has none."""
    db.insert("agents", {"agent_id": agent_id, "run_id": run_id, "first_seen_ns": now_ns}, ignore=True)
    db.update("agents", {"agent_id": agent_id, "run_id": run_id}, {**fields, "last_seen_ns": now_ns})
