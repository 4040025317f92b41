"""The audit trail: append-only rows, the hash chain and its verification, the audited changes, ops calls and CLI."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from collector.monitoring import alerts

from agent.errors import Unavailable
from collector.api.server import CollectorServer, serve_collector
from collector.base.auth import AuthConfig
from collector.monitoring.drift import DriftConfig
from collector.store import audit
from collector.store.engine import Conn, StoreIntegrityError, open_engine
from collector.store.migrations import migrate
from collector.store.store import Store
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


@contextlib.contextmanager
def connected(db: Path | str) -> Iterator[Conn]:
    """A connection of its own to either engine (autocommit), closed with its engine."""
    engine = open_engine(db)
    conn = engine.connect()
    try:
        yield conn
    finally:
        conn.close()
        engine.close()


def tamper(db: Path | str, *statements: str) -> None:
    """What someone with the file (or the database's owner) can do: drop or disable the triggers, then edit."""
    with connected(db) as conn:
        if conn.dialect.name == "sqlite":
            conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
            conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        else:
            conn.execute("ALTER TABLE audit DISABLE TRIGGER USER")
        for sql in statements:
            conn.execute(sql)


def verify_file(db: Path | str) -> audit.Verification:
    with connected(db) as conn:
        return audit.verify(conn)


@pytest.fixture
def trail(db_url: str) -> Path | str:
    """A database (either engine) with five audit rows, the store closed."""
    path = db_url
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
    with connected(trail) as conn:
        with pytest.raises(StoreIntegrityError, match="append-only"):
            conn.execute("UPDATE audit SET reason = 'nothing happened' WHERE id = 2")
        with pytest.raises(StoreIntegrityError, match="append-only"):
            conn.execute("DELETE FROM audit WHERE id = 2")
    assert verify_file(trail).ok


def test_an_edited_row_is_named(trail):
    tamper(trail, "UPDATE audit SET actor = 'mallory' WHERE id = 3")
    result = verify_file(trail)
    assert (result.ok, result.first_broken_id) == (False, 3)
    assert "do not match its hash" in result.problem


def test_an_edited_row_with_a_recomputed_hash_breaks_the_next_link(trail):
    with connected(trail) as conn:
        [row] = conn.query("SELECT * FROM audit WHERE id = 3")
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


def test_append_refuses_to_run_outside_a_transaction(db_url):
    Store(db_url).close()
    with connected(db_url) as db:
        with pytest.raises(RuntimeError, match="inside the store writer's transaction"):
            audit.append(db, "alice", "test.step", "thing/1", now_ns=1)
        with db.transaction():
            audit.append(db, "alice", "test.step", "thing/1", now_ns=1)
        assert audit.verify(db) == (True, 1, 0, "")


# ------------------------------------------------------------------ audited changes


def test_a_failing_change_leaves_no_audit_row(db_url):
    with Store(db_url) as store:
        def change_then_fail(db) -> None:
            alerts.set_config(db, "m", DriftConfig(consecutive=5), "alice", 1)
            raise ValueError("the rest of the change failed")

        with pytest.raises(ValueError):
            store.write(change_then_fail)
        assert audit.entries(store.read()) == []
        assert alerts.get_config(store.read(), "m") == (DriftConfig(), True)
        store.write(lambda db: alerts.set_config(db, "m", DriftConfig(consecutive=5), "alice", 2))
        [entry] = audit.entries(store.read())
        assert (entry.actor, entry.action, entry.object) == ("alice", "drift_config.set", "model/m")
        assert json.loads(entry.before)["consecutive"] == DriftConfig().consecutive
        assert json.loads(entry.after)["consecutive"] == 5


def test_alerts_opened_acknowledged_and_resolved_are_audited(tmp_path):  # db_url once alerts.py is portable
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


class FakeStore:
    """The store's ``submit`` without a writer: tasks wait until ``run`` commits them to an in-memory trail."""

    def __init__(self) -> None:
        self.tasks: list = []
        self.db = open_engine(":memory:").connect()
        migrate(self.db)

    def submit(self, fn) -> concurrent.futures.Future:
        self.tasks.append(fn)
        future = concurrent.futures.Future()
        future.set_result(None)
        return future

    def run(self) -> list[pb.AuditEntry]:
        """Commit the queued tasks; the rows they added, oldest first."""
        seen = {e.id for e in audit.entries(self.db)}
        with self.db.transaction():
            for task in self.tasks:
                task(self.db)
        self.tasks.clear()
        return [e for e in audit.entries(self.db)[::-1] if e.id not in seen]


MINUTE = audit.MINUTE_NS


def test_refusals_become_one_row_per_peer_actor_reason_and_minute():
    store, clock = FakeStore(), [10 * MINUTE + 5]
    log = audit.AuthFailureLog(store.submit, clock=lambda: clock[0])
    for i in range(500):  # returns at once: nothing is written per call
        clock[0] += 1000
        log("anonymous", "rpc/outrider.v1.OpsService/Status", "unknown token", "10.0.0.5")
    log("anonymous", "rpc/outrider.v1.OpsService/ListAudit", "unknown token", "10.0.0.5")
    log("vera", "rpc/outrider.v1.OpsService/SetDriftConfig", "role viewer", "10.0.0.5")
    log("anonymous", "http/login", "unknown token", "10.0.0.6")
    assert log.flush() == 0 and store.tasks == []  # the minute has not ended
    clock[0] = 11 * MINUTE + 1
    log("anonymous", "rpc/outrider.v1.OpsService/Status", "unknown token", "10.0.0.5")  # the next minute
    assert log.flush() == 3 and len(store.tasks) == 1  # one write for the minute's rows
    rows = store.run()
    assert [(r.actor, r.object, r.reason) for r in rows] == [
        ("anonymous", "rpc/outrider.v1.OpsService/Status", "unknown token"),
        ("vera", "rpc/outrider.v1.OpsService/SetDriftConfig", "role viewer"),
        ("anonymous", "http/login", "unknown token")]
    first = json.loads(rows[0].after)
    assert first == {"count": 501, "peer": "10.0.0.5", "first_unix_nano": 10 * MINUTE + 1005,
                     "last_unix_nano": 10 * MINUTE + 5 + 500_000,
                     "objects": ["rpc/outrider.v1.OpsService/Status", "rpc/outrider.v1.OpsService/ListAudit"]}
    assert {r.action for r in rows} == {"auth.failure"} and rows[0].at_unix_nano == 11 * MINUTE + 1
    log.close()  # the running minute too, on shutdown
    [last] = store.run()
    assert json.loads(last.after)["count"] == 1 and audit.verify(store.db).ok


def test_refusal_keys_are_bounded_and_the_rest_still_counted():
    store = FakeStore()
    log = audit.AuthFailureLog(store.submit, max_keys=3, clock=lambda: 7)
    for i in range(50):
        for _ in range(2):
            log("anonymous", f"rpc/outrider.v1.OpsService/M{i}", "unknown token", f"10.0.0.{i}")
    log.close()
    rows = store.run()
    counts = [json.loads(r.after)["count"] for r in rows]
    assert len(rows) == 4 and sum(counts) == 100 and counts[:3] == [2, 2, 2]
    various = json.loads(rows[3].after)
    assert (rows[3].actor, various["peer"], len(various["objects"]), various["refusals_of_other_objects"]) == (
        "various", "various", audit.MAX_OBJECTS, (47 - audit.MAX_OBJECTS) * 2)
    assert "more than 3" in rows[3].reason


def test_refusals_held_when_the_store_closes_are_reported_not_raised(caplog):
    def closed(fn):
        raise Unavailable("store is closed")

    log = audit.AuthFailureLog(closed, clock=lambda: 7)
    log("anonymous", "rpc/x", "unknown token", "10.0.0.5")
    log.close()
    assert "1 auth failures (1 audit rows) not recorded" in caplog.text


# ------------------------------------------------------------------ a real collector


@pytest.fixture
def secured(db_url) -> Iterator[tuple[pb_grpc.OpsServiceStub, Path | str, str, CollectorServer]]:
    db = db_url
    server = serve_collector(db, "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH_TOML), drift_interval=0,
                             rollup_interval=3600)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield pb_grpc.OpsServiceStub(channel), db, f"127.0.0.1:{server.port}", server
    finally:
        channel.close()
        server.stop(grace=0)


def test_a_flood_of_refused_calls_adds_one_audit_row_per_caller_and_reason(secured):
    ops, db, _, server = secured
    for i in range(300):
        with pytest.raises(grpc.RpcError) as info:
            ops.Status(pb.StatusRequest(), metadata=bearer(f"wrong-token-{i:010d}"), timeout=HANG_GUARD)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for _ in range(5):
        with pytest.raises(grpc.RpcError):
            ops.ListAudit(pb.ListAuditRequest(), timeout=HANG_GUARD)
    status = ops.Status(pb.StatusRequest(), metadata=bearer(VIEWER_TOKEN), timeout=HANG_GUARD)
    assert status.counters.auth_failures == 305  # the counter still counts every refusal
    server.stop(grace=0)  # shutdown writes what the minute held
    with connected(db) as conn:
        rows = [e for e in audit.entries(conn, limit=1000) if e.action == "auth.failure"]
    found = {(e.reason.split(":")[0], e.object): json.loads(e.after) for e in rows}
    assert len(rows) == 2 and {k: (v["count"], v["peer"]) for k, v in found.items()} == {
        ("unknown token", "rpc/outrider.v1.OpsService/Status"): (300, "127.0.0.1"),
        ("missing token", "rpc/outrider.v1.OpsService/ListAudit"): (5, "127.0.0.1")}
    assert verify_file(db).ok


def test_ops_changes_and_refusals_are_listed_with_their_actor(secured):
    ops, _, _, server = secured
    with pytest.raises(grpc.RpcError) as info:
        ops.Status(pb.StatusRequest(), timeout=HANG_GUARD)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:  # a viewer cannot change the policy
        ops.SetDriftConfig(pb.DriftConfigRequest(model_name="m", config_json="{}"), metadata=bearer(VIEWER_TOKEN),
                           timeout=HANG_GUARD)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    server.auth.on_refusal.flush(everything=True)  # at the end of the minute, or now
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
    ops, db, address, _ = secured
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
