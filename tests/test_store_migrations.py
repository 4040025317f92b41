"""collector.store.migrations: one list of migrations builds the schema on SQLite (exactly as
collector.schema built it) and on PostgreSQL, with the same refusing triggers and partial unique indexes."""
from __future__ import annotations

import json
import re
import sqlite3
import threading
from pathlib import Path

import pytest

from agent.errors import FailedPrecondition
from collector.store.engine import Conn, StoreIntegrityError, open_engine
from collector.store.migrations import MIGRATIONS, migrate

OLD_SCHEMA = Path(__file__).parent / "data" / "sqlite-schema-11.json"
OLD_MIGRATIONS = ["initial_schema", "reference_profiles", "drift_evaluations_and_alerts", "audit_trail",
                  "model_registry", "stages_and_approvals", "retirement_and_retraining", "rollouts_and_shadow",
                  "row_samples", "version_feature_names", "alert_resolved_reason"]


def _describe(conn: sqlite3.Connection) -> dict:
    """Every table's columns, indexes (unique, partial WHERE, columns) and triggers of a SQLite file."""
    out: dict = {}
    for kind, name, table, sql in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"):
        if kind == "table":
            out[name] = list(conn.execute(f'PRAGMA table_info("{name}")'))
            out[f"{name} autoincrement"] = "AUTOINCREMENT" in sql.upper()
            indexes = []
            for _, index, unique, origin, partial in conn.execute(f'PRAGMA index_list("{name}")'):
                columns = [r[2] for r in conn.execute(f'PRAGMA index_xinfo("{index}")')]
                isql = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", [index]).fetchone()[0] or ""
                where = re.sub(r"\s+", " ", isql.split(" WHERE ", 1)[1]) if " WHERE " in isql else ""
                indexes.append((index if origin == "c" else origin, unique, partial, columns, where))
            out[f"{name} indexes"] = sorted(indexes, key=str)
        elif kind == "trigger":
            out[f"trigger {name}"] = (table, re.sub(r'[\s"]+', " ", sql))
    return out


# What migrations after 11 add (collector.store.migrations), left out of the comparison with the old file.
NEWER_TABLES = {"artifacts", "rollup_passes", "high_water",  # 12: shared_by_collectors
                "leases", "collectors"}  # 13: fleet_leases_and_heartbeats
NEWER_COLUMNS = {"agents": {"collector_id"}}


def _since_11(described: dict) -> dict:
    out = {k: v for k, v in described.items() if k.removesuffix(" indexes").removesuffix(" autoincrement")
           not in NEWER_TABLES}
    for table, columns in NEWER_COLUMNS.items():
        out[table] = [c for c in out[table] if c[1] not in columns]
    return out


