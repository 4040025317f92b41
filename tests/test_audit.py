"""The audit trail: append-only rows, the hash chain and its verification, the audited changes, ops calls and CLI."""
from __future__ import annotations

import concurrent.futures
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlite_utils import Database

from collector import alerts, audit
from collector.auth import AuthConfig
from collector.drift import DriftConfig
from collector.schema import immediate
from collector.server import serve_collector
from collector.store import Store
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from test_evaluation import profile  # a reference profile that passes validation, written once

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 60
ALICE_TOKEN = "alice-token-0123456789"
VIEWER_TOKEN = "viewer-token-0123456789"
AUTH_TOML = f"""
[[operator]]
name = "alice"
token = "{ALICE_TOKEN}"
role = "operator"

[[operator]]
name = "vera"
token = "{VIEWER_TOKEN}"
role = "viewer"
"""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def tamper(path: Path, *statements: str) -> None:
    """What someone with the file can do: drop the triggers, then edit."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
        conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        for sql in statements:
            conn.execute(sql)
    finally:
        conn.close()


def verify_file(path: Path) -> audit.Verification:
    db = Database(sqlite3.connect(path, isolation_level=None))
    try:
        return audit.verify(db)
    finally:
        db.conn.close()


@pytest.fixture
def trail(tmp_path) -> Path:
    """A database file with five audit rows, the store closed."""
    path = tmp_path / "c.db"
    with Store(path) as store:
        for i in range(1, 6):
            store.write(lambda db, i=i: audit.append(db, "alice", "test.step", f"thing/{i}",
                                                     model_name="m" if i % 2 else "other", before={"n": i - 1},
                                                     after={"n": i}, reason=f"step {i}", now_ns=i))
    return path


# ------------------------------------------------------------------ the chain


def test_rows_chain_and_verify(trail):
    with Store(trail) as store:
        rows = audit.entries(store.read())
        assert [e.id for e in rows] == [5, 4, 3, 2, 1]  # newest first
        assert rows[-1].prev_hash == audit.GENESIS
        assert all(newer.prev_hash == older.hash for newer, older in zip(rows, rows[1:]))
        assert json.loads(rows[0].before) == {"n": 4} and rows[0].reason == "step 5"
        assert [e.id for e in audit.entries(store.read(), model_name="m", limit=2)] == [5, 3]
        assert audit.verify(store.read()) == (True, 5, 0, "")


def test_the_triggers_refuse_update_and_delete(trail):
    conn = sqlite3.connect(trail, isolation_level=None)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE audit SET reason = 'nothing happened' WHERE id = 2")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM audit WHERE id = 2")
    finally:
        conn.close()
    assert verify_file(trail).ok


def test_an_edited_row_is_named(trail):
    tamper(trail, "UPDATE audit SET actor = 'mallory' WHERE id = 3")
    result = verify_file(trail)
    assert (result.ok, result.first_broken_id) == (False, 3)
    assert "do not match its hash" in result.problem


def test_an_edited_row_with_a_recomputed_hash_breaks_the_next_link(trail):
    conn = sqlite3.connect(trail, isolation_level=None)
    conn.row_factory = sqlite3.Row
    row = dict(conn.execute("SELECT * FROM audit WHERE id = 3").fetchone())
    conn.close()
    row["reason"] = "nothing to see"
    tamper(trail, f"UPDATE audit SET reason = 'nothing to see', hash = '{audit.row_hash(row)}' WHERE id = 3")
    result = verify_file(trail)
    assert (result.ok, result.first_broken_id) == (False, 4)
    assert "prev_hash does not match row 3's hash" in result.problem


def test_a_deleted_middle_row_is_detected(trail):
    tamper(trail, "DELETE FROM audit WHERE id = 2")
    result = verify_file(trail)
    assert (result.ok, result.first_broken_id) == (False, 3)
    assert "row 2 before it" in result.problem and "missing" in result.problem


def test_deleted_newest_rows_are_detected_and_ids_are_not_reused(trail):
    tamper(trail, "DELETE FROM audit WHERE id >= 4")
    result = verify_file(trail)
    assert (result.ok, result.first_broken_id) == (False, 4)
    assert "rows 4-5 at the end are missing" in result.problem
    with Store(trail) as store:  # the next row does not paper over the gap
        entry = store.write(lambda db: audit.append(db, "alice", "test.step", "thing/6", now_ns=6))
    assert entry.id == 6
    result = verify_file(trail)
    assert (result.ok, result.first_broken_id) == (False, 6) and "rows 4-5 before it" in result.problem


def test_append_refuses_to_run_outside_a_transaction(tmp_path):
    Store(tmp_path / "c.db").close()
    db = Database(sqlite3.connect(tmp_path / "c.db", isolation_level=None))
    with pytest.raises(RuntimeError, match="inside the store writer's transaction"):
        audit.append(db, "alice", "test.step", "thing/1", now_ns=1)
    with immediate(db.conn):
        audit.append(db, "alice", "test.step", "thing/1", now_ns=1)
    assert audit.verify(db) == (True, 1, 0, "")
    db.conn.close()


# ------------------------------------------------------------------ audited changes


def test_a_failing_change_leaves_no_audit_row(tmp_path):
    with Store(tmp_path / "c.db") as store:
        def change_then_fail(db: Database) -> None:
            alerts.set_config(db, "m", DriftConfig(consecutive=2), "alice", 1)
            raise ValueError("the rest of the change failed")

        with pytest.raises(ValueError):
            store.write(change_then_fail)
        assert audit.entries(store.read()) == []
        assert alerts.get_config(store.read(), "m") == (DriftConfig(), True)
        store.write(lambda db: alerts.set_config(db, "m", DriftConfig(consecutive=2), "alice", 2))
        [entry] = audit.entries(store.read())
        assert (entry.actor, entry.action, entry.object) == ("alice", "drift_config.set", "model/m")
        assert json.loads(entry.before)["consecutive"] == 3 and json.loads(entry.after)["consecutive"] == 2


def test_alerts_opened_acknowledged_and_resolved_are_audited(tmp_path):
    def evaluation(drifted: bool) -> pb.DriftEvaluation:
        return pb.DriftEvaluation(model_name="m", model_version="1", evaluated=True, columns=[
            pb.ColumnDrift(name="x", drifted=drifted, p_adjusted=0.0, reason="psi 0.4")])

    with Store(tmp_path / "c.db") as store:
        [opened] = store.write(lambda db: alerts.record(db, evaluation(True), 1, 10))
        store.write(lambda db: alerts.acknowledge(db, opened.id, "alice", "looking into it", 11))
        store.write(lambda db: alerts.record(db, evaluation(False), 1, 12))
        rows = audit.entries(store.read(), model_name="m")[::-1]
        assert [(e.actor, e.action, e.object) for e in rows] == [
            ("collector", "alert.open", f"alert/{opened.id}"), ("alice", "alert.ack", f"alert/{opened.id}"),
            ("collector", "alert.resolve", f"alert/{opened.id}")]
        assert rows[0].reason == "psi 0.4" and rows[1].reason == "looking into it"
        assert (json.loads(rows[2].before), json.loads(rows[2].after)) == ({"state": "acknowledged"},
                                                                          {"state": "resolved"})


def test_auth_failures_are_queued_without_waiting_and_bounded():
    queued: list[concurrent.futures.Future] = []
    tasks = []

    def submit(fn):
        tasks.append(fn)
        queued.append(concurrent.futures.Future())
        return queued[-1]

    log = audit.AuthFailureLog(submit, max_pending=2, clock=lambda: 7)
    for _ in range(5):
        log("anonymous", "rpc/outrider.v1.OpsService/Status", "missing token")  # returns at once: nothing commits
    assert (len(tasks), log.skipped) == (2, 3)
    queued[0].set_result(None)  # one committed: room for one more, which says what was left out
    log("vera", "rpc/outrider.v1.OpsService/SetDriftConfig", "role viewer")
    assert len(tasks) == 3
    path_db = Database(memory=True)
    path_db.conn.isolation_level = None
    audit.audit_trail(path_db)
    with immediate(path_db.conn):
        entry = tasks[2](path_db)
    assert (entry.actor, entry.action, entry.reason) == ("vera", "auth.failure", "role viewer")
    assert json.loads(entry.after) == {"unrecorded_failures_before": 3}


# ------------------------------------------------------------------ a real collector


@pytest.fixture
def secured(tmp_path) -> Iterator[tuple[pb_grpc.OpsServiceStub, Path, str]]:
    db = tmp_path / "collector.db"
    server = serve_collector(db, "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH_TOML), drift_interval=0,
                             rollup_interval=3600)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield pb_grpc.OpsServiceStub(channel), db, f"127.0.0.1:{server.port}"
    finally:
        channel.close()
        server.stop(grace=0)


def test_ops_changes_and_refusals_are_listed_with_their_actor(secured):
    ops, _, _ = secured
    with pytest.raises(grpc.RpcError) as info:
        ops.Status(pb.StatusRequest(), timeout=HANG_GUARD)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:  # a viewer cannot change the policy
        ops.SetDriftConfig(pb.DriftConfigRequest(model_name="m", config_json="{}"), metadata=bearer(VIEWER_TOKEN),
                           timeout=HANG_GUARD)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The refusals were queued before these writes: the writer commits in order.
    reference = profile(np.random.default_rng(1))
    ops.AttachProfile(pb.AttachProfileRequest(model_name="m", model_version="1", profile=reference),
                      metadata=bearer(ALICE_TOKEN), timeout=HANG_GUARD)
    ops.SetDriftConfig(pb.DriftConfigRequest(model_name="m", config_json='{"consecutive": 2}'),
                       metadata=bearer(ALICE_TOKEN), timeout=HANG_GUARD)
    listed = ops.ListAudit(pb.ListAuditRequest(), metadata=bearer(VIEWER_TOKEN), timeout=HANG_GUARD).entries
    assert [(e.actor, e.action) for e in listed][::-1] == [
        ("anonymous", "auth.failure"), ("vera", "auth.failure"), ("alice", "profile.attach"),
        ("alice", "drift_config.set")]
    assert listed[3].reason.startswith("missing token") and listed[3].object == "rpc/outrider.v1.OpsService/Status"
    assert listed[1].object == "model/m/1" and json.loads(listed[1].after) == {"data_sha256": "ab" * 32,
                                                                            "rows": 100_000}
    about_m = ops.ListAudit(pb.ListAuditRequest(model_name="m"), metadata=bearer(VIEWER_TOKEN), timeout=HANG_GUARD)
    assert [e.action for e in about_m.entries] == ["drift_config.set", "profile.attach"]
    verified = ops.VerifyAudit(pb.VerifyAuditRequest(), metadata=bearer(VIEWER_TOKEN), timeout=HANG_GUARD)
    assert (verified.ok, verified.entries, verified.first_broken_id) == (True, 4, 0)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD)


def test_cli_lists_and_verifies_then_names_an_edited_row(secured):
    ops, db, address = secured
    for consecutive in (2, 4):
        ops.SetDriftConfig(pb.DriftConfigRequest(model_name="m", config_json=json.dumps({"consecutive": consecutive})),
                           metadata=bearer(ALICE_TOKEN), timeout=HANG_GUARD)
    flags = ["--collector", address, "--token", VIEWER_TOKEN]
    listed = cli("audit", "--model", "m", *flags)
    assert listed.returncode == 0, listed.stderr
    assert '{"consecutive":2} → {"consecutive":4}' in listed.stdout and "alice" in listed.stdout
    as_json = json.loads(cli("audit", "--json", *flags).stdout)
    assert [e["id"] for e in as_json["entries"]] == [2, 1]
    ok = cli("audit", "verify", *flags)
    assert (ok.returncode, ok.stdout.strip()) == (0, "audit trail intact: 2 entries"), ok.stderr
    tamper(db, "UPDATE audit SET after = '{\"consecutive\":9}' WHERE id = 1")
    broken = cli("audit", "verify", *flags)
    assert broken.returncode == 1, (broken.stdout, broken.stderr)
    lines = broken.stderr.strip().splitlines()
    assert len(lines) == 1 and "row 1:" in lines[0] and "edited" in lines[0], broken.stderr
