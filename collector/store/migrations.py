"""The collector's schema as one list of migrations, for both engines.

The same ids, names and order as the migrations SQLite databases already carry
(``collector.schema.MIGRATIONS``); each is written once over ``collector.store.dialect`` (columns,
indexes, refusing triggers), so that a SQLite database built here has exactly the tables, indexes and
triggers the older code built -- old and new files stay interchangeable -- and PostgreSQL gets the
same schema in its own types. Append new migrations; never edit or reorder applied ones.
"""
from __future__ import annotations

import datetime
import logging
from collections.abc import Callable

from agent.errors import FailedPrecondition
from collector.store.dialect import Column
from collector.store.engine import Conn

log = logging.getLogger(__name__)

SPOOL_FIELDS = ("windows", "bytes", "dropped_windows", "dropped_rows", "rejected_windows")
LISTED = ("start_ns", "rows", "calls", "dropped_rows", "errors")  # scalars besides the keys and end_ns
RESOLVED_SUFFIX = " [resolved: "  # how migration 10's collectors appended a resolution's reason to the summary


def _int(name: str, not_null: bool = True, default: str | None = None) -> Column:
    return Column(name, "int", not_null, default)


def _text(name: str, not_null: bool = True, default: str | None = None) -> Column:
    return Column(name, "text", not_null, default)


def _run(conn: Conn, statements: str | list[str]) -> None:
    for sql in [statements] if isinstance(statements, str) else statements:
        conn.execute(sql)


def _index(conn: Conn, table: str, columns: list[str], *, name: str = "", unique: bool = False,
           where: str = "") -> None:
    """An index named as sqlite_utils names them (``idx_<table>_<columns>``) unless ``name`` is given."""
    name = name or f"idx_{table}_{'_'.join(columns)}"
    _run(conn, conn.dialect.create_index(name, table, columns, unique=unique, where=where))


def initial_schema(conn: Conn) -> None:
    """Agents (one row per agent process run), raw windows, rollups."""
    d = conn.dialect
    texts = ["host", "model_name", "model_version", "model_sha256", "agent_version", "onnxruntime_version"]
    ints = ["started_ns", "first_seen_ns", "last_seen_ns", "connected_ns", "connected", "windows", "rows",
            "dropped_rows", "errors", "last_window_end_ns", *(f"spool_{f}" for f in SPOOL_FIELDS)]
    _run(conn, d.create_table("agents", [
        _text("agent_id"), _text("run_id"), *(_text(t, default="''") for t in texts), _text("schema", default="'{}'"),
        *(_int(i, default="0") for i in ints)], pk=("agent_id", "run_id")))
    scalars = [_text("model_name"), _text("model_version"), _int("start_ns"), _int("end_ns"), _int("rows"),
               _int("calls"), _int("dropped_rows"), _int("errors")]
    _run(conn, d.create_table("windows", [_text("agent_id"), _text("run_id"), _int("seq"), *scalars,
                                          Column("body", "bytes", True)],
                              pk=("agent_id", "run_id", "seq"), rowid=True))
    # The indexes carry the scalar columns, so that totals, listings and the retention scan read the
    # index alone (a table row holds up to 4 KB of its body on its leaf page on SQLite).
    _index(conn, "windows", ["model_name", "model_version", "end_ns", *LISTED, "agent_id", "run_id", "seq"],
           name="windows_by_model_end")
    _index(conn, "windows", ["end_ns", "model_name", "model_version", "start_ns"], name="windows_by_end")
    _run(conn, d.create_table("rollups", [
        _text("model_name"), _text("model_version"), _text("level"), _int("bucket_start_ns"), _int("bucket_end_ns"),
        _int("windows"), *scalars[2:], Column("body", "bytes", True)], rowid=True))
    _index(conn, "rollups", ["model_name", "model_version", "level", "bucket_start_ns"], unique=True)
    _index(conn, "rollups", ["model_name", "model_version", "end_ns", *LISTED, "level", "windows"],
           name="rollups_by_model_end")
    _index(conn, "rollups", ["level", "bucket_end_ns", "model_name", "model_version", "bucket_start_ns"],
           name="rollups_by_level_end")


