"""The collector's SQLite schema and its migrations.

Each migration is a function in ``MIGRATIONS``, applied once and recorded in
the ``migrations`` table; later issues append to the list.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import sqlite3
from collections.abc import Callable, Iterator

from sqlite_utils import Database

from agent.errors import FailedPrecondition
from collector.store.audit import audit_trail

log = logging.getLogger(__name__)

SPOOL_FIELDS = ("windows", "bytes", "dropped_windows", "dropped_rows", "rejected_windows")
LISTED = ("start_ns", "rows", "calls", "dropped_rows", "errors")  # scalars besides the keys and end_ns



def initial_schema(db: Database) -> None:
    """Agents (one row per agent process run), raw windows, rollups."""
    counters = {"windows": int, "rows": int, "dropped_rows": int, "errors": int, "last_window_end_ns": int}
    spool = {f"spool_{f}": int for f in SPOOL_FIELDS}
    agent_ints = ["started_ns", "first_seen_ns", "last_seen_ns", "connected_ns", "connected", *counters, *spool]
    agent_texts = ["host", "model_name", "model_version", "model_sha256", "agent_version", "onnxruntime_version"]
    db["agents"].create(
        {"agent_id": str, "run_id": str, **dict.fromkeys(agent_texts, str), "schema": str,
         **dict.fromkeys(agent_ints, int)},
        pk=("agent_id", "run_id"),
        not_null=["agent_id", "run_id", *agent_texts, "schema", *agent_ints],
        defaults={**dict.fromkeys(agent_texts, ""), "schema": "{}", **dict.fromkeys(agent_ints, 0)},
    )
    scalars = {"model_name": str, "model_version": str, "start_ns": int, "end_ns": int,
               "rows": int, "calls": int, "dropped_rows": int, "errors": int}
    db["windows"].create(
        {"agent_id": str, "run_id": str, "seq": int, **scalars, "body": bytes},
        pk=("agent_id", "run_id", "seq"), not_null=["agent_id", "run_id", "seq", *scalars, "body"],
    )
    # The indexes carry the scalar columns, so that totals, listings and the
    # retention scan read the index alone: a table row holds up to 4 KB of its
    # body on its leaf page, and scanning those would read most of the file.
    db["windows"].create_index(["model_name", "model_version", "end_ns", *LISTED, "agent_id", "run_id", "seq"],
                               index_name="windows_by_model_end")
    db["windows"].create_index(["end_ns", "model_name", "model_version", "start_ns"], index_name="windows_by_end")
    db["rollups"].create(
        {"model_name": str, "model_version": str, "level": str, "bucket_start_ns": int,
         "bucket_end_ns": int, "windows": int, **scalars, "body": bytes},
        not_null=["level", "bucket_start_ns", "bucket_end_ns", "windows", *scalars, "body"],
    )
    db["rollups"].create_index(["model_name", "model_version", "level", "bucket_start_ns"], unique=True)
    db["rollups"].create_index(["model_name", "model_version", "end_ns", *LISTED, "level", "windows"],
                               index_name="rollups_by_model_end")
    db["rollups"].create_index(["level", "bucket_end_ns", "model_name", "model_version", "bucket_start_ns"],
                               index_name="rollups_by_level_end")


def reference_profiles(db: Database) -> None:
    """One reference profile per model version (``outrider attach``), replaced in place.

    ``body`` is the serialised ReferenceProfile; its data sha256 and row count
    are copied out so that listings need not parse it."""
    db["profiles"].create(
        {"model_name": str, "model_version": str, "body": bytes, "data_sha256": str, "rows": int,
         "attached_ns": int, "attached_by": str},
        pk=("model_name", "model_version"),
        not_null=["model_name", "model_version", "body", "data_sha256", "rows", "attached_ns", "attached_by"],
    )


# Append new migrations; never edit or reorder applied ones. Id = position + 1.
def drift_evaluations_and_alerts(db: Database) -> None:
    """Drift policy per model, every evaluation (for history and plots), the
    alert machine's state per model version, and the alerts themselves."""
    db["drift_configs"].create({"model_name": str, "config": str, "updated_ns": int, "updated_by": str},
                               pk="model_name", not_null=["config"])
    db["evaluations"].create(
        {"id": int, "model_name": str, "model_version": str, "evaluated_ns": int, "evaluated": int,
         "drifted_columns": int, "body": bytes},
        pk="id", not_null=["model_name", "model_version", "evaluated_ns", "body"])
    db["evaluations"].create_index(["model_name", "model_version", "evaluated_ns"])
    db["alert_trackers"].create({"model_name": str, "model_version": str, "state": str},
                                pk=("model_name", "model_version"), not_null=["state"])
    db["alerts"].create(
        {"id": int, "model_name": str, "model_version": str, "column": str, "kind": str, "state": str,
         "opened_ns": int, "resolved_ns": int, "acknowledged_ns": int, "acknowledged_by": str, "note": str,
         "summary": str, "evaluation_id": int},
        pk="id", not_null=["model_name", "model_version", "column", "kind", "state", "opened_ns"],
        defaults={"resolved_ns": 0, "acknowledged_ns": 0, "acknowledged_by": "", "note": "", "summary": ""})
    db["alerts"].create_index(["state", "model_name", "model_version", "column"])


