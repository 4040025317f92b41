"""Loose ends of rollout, shadow and rollback: a shadow stops when its version leaves staging, approvals show
their kind, decisions reach agents through the post-commit hook, web refusals counted through the public
method, and labels for a replaced version's predictions still join after a managed agent's swap."""
from __future__ import annotations

import json
import time
from concurrent import futures
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from agent.feedback import PredictionLog
from collector.api.rollout_ops import RolloutOps
from collector.base.auth import AuthConfig, AuthInterceptor
from collector.lifecycle import approvals
from protos import agent_pb2, agent_pb2_grpc
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from test_approvals import TOKENS, call, cli, promote, refused, stages
from test_exporter import wait_until
from test_rollout_agent import NAME, FakeCollector, models, serve_args, serve_v1, start_agent  # noqa: F401
from test_rollout_collector import (AUTH, acks, agent_state, make_production, register, rollouts,
                                    running_collector, wait_for)
from test_server import decode, raw_request, x_rows


@pytest.fixture
def ops_collector(db_url, tmp_path, monkeypatch) -> Iterator[tuple]:
    """As test_rollout_collector's ``collector``: the server, an OpsService stub, its address, connect();
    on each engine."""
    monkeypatch.chdir(tmp_path)  # on PostgreSQL the artifacts' directory is made relative to the working one
    with running_collector(tmp_path, db_url) as parts:
        yield parts


def audited(ops, action: str) -> list[pb.AuditEntry]:
    return [e for e in call(ops, "dave", "ListAudit", pb.ListAuditRequest(model_name="churn")).entries
            if e.action == action]


