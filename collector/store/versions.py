"""The registry's rows: model versions (stage, gate, retirement, artifact) and their reference profiles.

Plain reads and writes for ``collector.lifecycle`` (registry, approvals, rollout, retraining): no checks,
no messages, no audit rows -- those stay with the lifecycle step that calls them. Every function takes a
``Conn`` (the writer's inside ``Store.write``, or ``Store.read()``), and its SQL runs on both engines.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from collector.store.engine import Conn


def _one(rows: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
    """The first row, reading them all (so that no statement stays open on the connection)."""
    found = list(rows)
    return found[0] if found else None


# a version with whether it has a profile (a comparison is a bool on PostgreSQL, 0/1 on SQLite)
_WITH_PROFILE = ("SELECT v.*, p.model_name IS NOT NULL AS has_profile FROM model_versions v LEFT JOIN profiles p"
                 " ON p.model_name = v.name AND p.model_version = CAST(v.version AS TEXT)")


# ------------------------------------------------------------ one version


def get(db: Conn, name: str, version: int = 0) -> dict[str, Any] | None:
    """Every column of ``version`` of ``name`` (0: the newest) and ``has_profile``; None when there is none."""
    if version:
        rows = db.query(f"{_WITH_PROFILE} WHERE v.name = ? AND v.version = ?", [name, version])
    else:
        rows = db.query(f"{_WITH_PROFILE} WHERE v.name = ? ORDER BY v.version DESC LIMIT 1", [name])
    return _one(rows)


def stage_row(db: Conn, name: str, version: int) -> dict[str, Any] | None:
    """name, version, stage, gate, gate_passed of one version."""
    return _one(db.query("SELECT name, version, stage, gate, gate_passed FROM model_versions"
                         " WHERE name = ? AND version = ?", [name, version]))


def schema_and_names(db: Conn, name: str, version: int) -> dict[str, Any] | None:
    return _one(db.query("SELECT schema, feature_names FROM model_versions WHERE name = ? AND version = ?",
                         [name, version]))


def artifact(db: Conn, name: str, version: int) -> dict[str, Any] | None:
    """sha256, size, stage, artifact_removed_ns of one version."""
    return _one(db.query("SELECT sha256, size, stage, artifact_removed_ns FROM model_versions"
                         " WHERE name = ? AND version = ?", [name, version]))


def known(db: Conn, name: str) -> bool:
    return db.execute("SELECT 1 FROM model_versions WHERE name = ? LIMIT 1", [name]).fetchone() is not None


def listing(db: Conn, name: str = "", after: tuple[str, int] | None = None) -> Iterator[dict[str, Any]]:
    """Versions (of ``name`` if given, past the key ``after``), as ``get`` gives them, by name and version."""
    where, params = (["v.name = ?"], [name]) if name else ([], [])
    if after is not None:
        where.append("(v.name, v.version) > (?, ?)")
        params.extend(after)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return db.query(f"{_WITH_PROFILE}{clause} ORDER BY v.name, v.version", params)


# ------------------------------------------------------------ a model's versions


def production(db: Conn, name: str) -> dict[str, Any] | None:
    """version, sha256, size, schema, feature_names, stage_ns of the model's production version."""
    return _one(db.query("SELECT version, sha256, size, schema, feature_names, stage_ns FROM model_versions"
                         " WHERE name = ? AND stage = 'production'", [name]))


def stages(db: Conn, name: str) -> dict[int, str]:
    """version -> stage of every version of the model."""
    return dict(db.execute("SELECT version, stage FROM model_versions WHERE name = ?", [name]).fetchall())


def registered_ns(db: Conn, name: str) -> dict[int, int]:
    """version -> when it was registered, of every version of the model."""
    return dict(db.execute("SELECT version, registered_ns FROM model_versions WHERE name = ?", [name]).fetchall())


def newest_archived(db: Conn, name: str) -> int:
    """The version archived most recently (0: none)."""
    row = db.execute("SELECT version FROM model_versions WHERE name = ? AND stage = 'archived'"
                     " ORDER BY stage_ns DESC, version DESC LIMIT 1", [name]).fetchone()
    return row[0] if row else 0


def gate_baseline(db: Conn, name: str, version: int) -> tuple[int, str, str] | None:
    """(version, schema, metrics) of the version a gate compares ``version`` with: the production
    version, else the newest earlier version whose gate passed."""
    return db.execute("SELECT version, schema, metrics FROM model_versions WHERE name = ? AND version != ?"
                      " AND (stage = 'production' OR (version < ? AND gate_passed = 1))"
                      " ORDER BY stage = 'production' DESC, version DESC LIMIT 1",
                      [name, version, version]).fetchone()


def next_version(db: Conn, name: str) -> int:
    return db.execute("SELECT coalesce(max(version), 0) + 1 FROM model_versions WHERE name = ?",
                      [name]).fetchone()[0]


# ------------------------------------------------------------ writes


def insert(db: Conn, row: dict[str, Any]) -> None:
    db.insert("model_versions", row)


def set_stage(db: Conn, name: str, version: int, stage: str, now_ns: int) -> None:
    db.execute("UPDATE model_versions SET stage = ?, stage_ns = ? WHERE name = ? AND version = ?",
               [stage, now_ns, name, version])


def retire(db: Conn, name: str, version: int, reason: str, now_ns: int) -> None:
    db.execute("UPDATE model_versions SET stage = 'retired', stage_ns = ?, retired_ns = ?, retire_reason = ?"
               " WHERE name = ? AND version = ?", [now_ns, now_ns, reason, name, version])


def set_gate(db: Conn, name: str, version: int, gate_json: str, passed: bool, now_ns: int) -> None:
    db.execute("UPDATE model_versions SET gate = ?, gate_passed = ?, gated_ns = ? WHERE name = ? AND version = ?",
               [gate_json, int(passed), now_ns, name, version])


def retired_before(db: Conn, cutoff_ns: int) -> list[tuple[str, int, str, int]]:
    """(name, version, sha256, retired_ns) of versions retired at or before ``cutoff_ns`` whose artifact
    is not marked removed yet."""
    return db.execute("SELECT name, version, sha256, retired_ns FROM model_versions WHERE stage = 'retired'"
                      " AND artifact_removed_ns = 0 AND retired_ns <= ? ORDER BY name, version",
                      [cutoff_ns]).fetchall()


def artifact_in_use(db: Conn, sha256: str) -> bool:
    """Whether a version that is not retired has this artifact."""
    return db.execute("SELECT 1 FROM model_versions WHERE sha256 = ? AND stage != 'retired' LIMIT 1",
                      [sha256]).fetchone() is not None


def mark_artifact_removed(db: Conn, name: str, version: int, now_ns: int) -> None:
    db.execute("UPDATE model_versions SET artifact_removed_ns = ? WHERE name = ? AND version = ?",
               [now_ns, name, version])


# ------------------------------------------------------------ profiles


def save_profile(db: Conn, row: dict[str, Any]) -> None:
    """Insert or replace the profile of (row["model_name"], row["model_version"])."""
    db.upsert("profiles", row, key=["model_name", "model_version"])


def profile_body(db: Conn, model: str, version: str) -> bytes | None:
    """The serialised ReferenceProfile of a model version; None when it has none."""
    row = db.execute("SELECT body FROM profiles WHERE model_name = ? AND model_version = ?",
                     [model, version]).fetchone()
    return bytes(row[0]) if row else None