def reference_profiles(conn: Conn) -> None:
    """One reference profile per model version (``outrider attach``), replaced in place."""
    _run(conn, conn.dialect.create_table("profiles", [
        _text("model_name"), _text("model_version"), Column("body", "bytes", True), _text("data_sha256"),
        _int("rows"), _int("attached_ns"), _text("attached_by")], pk=("model_name", "model_version")))


def drift_evaluations_and_alerts(conn: Conn) -> None:
    """Drift policy per model, every evaluation, the alert machine's state per model version, the alerts."""
    d = conn.dialect
    _run(conn, d.create_table("drift_configs", [
        _text("model_name", False), _text("config"), _int("updated_ns", False), _text("updated_by", False)],
        pk=("model_name",)))
    _run(conn, d.create_table("evaluations", [
        _int("id", False), _text("model_name"), _text("model_version"), _int("evaluated_ns"),
        _int("evaluated", False), _int("drifted_columns", False), Column("body", "bytes", True)], pk=("id",)))
    _index(conn, "evaluations", ["model_name", "model_version", "evaluated_ns"])
    _run(conn, d.create_table("alert_trackers", [_text("model_name", False), _text("model_version", False),
                                                 _text("state")], pk=("model_name", "model_version")))
    _run(conn, d.create_table("alerts", [
        _int("id", False), _text("model_name"), _text("model_version"), _text("column"), _text("kind"),
        _text("state"), _int("opened_ns"), _int("resolved_ns", False, "0"), _int("acknowledged_ns", False, "0"),
        _text("acknowledged_by", False, "''"), _text("note", False, "''"), _text("summary", False, "''"),
        _int("evaluation_id", False)], pk=("id",)))
    _index(conn, "alerts", ["state", "model_name", "model_version", "column"])


def audit_trail(conn: Conn) -> None:
    """Migration 4: the ``audit`` table, its model index, and the append-only triggers. Ids are never
    reused (AUTOINCREMENT; an identity on PostgreSQL), so a gap is a deleted row."""
    d = conn.dialect
    _run(conn, d.create_table("audit", [
        _int("id", False), _int("at_ns"), _text("actor"), _text("action"), _text("object"),
        _text("model_name", default="''"), _text("before", default="''"), _text("after", default="''"),
        _text("reason", default="''"), _text("prev_hash"), _text("hash")], pk=("id",), autoincrement=True))
    _index(conn, "audit", ["model_name", "id"], name="audit_by_model")
    for verb in ("UPDATE", "DELETE"):
        _run(conn, d.refuse(f"audit_no_{verb.lower()}", "audit", verb,
                            f"the audit trail is append-only: {verb} refused"))


def model_registry(conn: Conn) -> None:
    """Migration 5: immutable model versions, each with its gate result."""
    _run(conn, conn.dialect.create_table("model_versions", [
        _text("name"), _int("version"), _text("sha256"), _int("size"), _text("schema"),
        _text("data_name", default="''"), _text("data_sha256", default="''"), _int("data_rows", default="0"),
        _text("metrics", default="'{}'"), _text("registered_by"), _int("registered_ns"),
        _text("gate", default="''"), _int("gate_passed", default="0"), _int("gated_ns", default="0")],
        pk=("name", "version")))
    _index(conn, "model_versions", ["sha256"])


def stages_and_approvals(conn: Conn) -> None:
    """Migration 6: each version's stage (at most one production version per model) and the
    promotion requests awaiting approval (at most one pending request per version)."""
    d = conn.dialect
    _run(conn, d.add_column("model_versions", _text("stage", default="'candidate'")))
    _run(conn, d.add_column("model_versions", _int("stage_ns", default="0")))
    _index(conn, "model_versions", ["name"], name="model_versions_one_production", unique=True,
           where="stage = 'production'")
    _run(conn, d.create_table("approvals", [
        _int("id", False), _text("model"), _int("version"), _text("requested_by"), _int("requested_at"),
        _text("reason"), _text("state", default="'pending'"), _text("decided_by", default="''"),
        _int("decided_at", default="0"), _text("decision_reason", default="''"),
        _text("gate_override", default="''")], pk=("id",)))
    _index(conn, "approvals", ["model", "version"], name="approvals_one_pending", unique=True,
           where="state = 'pending'")
    _index(conn, "approvals", ["state", "id"])