def model_registry(db: Database) -> None:
    """Migration 5: immutable model versions (the artifact itself lives in the
    content-addressed store beside the database), each with its gate result."""
    db["model_versions"].create(
        {"name": str, "version": int, "sha256": str, "size": int, "schema": str, "data_name": str,
         "data_sha256": str, "data_rows": int, "metrics": str, "registered_by": str, "registered_ns": int,
         "gate": str, "gate_passed": int, "gated_ns": int},
        pk=("name", "version"),
        not_null=["name", "version", "sha256", "size", "schema", "data_name", "data_sha256", "data_rows",
                  "metrics", "registered_by", "registered_ns", "gate", "gate_passed", "gated_ns"],
        defaults={"data_name": "", "data_sha256": "", "data_rows": 0, "metrics": "{}", "gate": "",
                  "gate_passed": 0, "gated_ns": 0})
    db["model_versions"].create_index(["sha256"])


def stages_and_approvals(db: Database) -> None:
    """Migration 6: each version's stage (candidate on register; at most one production version
    per model, enforced by a partial unique index) and the promotion requests awaiting approval
    (at most one pending request per version). Times are unix nanoseconds."""
    db.conn.execute("ALTER TABLE model_versions ADD COLUMN stage TEXT NOT NULL DEFAULT 'candidate'")
    db.conn.execute("ALTER TABLE model_versions ADD COLUMN stage_ns INTEGER NOT NULL DEFAULT 0")
    db.conn.execute("CREATE UNIQUE INDEX model_versions_one_production ON model_versions (name)"
                    " WHERE stage = 'production'")
    db["approvals"].create(
        {"id": int, "model": str, "version": int, "requested_by": str, "requested_at": int, "reason": str,
         "state": str, "decided_by": str, "decided_at": int, "decision_reason": str, "gate_override": str},
        pk="id", not_null=["model", "version", "requested_by", "requested_at", "reason", "state", "decided_by",
                           "decided_at", "decision_reason", "gate_override"],
        defaults={"state": "pending", "decided_by": "", "decided_at": 0, "decision_reason": "", "gate_override": ""})
    db.conn.execute("CREATE UNIQUE INDEX approvals_one_pending ON approvals (model, version) WHERE state = 'pending'")
    db["approvals"].create_index(["state", "id"])


