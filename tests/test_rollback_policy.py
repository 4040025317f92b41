"""The rollback policy after a promotion, and withdrawing (cancelling) approval requests.

Real collectors on loopback over real SQLite files: versions registered and promoted with
two-person approval, realised performance or prediction drift driven with windows, drift
evaluated, and what the policy did read back through the operators' service.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from collector.lifecycle import approvals

from collector.api.server import CollectorServer, serve_collector
from collector.base.auth import AuthConfig
from collector.lifecycle.rollback_policy import RollbackPolicy
from collector.monitoring import alerts
from collector.monitoring.drift import DriftConfig
from collector.monitoring.evaluation import DriftEvaluator
from collector.store.store import Store
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from protos import summary_pb2
from test_approvals import TOKENS, call, cli, promote, refused, register, stages
from test_collector_server import AgentConn, batch, window
from test_evaluation import Clock, Recorder, columns, performance, profile
from test_shadow_report import AGENT_TOKEN, AUTH

S = 1_000_000_000


@dataclass
class Running:
    server: CollectorServer
    ops: pb_grpc.OpsServiceStub
    agents: pb_grpc.AgentServiceStub
    address: str
    hook: Recorder


@pytest.fixture
def start(db_url, tmp_path, monkeypatch) -> Iterator:
    """run(action) starts a collector: the first on the test's engine (SQLite, then PostgreSQL)."""
    monkeypatch.chdir(tmp_path)  # on PostgreSQL the artifacts' directory is made relative to the working one
    made: list[tuple[CollectorServer, grpc.Channel]] = []

    def run(action: str = "request") -> Running:
        hook = Recorder()
        server = serve_collector(tmp_path / f"c{len(made)}.db" if made else db_url, "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH),
                                 drift_interval=0, rollup_interval=3600, webhook=hook, rollback_action=action)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        made.append((server, channel))
        return Running(server, pb_grpc.OpsServiceStub(channel), pb_grpc.AgentServiceStub(channel),
                       f"127.0.0.1:{server.port}", hook)

    yield run
    for server, channel in made:
        channel.close()
        server.stop(grace=0)


def two_promotions(ops) -> None:
    """churn version 1, then version 2, promoted (alice asks, bob approves): 2 production, 1 archived."""
    for version, accuracy in ((1, 0.90), (2, 0.905)):
        register(ops, accuracy)
        call(ops, "bob", "Approve", pb.DecisionRequest(id=promote(ops, "alice", version).id))
    assert stages(ops) == {1: "archived", 2: "production"}


def connect(agents) -> AgentConn:
    """A managed agent of churn serving version 2 (a raw stream client)."""
    conn = AgentConn(agents, metadata=(("authorization", f"Bearer {AGENT_TOKEN}"),))
    conn.send(pb.AgentMessage(hello=pb.Hello(agent_id="edge-1", run_id="run-1", host="box", model_name="churn",
                                             model_version="2", managed=True, started_unix_nano=time.time_ns())))
    return conn


def serve_command(conn: AgentConn, version: str) -> pb.Command:
    """The next command to serve ``version`` (acks and the Hello's own commands are passed over)."""
    for reply in conn.replies:
        if reply.HasField("command") and reply.command.kind == "serve" and reply.command.args.get("version") == version:
            return reply.command
    raise AssertionError(f"the stream ended without a command to serve version {version}")


def poor_accuracy(conn: AgentConn) -> None:
    """Version 2 answers 60 % of 500 labelled rows right (the reference: 91 %). Once it is acked,
    the agent's stream is live: later pushes reach it."""
    w = window(0, model="churn", version="2", end_ns=time.time_ns())
    w.performance.CopyFrom(performance(300, 500))
    conn.send(batch(w))
    conn.acks(1)


def evaluate(ops) -> pb.DriftEvaluation:
    return call(ops, "alice", "EvaluateDrift", pb.DriftRequest(model_name="churn", model_version="2")).latest[0]


def rollback_requests(ops) -> list[pb.Approval]:
    listed = call(ops, "dave", "ListApprovals", pb.ListApprovalsRequest(include_decided=True, model_name="churn"))
    return [a for a in listed.approvals if a.kind == "rollback"]


def audit_actions(ops) -> list[tuple[str, str]]:
    entries = call(ops, "dave", "ListAudit", pb.ListAuditRequest(model_name="churn")).entries
    return [(e.actor, e.action) for e in reversed(entries)]