def retirement_and_retraining(conn: Conn) -> None:
    """Migration 7: retirement (final, and versions are never deleted: triggers) and retraining
    requests (at most one open or accepted request per model version)."""
    d = conn.dialect
    for column in (_int("retired_ns", default="0"), _text("retire_reason", default="''"),
                   _int("artifact_removed_ns", default="0")):
        _run(conn, d.add_column("model_versions", column))
    _run(conn, d.refuse("model_versions_retired_is_final", "model_versions", "UPDATE OF stage",
                        "a retired model version cannot change stage",
                        when="OLD.stage = 'retired' AND NEW.stage != 'retired'"))
    _run(conn, d.refuse("model_versions_kept_forever", "model_versions", "DELETE",
                        "model versions are never deleted"))
    _run(conn, d.create_table("retraining_requests", [
        _int("id", False), _text("model"), _text("version"), _text("state", default="'open'"), _text("opened_by"),
        _int("opened_ns"), _text("reason"), _text("evidence", default="'{}'"), _text("decided_by", default="''"),
        _int("decided_ns", default="0"), _int("completed_version", default="0"), _text("note", default="''")],
        pk=("id",)))
    _index(conn, "retraining_requests", ["model", "version"], name="retraining_one_active", unique=True,
           where="state IN ('open', 'accepted')")
    _index(conn, "retraining_requests", ["state", "id"])


def rollouts_and_shadow(conn: Conn) -> None:
    """Migration 8: managed agents' desired state, rollouts with one ack per agent run, shadows,
    the kind of an approval."""
    d = conn.dialect
    for column in (_int("managed", default="0"), _text("desired_version", default="''"),
                   _text("model_error", default="''"), _text("shadow_version", default="''"),
                   Column("shadow_share", "float", True, "0")):
        _run(conn, d.add_column("agents", column))
    _run(conn, d.add_column("approvals", _text("kind", default="'promote'")))
    _run(conn, d.create_table("rollouts", [
        _int("id", False), _text("model"), _int("version"), _text("kind"), _text("actor"), _text("reason"),
        _int("started_ns"), _int("from_version", default="0"), Column("share", "float", True, "0.0")], pk=("id",)))
    _index(conn, "rollouts", ["model", "id"])
    _run(conn, d.create_table("rollout_acks", [
        _int("rollout_id", False), _text("agent_id", False), _text("run_id", False),
        _text("state", default="'pending'"), _text("error", default="''"), _int("at_ns", default="0")],
        pk=("rollout_id", "agent_id", "run_id")))
    _run(conn, d.create_table("shadows", [
        _text("model", False), _int("version"), Column("share", "float", True), _int("started_ns"),
        _text("actor")], pk=("model",)))


def row_samples(conn: Conn) -> None:
    """Migration 9: the agents' reservoir samples of recent rows, one per window."""
    _run(conn, conn.dialect.create_table("row_samples", [
        _text("agent_id"), _text("run_id"), _int("seq"), _text("model_name"), _text("model_version"),
        _int("end_ns"), _int("rows"), Column("body", "bytes", True)], pk=("agent_id", "run_id", "seq"), rowid=True))
    _index(conn, "row_samples", ["model_name", "end_ns"])
    _index(conn, "row_samples", ["end_ns"])


def version_feature_names(conn: Conn) -> None:
    """Migration 10: the names of each model version's input columns, JSON ``{input: [names]}``."""
    _run(conn, conn.dialect.add_column("model_versions", _text("feature_names", default="'{}'")))


def alert_resolved_reason(conn: Conn) -> None:
    """Migration 11: why each alert was resolved, a field of its own; taken from the alert's
    ``alert.resolve`` audit entry, and from a migration-10 summary's ``RESOLVED_SUFFIX`` (taken off)."""
    _run(conn, conn.dialect.add_column("alerts", _text("resolved_reason", default="''")))
    # One pass over the audit's resolutions (the newest per alert wins), not one audit scan per alert.
    reasons = dict(conn.execute("SELECT object, reason FROM audit WHERE action = 'alert.resolve' ORDER BY id"))
    for (alert_id,) in conn.execute("SELECT id FROM alerts WHERE state = 'resolved'").fetchall():
        if reasons.get(f"alert/{alert_id}"):
            conn.execute("UPDATE alerts SET resolved_reason = ? WHERE id = ?", [reasons[f"alert/{alert_id}"], alert_id])
    found = conn.dialect.instr("summary", "?")
    rows = conn.execute(f"SELECT id, summary FROM alerts WHERE state = 'resolved' AND {found} > 0",
                        [RESOLVED_SUFFIX]).fetchall()
    for alert_id, summary in rows:
        kept, _, reason = summary.rpartition(RESOLVED_SUFFIX)
        conn.execute("UPDATE alerts SET summary = ?,"
                     " resolved_reason = CASE resolved_reason WHEN '' THEN ? ELSE resolved_reason END"
                     " WHERE id = ?", [kept, reason.removesuffix("]"), alert_id])