def retirement_and_retraining(db: Database) -> None:
    """Migration 7: when a version was retired (and why), when its artifact was removed after the
    retention period; a retired version's stage is final and its row is never deleted (triggers).
    Retraining requests: open -> accepted -> completed (linked to the new version), or
    rejected / cancelled; at most one open or accepted request per model version."""
    for column in ("retired_ns INTEGER NOT NULL DEFAULT 0", "retire_reason TEXT NOT NULL DEFAULT ''",
                   "artifact_removed_ns INTEGER NOT NULL DEFAULT 0"):
        db.conn.execute(f"ALTER TABLE model_versions ADD COLUMN {column}")
    db.conn.execute("CREATE TRIGGER model_versions_retired_is_final BEFORE UPDATE OF stage ON model_versions"
                    " WHEN OLD.stage = 'retired' AND NEW.stage != 'retired'"
                    " BEGIN SELECT RAISE(ABORT, 'a retired model version cannot change stage'); END")
    db.conn.execute("CREATE TRIGGER model_versions_kept_forever BEFORE DELETE ON model_versions"
                    " BEGIN SELECT RAISE(ABORT, 'model versions are never deleted'); END")
    db["retraining_requests"].create(
        {"id": int, "model": str, "version": str, "state": str, "opened_by": str, "opened_ns": int, "reason": str,
         "evidence": str, "decided_by": str, "decided_ns": int, "completed_version": int, "note": str},
        pk="id", not_null=["model", "version", "state", "opened_by", "opened_ns", "reason", "evidence",
                           "decided_by", "decided_ns", "completed_version", "note"],
        defaults={"state": "open", "evidence": "{}", "decided_by": "", "decided_ns": 0, "completed_version": 0,
                  "note": ""})
    db.conn.execute("CREATE UNIQUE INDEX retraining_one_active ON retraining_requests (model, version)"
                    " WHERE state IN ('open', 'accepted')")
    db["retraining_requests"].create_index(["state", "id"])


def rollouts_and_shadow(db: Database) -> None:
    """Migration 8: what each managed agent was asked to serve and what it answered; every push of a
    version (promote, rollback) or shadow change to a model's agents, with one ack row per agent run;
    the shadow running per model now; the kind of an approval (a promotion, or a rollback request
    opened by the rollback policy)."""
    for column in ("managed INTEGER NOT NULL DEFAULT 0", "desired_version TEXT NOT NULL DEFAULT ''",
                   "model_error TEXT NOT NULL DEFAULT ''", "shadow_version TEXT NOT NULL DEFAULT ''",
                   "shadow_share REAL NOT NULL DEFAULT 0"):
        db.conn.execute(f"ALTER TABLE agents ADD COLUMN {column}")
    db.conn.execute("ALTER TABLE approvals ADD COLUMN kind TEXT NOT NULL DEFAULT 'promote'")
    db["rollouts"].create(
        {"id": int, "model": str, "version": int, "kind": str, "actor": str, "reason": str, "started_ns": int,
         "from_version": int, "share": float},
        pk="id", not_null=["model", "version", "kind", "actor", "reason", "started_ns", "from_version", "share"],
        defaults={"from_version": 0, "share": 0.0})
    db["rollouts"].create_index(["model", "id"])
    db["rollout_acks"].create(
        {"rollout_id": int, "agent_id": str, "run_id": str, "state": str, "error": str, "at_ns": int},
        pk=("rollout_id", "agent_id", "run_id"), not_null=["state", "error", "at_ns"],
        defaults={"state": "pending", "error": "", "at_ns": 0})
    db["shadows"].create(
        {"model": str, "version": int, "share": float, "started_ns": int, "actor": str},
        pk="model", not_null=["version", "share", "started_ns", "actor"])


def row_samples(db: Database) -> None:
    """Migration 9: the agents' reservoir samples of recent rows (one RowSample per window, kept
    apart from the window bodies so that rollups never carry them), deleted after their retention."""
    db["row_samples"].create(
        {"agent_id": str, "run_id": str, "seq": int, "model_name": str, "model_version": str, "end_ns": int,
         "rows": int, "body": bytes},
        pk=("agent_id", "run_id", "seq"),
        not_null=["agent_id", "run_id", "seq", "model_name", "model_version", "end_ns", "rows", "body"])
    db["row_samples"].create_index(["model_name", "end_ns"])
    db["row_samples"].create_index(["end_ns"])