def test_sqlite_schema_is_exactly_the_one_the_old_migrations_build(tmp_path: Path) -> None:
    """tests/data/sqlite-schema-11.json describes the file the collector built with sqlite-utils before
    the store had engines (its ``collector.schema``, migrations 1-11): files built before and after are
    interchangeable, and an old file is at migration 11 with nothing left to do."""
    engine = open_engine(tmp_path / "new.db")
    conn = engine.writer()
    assert migrate(conn) == len(MIGRATIONS)
    assert json.loads(json.dumps(_since_11(_describe(conn.raw)))) == json.loads(OLD_SCHEMA.read_text())
    names = [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY id")]
    assert names == [fn.__name__ for fn in MIGRATIONS] and names[:11] == OLD_MIGRATIONS


@pytest.fixture
def migrated(db_url: str):
    engine = open_engine(db_url)
    conn = engine.writer()
    assert migrate(conn) == len(MIGRATIONS)
    yield conn
    conn.close()
    engine.close()


def test_migrate_twice_changes_nothing(migrated: Conn) -> None:
    assert migrate(migrated) == 0
    assert [r[0] for r in migrated.execute("SELECT id FROM migrations ORDER BY id")] == \
        list(range(1, len(MIGRATIONS) + 1))


def test_a_database_newer_than_the_code_is_refused(migrated: Conn) -> None:
    migrated.execute("INSERT INTO migrations (id, name, applied_at) VALUES (?, 'from_the_future', '')",
                     [len(MIGRATIONS) + 1])
    with pytest.raises(FailedPrecondition, match="this collector knows"):
        migrate(migrated)


def _version(conn: Conn, name: str, version: int, stage: str = "candidate") -> None:
    conn.insert("model_versions", {"name": name, "version": version, "sha256": "s", "size": 1, "schema": "{}",
                                   "registered_by": "t", "registered_ns": 1, "stage": stage})


def test_triggers_and_partial_unique_indexes_hold_on_both_engines(migrated: Conn) -> None:
    c = migrated
    _version(c, "m", 1, "production")
    _version(c, "m", 2)
    with pytest.raises(StoreIntegrityError):  # one production version per model
        c.execute("UPDATE model_versions SET stage = 'production' WHERE version = 2")
    c.execute("UPDATE model_versions SET stage = 'retired' WHERE version = 1")
    c.execute("UPDATE model_versions SET stage = 'production', stage_ns = 5 WHERE version = 2")
    with pytest.raises(StoreIntegrityError, match="a retired model version cannot change stage"):
        c.execute("UPDATE model_versions SET stage = 'candidate' WHERE version = 1")
    c.execute("UPDATE model_versions SET retire_reason = 'old' WHERE version = 1")  # other fields may change
    with pytest.raises(StoreIntegrityError, match="model versions are never deleted"):
        c.execute("DELETE FROM model_versions WHERE version = 2")
    assert c.execute("SELECT version, stage FROM model_versions ORDER BY version").fetchall() == \
        [(1, "retired"), (2, "production")]

    approval = {"model": "m", "version": 2, "requested_by": "a", "requested_at": 1, "reason": "r"}
    first = c.insert("approvals", approval, returning="id")
    with pytest.raises(StoreIntegrityError):  # one pending request per version
        c.insert("approvals", approval)
    c.update("approvals", {"id": first}, {"state": "approved"})
    # A new one once decided. (PostgreSQL's identity spent an id on the refused insert: ids may have gaps.)
    assert c.insert("approvals", approval, returning="id") > first

    request = {"model": "m", "version": "2", "opened_by": "a", "opened_ns": 1, "reason": "r"}
    c.insert("retraining_requests", request)
    with pytest.raises(StoreIntegrityError):  # one open or accepted request per version
        c.insert("retraining_requests", {**request, "state": "accepted"})
    c.insert("retraining_requests", {**request, "state": "rejected"})

    c.insert("audit", {"at_ns": 1, "actor": "a", "action": "x", "object": "o", "prev_hash": "0", "hash": "h"})
    with pytest.raises(StoreIntegrityError, match="append-only: UPDATE refused"):
        c.execute("UPDATE audit SET actor = 'b'")
    with pytest.raises(StoreIntegrityError, match="append-only: DELETE refused"):
        c.execute("DELETE FROM audit")


def test_the_rowid_tables_answer_to_rowid_on_both_engines(migrated: Conn) -> None:
    row = {"agent_id": "a", "run_id": "r", "seq": 1, "model_name": "m", "model_version": "1", "start_ns": 1,
           "end_ns": 2, "rows": 3, "calls": 1, "dropped_rows": 0, "errors": 0, "body": b"\x00"}
    first = migrated.insert("windows", row, returning="rowid")
    second = migrated.insert("windows", {**row, "seq": 2}, returning="rowid")
    assert second > first > 0
    assert migrated.execute("SELECT seq FROM windows WHERE rowid > ?", [first]).fetchall() == [(2,)]
    big = 2**62  # ns timestamps need 64-bit integers
    migrated.update("windows", {"seq": 2}, {"end_ns": big})
    assert migrated.execute("SELECT max(end_ns) FROM windows").fetchone() == (big,)


def test_migration_11_moves_resolution_reasons_on_both_engines(db_url: str) -> None:
    engine = open_engine(db_url)
    conn = engine.writer()
    with conn.transaction():  # a database at migration 10, as a collector of that time left it
        conn.execute("CREATE TABLE migrations (id INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)")
        for number, fn in enumerate(MIGRATIONS[:10], 1):
            fn(conn)
            conn.execute("INSERT INTO migrations (id, name, applied_at) VALUES (?, ?, '')", [number, fn.__name__])
    alert = {"model_name": "m", "model_version": "1", "column": "x", "kind": "drift", "opened_ns": 1}
    from_audit = conn.insert("alerts", {**alert, "state": "resolved", "summary": "psi 0.3"}, returning="id")
    from_summary = conn.insert("alerts", {**alert, "state": "resolved", "summary": "psi 0.4 [resolved: quiet 100%]"},
                               returning="id")
    still_open = conn.insert("alerts", {**alert, "state": "open", "summary": "x [resolved: no]"}, returning="id")
    for reason in ("first", "newest wins"):
        conn.insert("audit", {"at_ns": 1, "actor": "a", "action": "alert.resolve", "object": f"alert/{from_audit}",
                              "reason": reason, "prev_hash": "0", "hash": "h"})
    assert migrate(conn) == len(MIGRATIONS) - 10
    got = {r["id"]: (r["summary"], r["resolved_reason"])
           for r in conn.query("SELECT id, summary, resolved_reason FROM alerts")}
    assert got == {from_audit: ("psi 0.3", "newest wins"), from_summary: ("psi 0.4", "quiet 100%"),
                   still_open: ("x [resolved: no]", "")}
    conn.close()
    engine.close()


def test_collectors_starting_together_on_postgresql_agree(postgres_url: str) -> None:
    engine = open_engine(postgres_url)
    conns = [engine.connect() for _ in range(3)]
    applied: list[int] = []
    errors: list[BaseException] = []

    def run(conn: Conn) -> None:
        try:
            applied.append(migrate(conn))
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and sum(applied) == len(MIGRATIONS)
    assert conns[0].execute("SELECT count(*) FROM migrations").fetchone() == (len(MIGRATIONS),)
    for c in conns:
        c.close()
    engine.close()