def test_a_performance_drop_after_a_promotion_requests_one_rollback_that_an_approver_carries_out(start, db_url):
    c = start("request")
    two_promotions(c.ops)
    conn = connect(c.agents)
    poor_accuracy(conn)
    for _ in range(DriftConfig().consecutive - 1):  # k evaluations before the performance alert opens
        assert evaluate(c.ops).evaluated and not rollback_requests(c.ops)
    evaluate(c.ops)
    (alert,) = call(c.ops, "dave", "ListAlerts", pb.ListAlertsRequest(model_name="churn")).alerts
    assert (alert.kind, alert.model_version) == ("performance", "2")
    (req,) = rollback_requests(c.ops)
    assert (req.state, req.version, req.requested_by) == ("pending", 1, "collector")
    assert f"performance alert {alert.id}" in req.reason and "back to version 1" in req.reason
    for _ in range(2):  # the alert stays open: still the one request
        evaluate(c.ops)
    assert len(rollback_requests(c.ops)) == 1
    (event,) = [e for e in c.hook.events if e["event"].startswith("rollback.")]
    assert event["event"] == "rollback.requested" and (event["from_version"], event["to_version"]) == (2, 1)
    assert event["approval"]["id"] == str(req.id) and event["evidence"]["alerts"][0]["id"] == alert.id
    assert event["evidence"]["accuracy"] == pytest.approx(0.6)
    assert ("collector", "rollback.policy") in audit_actions(c.ops)
    assert stages(c.ops) == {1: "archived", 2: "production"}  # nothing moved yet

    err = refused(c.ops, "carol", "CancelApproval", pb.DecisionRequest(id=req.id, reason="no"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED  # the collector asked: only an admin withdraws it
    call(c.ops, "bob", "Approve", pb.DecisionRequest(id=req.id, reason="agreed"))
    assert stages(c.ops) == {1: "production", 2: "archived"}
    command = serve_command(conn, "1")
    assert command.kind == "serve" and command.id.startswith("rollout-")
    evaluate(c.ops)  # version 2 is no longer production: nothing more
    assert len(rollback_requests(c.ops)) == 1
    conn.close()


def test_in_act_mode_the_previous_version_is_production_again_and_the_agents_are_told(start, db_url):
    c = start("act")
    two_promotions(c.ops)
    conn = connect(c.agents)
    poor_accuracy(conn)
    for _ in range(3):
        evaluate(c.ops)
    assert stages(c.ops) == {1: "production", 2: "archived"}
    newest = call(c.ops, "dave", "ListRollouts", pb.ListRolloutsRequest(model_name="churn")).rollouts[0]
    assert (newest.kind, newest.version, newest.from_version, newest.actor) == ("rollback", 1, 2, "collector")
    assert "performance alert" in newest.reason
    command = serve_command(conn, "1")  # pushed after the commit
    assert (command.kind, command.id) == ("serve", f"rollout-{newest.id}")
    assert not rollback_requests(c.ops)
    assert [e["event"] for e in c.hook.events if e["event"].startswith("rollback.")] == ["rollback.performed"]
    actions = audit_actions(c.ops)
    assert ("collector", "model.rollback") in actions and ("collector", "rollback.policy") in actions
    for _ in range(2):
        evaluate(c.ops)
    rollouts = call(c.ops, "dave", "ListRollouts", pb.ListRolloutsRequest(model_name="churn")).rollouts
    assert [r.kind for r in rollouts].count("rollback") == 1
    conn.close()


# ------------------------------------------------------------------ prediction drift, and the watch period


def store_with_promotion(db_url: str, clock: Clock) -> Store:
    """Model m: version 1 archived, version 2 promoted from it now (rows written as the registry
    and the rollout code would); version 2's reference has one prediction column, ``city``."""
    store = Store(db_url)
    rng = np.random.default_rng(5)

    def write(db) -> None:
        for version, stage in ((1, "archived"), (2, "production")):
            db.insert("model_versions", {"name": "m", "version": version, "sha256": f"{version}" * 64, "size": 1,
                                         "schema": "{}", "registered_by": "t", "registered_ns": clock.now,
                                         "stage": stage, "stage_ns": clock.now})
        db.insert("rollouts", {"model": "m", "version": 2, "kind": "promote", "actor": "bob", "reason": "v2",
                               "started_ns": clock.now, "from_version": 1})
        alerts.set_config(db, "m", DriftConfig(span_seconds=30), "test", clock.now)  # the last three windows

    store.write(write)
    reference = profile(rng)
    reference.columns[2].role = summary_pb2.ColumnSummary.PREDICTION
    store.attach_profile("m", "2", reference, "test", clock.now)
    return store


@pytest.mark.parametrize("later", [0, 7200], ids=["within-the-watch", "after-the-watch"])
def test_prediction_drift_requests_a_rollback_within_the_watch_and_feature_drift_never(db_url, later):
    clock, hook = Clock(), Recorder()
    store = store_with_promotion(db_url, clock)
    clock.now += later * S
    evaluator = DriftEvaluator(store, hook, clock=clock, rollback=RollbackPolicy(watch_seconds=3600))
    rng = np.random.default_rng(9)
    seq = [0]

    def step(**kw) -> pb.DriftEvaluation:
        w = summary_pb2.WindowSummary(agent_id="a", run_id="r", seq=seq[0], model_name="m", model_version="2",
                                      start_unix_nano=clock.now - 10 * S, end_unix_nano=clock.now, rows=1000,
                                      calls=1000, columns=columns(rng, 1000, **kw))
        store.submit_windows([w]).result()
        seq[0] += 1
        clock.now += 10 * S
        return evaluator.evaluate("m", "2")

    def requested() -> list[dict]:
        return list(store.read().query("SELECT * FROM approvals WHERE kind = 'rollback'"))

    try:
        for _ in range(8):  # an input feature drifts: the world changed, not the version
            step(shift=0.5)
        assert [a.column for a in alerts.alerts(store.read(), "m")] == ["x"]
        assert not requested()
        for _ in range(8):  # now the predictions drift too
            step(shift=0.5, city_p=(0.15, 0.4, 0.45))
        assert "city" in {a.column for a in alerts.alerts(store.read(), "m")}
        if later:
            assert not requested() and not [e for e in hook.events if e["event"].startswith("rollback.")]
        else:
            (only,) = requested()
            assert (only["version"], only["requested_by"], only["state"]) == (1, "collector", "pending")
            assert "drift alert" in only["reason"] and "on city" in only["reason"]
            store.write(lambda db: approvals.decide(db, only["id"], "bob", False, "v2 is fine", clock.now))
            for _ in range(2):  # one request per promotion: a rejected one is not reopened
                step(shift=0.5, city_p=(0.15, 0.4, 0.45))
            assert [a["state"] for a in requested()] == ["rejected"]
    finally:
        store.close()


# ------------------------------------------------------------------ cancelling a request


def test_only_the_requester_or_an_admin_cancels_a_pending_request(start):
    c = start()
    register(c.ops, 0.90)
    made = promote(c.ops, "alice", 1)
    for who, code in (("carol", grpc.StatusCode.PERMISSION_DENIED), ("dave", grpc.StatusCode.PERMISSION_DENIED)):
        assert refused(c.ops, who, "CancelApproval", pb.DecisionRequest(id=made.id, reason="no")).code() == code
    err = refused(c.ops, "alice", "CancelApproval", pb.DecisionRequest(id=made.id, reason=" "))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "reason" in err.details()
    err = refused(c.ops, "alice", "CancelApproval", pb.DecisionRequest(id=999, reason="x"))
    assert err.code() == grpc.StatusCode.NOT_FOUND

    cancelled = call(c.ops, "alice", "CancelApproval", pb.DecisionRequest(id=made.id, reason="wrong version"))
    assert (cancelled.state, cancelled.decided_by, cancelled.decision_reason) == ("cancelled", "alice",
                                                                                  "wrong version")
    err = refused(c.ops, "alice", "CancelApproval", pb.DecisionRequest(id=made.id, reason="again"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "already cancelled" in err.details()
    err = refused(c.ops, "bob", "Approve", pb.DecisionRequest(id=made.id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stages(c.ops) == {1: "candidate"}

    again = promote(c.ops, "alice", 1)  # the version may be requested again
    base = ("--collector", c.address)
    refused_cli = cli("approvals", "cancel", str(again.id), "--reason", "x", *base, "--token", TOKENS["carol"])
    assert refused_cli.returncode == 1 and "requested by alice" in refused_cli.stderr
    by_admin = cli("approvals", "cancel", str(again.id), "--reason", "freeze this week", *base,
                   "--token", TOKENS["root"])
    assert by_admin.returncode == 0, by_admin.stderr
    assert f"approval {again.id} cancelled: churn version 1 keeps its stage" in by_admin.stdout
    assert audit_actions(c.ops).count(("alice", "approval.cancel")) == 1
    assert ("root", "approval.cancel") in audit_actions(c.ops)
    assert call(c.ops, "dave", "VerifyAudit", pb.VerifyAuditRequest()).ok