def version_feature_names(db: Database) -> None:
    """Migration 10: the names of each model version's input columns, JSON ``{input: [names]}`` from the
    reference profile it was registered with ('{}': none registered, agents name the columns by the
    model's metadata or ``<input>[i]``). Managed agents are given them with the version they serve."""
    db.conn.execute("ALTER TABLE model_versions ADD COLUMN feature_names TEXT NOT NULL DEFAULT '{}'")


RESOLVED_SUFFIX = " [resolved: "  # how migration 10's collectors appended a resolution's reason to the summary


def alert_resolved_reason(db: Database) -> None:
    """Migration 11: why each alert was resolved ('' while it is not), a field of its own. Alerts
    resolved before take the reason their ``alert.resolve`` audit entry recorded, and the reason a
    collector at migration 10 appended to a summary (``RESOLVED_SUFFIX``) is taken off it."""
    db.conn.execute("ALTER TABLE alerts ADD COLUMN resolved_reason TEXT NOT NULL DEFAULT ''")
    # One pass over the audit's resolutions (the newest per alert wins), not one audit scan per alert
    # (object is not indexed); UPDATE ... FROM would need SQLite 3.33.
    reasons = dict(db.conn.execute("SELECT object, reason FROM audit WHERE action = 'alert.resolve' ORDER BY id"))
    for (alert_id,) in db.conn.execute("SELECT id FROM alerts WHERE state = 'resolved'").fetchall():
        if reasons.get(f"alert/{alert_id}"):
            db.conn.execute("UPDATE alerts SET resolved_reason = ? WHERE id = ?", [reasons[f"alert/{alert_id}"],
                                                                                    alert_id])
    rows = db.conn.execute("SELECT id, summary FROM alerts WHERE state = 'resolved' AND instr(summary, ?) > 0",
                           [RESOLVED_SUFFIX]).fetchall()
    for alert_id, summary in rows:
        kept, _, reason = summary.rpartition(RESOLVED_SUFFIX)
        db.conn.execute("UPDATE alerts SET summary = ?,"
                        " resolved_reason = CASE resolved_reason WHEN '' THEN ? ELSE resolved_reason END"
                        " WHERE id = ?", [kept, reason.removesuffix("]"), alert_id])


MIGRATIONS: list[Callable[[Database], None]] = [initial_schema, reference_profiles, drift_evaluations_and_alerts,
                                                audit_trail, model_registry, stages_and_approvals,
                                                retirement_and_retraining, rollouts_and_shadow, row_samples,
                                                version_feature_names, alert_resolved_reason]


def migrate(db: Database) -> None:
    """Apply pending migrations, each in its own transaction with its record.
    Re-checked inside the transaction, so two processes opening one file agree."""
    db["migrations"].create({"id": int, "name": str, "applied_at": str}, pk="id", if_not_exists=True)
    newest = db.execute("SELECT max(id) FROM migrations").fetchone()[0] or 0
    if newest > len(MIGRATIONS):
        raise FailedPrecondition(f"database schema is at migration {newest}, this collector knows {len(MIGRATIONS)}")
    for number, fn in enumerate(MIGRATIONS, 1):
        with immediate(db.conn):
            if db.execute("SELECT 1 FROM migrations WHERE id = ?", [number]).fetchone() is None:
                fn(db)
                now = datetime.datetime.now(datetime.timezone.utc).isoformat()
                db["migrations"].insert({"id": number, "name": fn.__name__, "applied_at": now})
                log.info("applied migration %d %s", number, fn.__name__)


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error: take the write lock up
    front rather than upgrading a read transaction (which can fail with BUSY)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a failed COMMIT must not leave the writer inside a transaction
            conn.execute("ROLLBACK")
        raise