def shared_by_collectors(conn: Conn) -> None:
    """Migration 12: what several collectors on one database must share rather than keep to themselves.

    ``artifacts``: the registry's model bytes in ~1 MiB chunks, used on PostgreSQL (every collector
    serves every version without a shared volume; SQLite keeps its directory beside the file).
    ``rollup_passes``: each rollup pass's changes, written in its own transaction, for span readers on
    any collector (``collector.monitoring.spans``). ``high_water``: the highest id ever handed out per
    chain (the audit's), kept in the same transaction as the append, so that on PostgreSQL -- which
    has no ``sqlite_sequence`` -- deleted newest rows still leave a gap ``verify`` reports."""
    d = conn.dialect
    _run(conn, d.create_table("artifacts", [_text("sha256"), _int("chunk"), Column("data", "bytes", True)],
                              pk=("sha256", "chunk")))
    _run(conn, d.create_table("rollup_passes", [_int("generation", False), _int("windows_top_rowid"),
                                                Column("body", "bytes", True)], pk=("generation",)))
    _run(conn, d.create_table("high_water", [_text("name"), _int("value")], pk=("name",)))
    conn.execute("INSERT INTO high_water (name, value) SELECT 'audit', max(id) FROM audit HAVING count(*) > 0")


def fleet_leases_and_heartbeats(conn: Conn) -> None:
    """Migration 13: several collectors on one database -- the leases of the
    background loops (``collector.store.leases``), each collector's heartbeat, and which collector holds
    each agent run's stream (``collector.store.collectors``)."""
    d = conn.dialect
    _run(conn, d.create_table("leases", [_text("name"), _text("holder"), _int("expires_ns")], pk=("name",)))
    _run(conn, d.create_table("collectors", [_text("id"), _text("address", default="''"),
                                             _int("started_ns", default="0"), _int("heartbeat_ns", default="0")],
                              pk=("id",)))
    _run(conn, d.add_column("agents", _text("collector_id", default="''")))


MIGRATIONS: list[Callable[[Conn], None]] = [initial_schema, reference_profiles, drift_evaluations_and_alerts,
                                            audit_trail, model_registry, stages_and_approvals,
                                            retirement_and_retraining, rollouts_and_shadow, row_samples,
                                            version_feature_names, alert_resolved_reason, shared_by_collectors,
                                            fleet_leases_and_heartbeats]

_LOCK = "outrider.migrate"  # several collectors starting at once on one PostgreSQL take turns


def migrate(conn: Conn) -> int:
    """Apply pending migrations, each in its own transaction with its record; the number applied.
    Re-checked inside the transaction (under a lock on PostgreSQL), so collectors starting together on
    one database agree. FailedPrecondition for a database newer than this code."""
    with conn.transaction():
        conn.lock(_LOCK)
        _run(conn, conn.dialect.create_table("migrations", [_int("id", False), _text("name", False),
                                                            _text("applied_at", False)], pk=("id",))[0]
             .replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
        newest = conn.execute("SELECT max(id) FROM migrations").fetchone()[0] or 0
    if newest > len(MIGRATIONS):
        raise FailedPrecondition(f"database schema is at migration {newest}, this collector knows {len(MIGRATIONS)}")
    applied = 0
    for number, fn in enumerate(MIGRATIONS, 1):
        with conn.transaction():
            conn.lock(_LOCK)
            if conn.execute("SELECT 1 FROM migrations WHERE id = ?", [number]).fetchone() is None:
                fn(conn)
                now = datetime.datetime.now(datetime.timezone.utc).isoformat()
                conn.execute("INSERT INTO migrations (id, name, applied_at) VALUES (?, ?, ?)",
                             [number, fn.__name__, now])
                log.info("applied migration %d %s", number, fn.__name__)
                applied += 1
    return applied