def test_promoting_the_shadowed_version_stops_its_shadow_with_the_promotion(ops_collector):
    server, ops, address, connect = ops_collector
    for n in (1, 2):
        register(ops, n)
    make_production(ops, 1)
    call(ops, "alice", "SetStage", pb.SetStageRequest(name="churn", version=2, stage="staging", reason="try"))
    agent = connect("edge-1")
    agent.answer(agent.command())  # serve 1
    call(ops, "alice", "SetShadow", pb.SetShadowRequest(model_name="churn", version=2, share=0.5, reason="compare"))
    agent.answer(agent.command())  # shadow 2
    wait_for(lambda: agent_state(ops, "edge-1").shadow_version == "2")
    err = refused(ops, "alice", "SetStage", pb.SetStageRequest(name="churn", version=2, stage="candidate",
                                                               reason="not yet"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "outrider shadow stop churn" in err.details()

    approved = make_production(ops, 2)
    assert stages(ops) == {1: "archived", 2: "production"}
    unshadow, promotion = rollouts(ops)[:2]
    assert (unshadow.kind, unshadow.version, unshadow.reason, unshadow.actor) == (
        "unshadow", 2, "promoted to production", "bob")
    assert (promotion.kind, promotion.version) == ("promote", 2)
    assert unshadow.started_unix_nano == promotion.started_unix_nano == approved.decided_unix_nano
    serve, stop = agent.command(), agent.command()  # pushed after the commit: serve first, then unshadow
    assert (serve.kind, serve.args["version"], serve.id) == ("serve", "2", f"rollout-{promotion.id}")
    assert (stop.kind, stop.id) == ("unshadow", f"rollout-{unshadow.id}")
    for command in (serve, stop):
        agent.answer(command)
    wait_for(lambda: acks(ops, unshadow.id) == {"edge-1": ("ok", "")})
    state = agent_state(ops, "edge-1")
    assert (state.model_version, state.shadow_version) == ("2", "")
    assert [(e.actor, e.object, e.reason) for e in audited(ops, "model.unshadow")] == [
        ("bob", "model/churn/2", "promoted to production")]
    err = refused(ops, "alice", "ClearShadow", pb.SetShadowRequest(model_name="churn", reason="x"))
    assert "no shadow" in err.details()
    late = connect("edge-2")
    assert [(c.kind, c.args.get("version")) for c in (late.command(), late.command())] == [("serve", "2"),
                                                                                           ("unshadow", None)]
    assert call(ops, "dave", "VerifyAudit", pb.VerifyAuditRequest()).ok


def test_a_stale_shadow_blocks_retirement_and_a_rollback_stops_it(ops_collector):
    server, ops, address, connect = ops_collector
    for n in (1, 2):
        register(ops, n)
        make_production(ops, n)
    agent = connect("edge-1", auto=lambda command: "")
    wait_for(lambda: agent_state(ops, "edge-1").model_version == "2")
    # a shadow on a version that left staging (as one set before promotions stopped shadows could be)
    server.store.write(lambda db: db.execute("INSERT INTO shadows (model, version, share, started_ns, actor)"
                                             " VALUES ('churn', 1, 0.5, 1, 'alice')"))
    err = refused(ops, "alice", "RetireModel", pb.RetireRequest(name="churn", version=1, reason="old"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "runs in shadow" in err.details()
    assert stages(ops) == {1: "archived", 2: "production"}

    back = call(ops, "alice", "Rollback", pb.RollbackRequest(model_name="churn", reason="p99 doubled"))
    newest = rollouts(ops)[0]
    assert (newest.kind, newest.version, newest.started_unix_nano) == ("unshadow", 1, back.started_unix_nano)
    wait_for(lambda: acks(ops, newest.id) == {"edge-1": ("ok", "")} and acks(ops, back.id) == {"edge-1": ("ok", "")})
    assert [e.reason for e in audited(ops, "model.unshadow")] == ["rolled back from version 2 to version 1"]
    assert agent.serving == "1" and agent_state(ops, "edge-1").model_version == "1"


def test_approvals_list_shows_the_kind_and_approving_a_rollback_says_so(ops_collector):
    server, ops, address, connect = ops_collector
    for n in (1, 2, 3):
        register(ops, n)
    for n in (1, 2):
        make_production(ops, n)
    rollback = server.store.write(lambda db: approvals.request_rollback(db, "churn", 0, "collector", "accuracy fell",
                                                                        time.time_ns()))
    promotion = promote(ops, "alice", 3)
    listed = cli("approvals", "list", "--collector", address, "--token", TOKENS["dave"])
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "KIND", "MODEL", "VERSION"]
    assert sorted(line.split()[:4] for line in lines[1:]) == sorted(
        [[str(rollback.id), "rollback", "churn", "1"], [str(promotion.id), "promote", "churn", "3"]])
    shown = cli("approvals", "list", "--json", "--collector", address, "--token", TOKENS["dave"])
    assert {(a["id"], a["kind"]) for a in json.loads(shown.stdout)["approvals"]} == {(rollback.id, "rollback"),
                                                                                      (promotion.id, "promote")}

    done = cli("approve", str(rollback.id), "--reason", "agreed", "--collector", address, "--token", TOKENS["bob"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"approval {rollback.id} approved: churn version 1 is now production again "
                                   "(rolled back to version 1)")
    done = cli("approve", str(promotion.id), "--collector", address, "--token", TOKENS["bob"])
    assert done.stdout.strip() == f"approval {promotion.id} approved: churn version 3 is now production"


def test_decisions_reach_agents_through_the_post_commit_hook(ops_collector, monkeypatch):
    assert "_decide" not in vars(RolloutOps)  # no override of the decision itself any more
    server, ops, address, connect = ops_collector
    for n in (1, 2):
        register(ops, n)
    make_production(ops, 1)
    agent = connect("edge-1")
    agent.answer(agent.command())
    seen: list[tuple[str, dict[int, str]]] = []
    original = RolloutOps.after_decision

    def spy(self, decided: pb.Approval) -> None:  # what a fresh reader sees: the decision is committed
        committed = {v: s for v, s in server.store.read().execute("SELECT version, stage FROM model_versions")}
        seen.append((decided.state, committed))
        original(self, decided)

    monkeypatch.setattr(RolloutOps, "after_decision", spy)
    rejected = promote(ops, "alice", 2)
    call(ops, "bob", "Reject", pb.DecisionRequest(id=rejected.id, reason="not yet"))
    agent.quiet()  # a rejection sends nothing
    make_production(ops, 2)
    command = agent.command()
    assert (command.kind, command.args["version"]) == ("serve", "2")
    assert seen == [("rejected", {1: "production", 2: "candidate"}), ("approved", {1: "archived", 2: "production"})]


def test_count_refusal_counts_and_audits_and_never_raises():
    heard: list[tuple[str, str, str, str]] = []
    interceptor = AuthInterceptor(AuthConfig.from_toml(AUTH), on_refusal=lambda *a: heard.append(a))
    interceptor.count_refusal("mallory", "http/", "unknown token", "10.0.0.5")
    assert interceptor.failures == 1 and heard == [("mallory", "http/", "unknown token", "10.0.0.5")]

    def broken(*args: str) -> None:
        raise RuntimeError("audit queue closed")

    interceptor.on_refusal = broken
    interceptor.count_refusal("anonymous", "rpc/x", "missing token")
    assert interceptor.failures == 2


# ------------------------------------------------------------------ labels after a managed agent's swap


def test_a_log_falls_back_to_the_one_it_replaced_only():
    now = [0.0]
    logs = [PredictionLog(join_seconds=100, clock=lambda: now[0]) for _ in range(3)]
    oldest, old, new = logs
    old.replaces(oldest)
    oldest.record("a", np.array([1]))
    old.record("b", np.array([0, 1]))
    old.record("late", np.array([1]))
    old.record("r", np.array([1.5]))  # a regression prediction: a class name cannot join it
    new.record("c", np.array([1]))
    new.replaces(old)  # cuts old's link to oldest: one version back, never more
    assert new.label("c", 1) and new.label("b", 1, row=1) and new.label("b", 1, row=1)  # the repeat is a duplicate
    assert not new.label("a", 1) and not new.label("nobody", 1) and not new.label("b", 0, row=5)
    assert not new.label("r", "cat")
    now[0] = 100.0
    assert not new.label("late", 1)  # older than the join window
    assert (new.pending(), old.pending(), oldest.pending()) == ((1, 5), (1, 0), (0, 0))
    assert old.duplicates == 1


@pytest.fixture
def fake_collector():
    fake = FakeCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_AgentServiceServicer_to_server(fake, server)
    fake.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield fake
    server.stop(0).wait()


def test_labels_for_the_replaced_versions_predictions_join_after_a_swap(fake_collector, models, tmp_path):
    agent = start_agent(fake_collector.target, tmp_path / "spool")
    try:
        serve_v1(fake_collector, models)
        old = decode(agent.stub.ModelInfer(raw_request(NAME, {"X": x_rows(2, 1)}, id="old-1"), timeout=30))
        fake_collector.files[2] = models["v2"]
        assert fake_collector.state(fake_collector.command("serve", **serve_args(2, models["v2"]))).ok
        new = decode(agent.stub.ModelInfer(raw_request(NAME, {"X": x_rows(1, 2)}, id="new-1"), timeout=30))
        # version 1's session is closed once idle, its last window sent: labels now reach only its log
        wait_until(lambda: any(w.model_version == "1" for w in fake_collector.windows_received()), timeout=60,
                   what="version 1's last window")
        labels = [agent_pb2.Label(request_id="old-1", class_label=str(old["label"][0]), row=0),
                  agent_pb2.Label(request_id="old-1", class_label=str(old["label"][1]), row=1),
                  agent_pb2.Label(request_id="new-1", class_label=str(new["label"][0])),
                  agent_pb2.Label(request_id="nobody", class_label="1")]
        reply = agent_pb2_grpc.FeedbackServiceStub(agent.channel).Feedback(agent_pb2.FeedbackRequest(labels=labels),
                                                                           timeout=30)
        assert (reply.matched, reply.unmatched) == (3, 1)
    finally:
        agent.stop()  # the late labels of version 1 travel after version 2's last window
    windows = fake_collector.windows_received()
    assert sorted(w.seq for w in windows) == list(range(len(windows)))

    def performance(version: str) -> tuple[int, int]:
        mine = [w.performance for w in windows if w.model_version == version]
        return sum(p.labeled for p in mine), sum(p.unmatched for p in mine)

    assert performance("1") == (2, 0) and performance("2") == (1, 1)
    late = [w for w in windows if w.model_version == "1" and w.performance.labeled]
    assert len(late) == 1 and late[0].rows == 0 and late[0].seq == max(w.seq for w in windows)
