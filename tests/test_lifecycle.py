"""Retirement and retraining requests: a real collector in-process (loopback, auth file), and the
drift policy driven by a DriftEvaluator with a fake clock."""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator

import grpc
import numpy as np
import onnx
import pytest

from collector.api.server import serve_collector
from collector.base.auth import AuthConfig
from collector.lifecycle import retraining
from collector.monitoring.evaluation import DriftEvaluator
from collector.store.store import Store
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from test_approvals import AUTH_TOML, MODEL, call, refused, reference_profile, stages
from test_evaluation import Clock, Recorder, S, profile, set_span
from test_evaluation import columns  # noqa: F401  (the windows send() builds)
from protos import summary_pb2

DAY = 86400
# The same model with other bytes (another sha256, the same schema and predictions).
_other = onnx.load_from_string(MODEL)
_other.doc_string = "retrained"
OTHER_MODEL = _other.SerializeToString()


@pytest.fixture
def served(db_url, tmp_path, monkeypatch) -> Iterator[tuple[pb_grpc.OpsServiceStub, object, Recorder]]:
    """A collector on each engine (a SQLite file, then PostgreSQL), telling ``Recorder`` what it would post."""
    monkeypatch.chdir(tmp_path)  # on PostgreSQL the artifacts' directory is made relative to the working one
    hook = Recorder()
    server = serve_collector(db_url, "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH_TOML),
                             drift_interval=0, rollup_interval=3600, webhook=hook)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield pb_grpc.OpsServiceStub(channel), server, hook
    finally:
        channel.close()
        server.stop(grace=0)


def register(ops, model: bytes = MODEL, name: str = "churn") -> pb.ModelVersion:
    sha = hashlib.sha256(model).hexdigest()
    meta = pb.RegisterMetadata(name=name, metrics_json=json.dumps({"accuracy": 0.9}), sha256=sha, size=len(model))
    meta.profile.CopyFrom(reference_profile())
    meta.profile.model_sha256 = sha
    return call(ops, "alice", "RegisterModel", iter([pb.RegisterChunk(metadata=meta), pb.RegisterChunk(data=model)]))


def make_production(ops, version: int, name: str = "churn") -> None:
    asked = call(ops, "alice", "RequestPromotion", pb.PromotionRequest(name=name, version=version, reason="ship"))
    call(ops, "bob", "Approve", pb.DecisionRequest(id=asked.id))


def retire(ops, who: str, version: int, reason: str = "superseded") -> pb.ModelVersion:
    return call(ops, who, "RetireModel", pb.RetireRequest(name="churn", version=version, reason=reason))


def test_retirement_is_final_and_the_artifact_goes_after_the_retention(served):
    ops, server, _ = served
    assert register(ops).gate_passed
    make_production(ops, 1)
    v2 = register(ops, OTHER_MODEL)
    assert v2.gate_passed and v2.sha256 != hashlib.sha256(MODEL).hexdigest()
    make_production(ops, 2)
    register(ops)  # v3: the same bytes as v1
    make_production(ops, 3)
    register(ops)  # v4: a candidate
    assert stages(ops) == {1: "archived", 2: "archived", 3: "production", 4: "candidate"}

    for version, stage in ((3, "production"), (4, "candidate")):
        err = refused(ops, "alice", "RetireModel", pb.RetireRequest(name="churn", version=version, reason="old"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"is {stage}" in err.details() and "only archived" in err.details()
    err = refused(ops, "dave", "RetireModel", pb.RetireRequest(name="churn", version=1, reason="old"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = refused(ops, "alice", "RetireModel", pb.RetireRequest(name="churn", version=1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # a reason is required

    for version in (1, 2):
        retired = retire(ops, "alice", version)
        assert retired.stage == "retired" and retired.retired_unix_nano > 0 and retired.retire_reason == "superseded"
    err = refused(ops, "alice", "RetireModel", pb.RetireRequest(name="churn", version=1, reason="again"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "retired" in err.details()

    # never again: not promoted, not restaged, its gate not re-run
    err = refused(ops, "alice", "RequestPromotion", pb.PromotionRequest(name="churn", version=1, reason="back"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "retired" in err.details()
    err = refused(ops, "root", "RequestPromotion", pb.PromotionRequest(name="churn", version=2, reason="back",
                                                                       override_gate_reason="please"))
    assert err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    for stage in ("staging", "candidate", "production", "archived"):
        err = refused(ops, "alice", "SetStage", pb.SetStageRequest(name="churn", version=1, stage=stage, reason="x"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = refused(ops, "alice", "RunGate", pb.ModelVersionRequest(name="churn", version=1))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    # and the database itself refuses a change of a retired version's stage, or a deletion
    with pytest.raises(Exception, match="retired"):
        server.store.write(lambda db: db.execute("UPDATE model_versions SET stage = 'production'"
                                                 " WHERE name = 'churn' AND version = 1"))
    with pytest.raises(Exception, match="never deleted"):
        server.store.write(lambda db: db.execute("DELETE FROM model_versions WHERE version = 1"))

    # artifacts: kept within the retention; past it, v2's file goes, v1's stays (v3 shares it)
    artifacts = server.registry.artifacts
    sha1, sha2 = hashlib.sha256(MODEL).hexdigest(), v2.sha256
    assert server.registry.remove_retired_artifacts(30 * DAY, time.time_ns()) == []
    assert artifacts.exists(sha2)
    later = time.time_ns() + 31 * DAY * S
    assert server.registry.remove_retired_artifacts(30 * DAY, later) == [("churn", 2)]
    assert not artifacts.exists(sha2) and artifacts.exists(sha1)
    assert server.registry.remove_retired_artifacts(30 * DAY, later) == []  # done once
    shown = call(ops, "dave", "ShowModel", pb.ModelVersionRequest(name="churn", version=2))
    assert shown.stage == "retired" and shown.artifact_removed_unix_nano == later  # the record stays
    assert call(ops, "dave", "ShowModel", pb.ModelVersionRequest(name="churn", version=1)).artifact_removed_unix_nano == 0

    trail = [(e.actor, e.action, e.object) for e in
             reversed(call(ops, "dave", "ListAudit", pb.ListAuditRequest(model_name="churn")).entries)]
    assert ("alice", "model.retire", "model/churn/1") in trail and ("alice", "model.retire", "model/churn/2") in trail
    assert [t for t in trail if t[1] == "model.artifact_removed"] == [("collector", "model.artifact_removed",
                                                                       "model/churn/2")]
    assert call(ops, "dave", "VerifyAudit", pb.VerifyAuditRequest()).ok


def test_manual_retraining_request_flow(served):
    ops, _, hook = served
    register(ops)  # v1
    change = pb.RetrainingChange

    err = refused(ops, "dave", "OpenRetraining", pb.OpenRetrainingRequest(model_name="churn", model_version="1",
                                                                          reason="drifts"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    opened = call(ops, "alice", "OpenRetraining", pb.OpenRetrainingRequest(model_name="churn", model_version="1",
                                                                           reason="seasonal drift"))
    assert (opened.state, opened.opened_by, opened.model_version) == ("open", "alice", "1")
    assert json.loads(opened.evidence_json)["model_version"] == "1"
    err = refused(ops, "alice", "OpenRetraining", pb.OpenRetrainingRequest(model_name="churn", model_version="1",
                                                                           reason="again"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "already" in err.details()

    for method in ("AcceptRetraining", "CancelRetraining", "RejectRetraining"):
        err = refused(ops, "dave", method, change(id=opened.id, reason="no"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = refused(ops, "alice", "CompleteRetraining", change(id=opened.id, version=1))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "accept it first" in err.details()
    err = refused(ops, "alice", "RejectRetraining", change(id=opened.id))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # a rejection needs a reason

    accepted = call(ops, "bob", "AcceptRetraining", change(id=opened.id, reason="pipeline queued"))
    assert (accepted.state, accepted.decided_by) == ("accepted", "bob")
    err = refused(ops, "alice", "AcceptRetraining", change(id=opened.id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = refused(ops, "alice", "CompleteRetraining", change(id=opened.id, version=1))  # not newer
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "not newer" in err.details()
    err = refused(ops, "alice", "CompleteRetraining", change(id=opened.id, version=7))  # not registered
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "no registered version 7" in err.details()
    err = refused(ops, "alice", "CompleteRetraining", change(id=opened.id))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    register(ops, OTHER_MODEL)  # v2, the retrained model
    done = call(ops, "alice", "CompleteRetraining", change(id=opened.id, version=2, reason="retrained on May"))
    assert (done.state, done.completed_version, done.decided_by) == ("completed", 2, "alice")
    for method in ("RejectRetraining", "CancelRetraining", "AcceptRetraining"):
        err = refused(ops, "alice", method, change(id=opened.id, reason="late"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION

    second = call(ops, "alice", "OpenRetraining", pb.OpenRetrainingRequest(model_name="churn", model_version="1",
                                                                           reason="again"))
    assert call(ops, "alice", "CancelRetraining", change(id=second.id)).state == "cancelled"
    third = call(ops, "alice", "OpenRetraining", pb.OpenRetrainingRequest(model_name="churn", model_version="2",
                                                                          reason="check"))
    assert call(ops, "bob", "RejectRetraining", change(id=third.id, reason="no budget")).state == "rejected"

    assert not call(ops, "dave", "ListRetraining", pb.ListRetrainingRequest()).requests
    listed = call(ops, "dave", "ListRetraining", pb.ListRetrainingRequest(include_closed=True)).requests
    assert [(r.id, r.state) for r in listed] == [(opened.id, "completed"), (second.id, "cancelled"),
                                                 (third.id, "rejected")]
    assert call(ops, "dave", "ShowRetraining", change(id=opened.id)).completed_version == 2
    err = refused(ops, "dave", "ShowRetraining", change(id=99))
    assert err.code() == grpc.StatusCode.NOT_FOUND

    events = [(e["event"], int(e["retraining"]["id"])) for e in hook.events if e["event"].startswith("retraining.")]
    assert events == [("retraining.open", opened.id), ("retraining.accepted", opened.id),
                      ("retraining.completed", opened.id), ("retraining.open", second.id),
                      ("retraining.cancelled", second.id), ("retraining.open", third.id),
                      ("retraining.rejected", third.id)]
    trail = [(e.actor, e.action, e.object) for e in
             reversed(call(ops, "dave", "ListAudit", pb.ListAuditRequest(model_name="churn")).entries)]
    assert [t for t in trail if t[2] == f"retraining/{opened.id}"] == [
        ("alice", "retraining.open", f"retraining/{opened.id}"), ("bob", "retraining.accepted", f"retraining/{opened.id}"),
        ("alice", "retraining.completed", f"retraining/{opened.id}")]
    assert call(ops, "dave", "VerifyAudit", pb.VerifyAuditRequest()).ok


def test_a_drift_alert_open_for_k_evaluations_opens_one_retraining_request(db_url):
    rng = np.random.default_rng(7)
    store = Store(db_url)
    clock, hook = Clock(), Recorder()
    evaluator = DriftEvaluator(store, hook, clock=clock, retrain_after_evaluations=3)
    try:
        store.attach_profile("m", "1", profile(rng), "test", clock.now)
        set_span(store, 30)
        seq = 0
        opened_at, requested_at, evaluations = None, None, []
        for i in range(14):
            w = summary_pb2.WindowSummary(agent_id="a", run_id="r", seq=seq, model_name="m", model_version="1",
                                          start_unix_nano=clock.now - 10 * S, end_unix_nano=clock.now, rows=1000,
                                          calls=1000, columns=columns(rng, 1000, shift=0.5 if i >= 3 else 0.0))
            store.submit_windows([w]).result()
            seq += 1
            clock.now += 10 * S
            evaluations.append(evaluator.evaluate("m", "1"))
            db = store.read()
            if opened_at is None and db.execute("SELECT 1 FROM alerts WHERE kind = 'drift'").fetchone():
                opened_at = i
            if requested_at is None and retraining.listing(db):
                requested_at = i
        assert opened_at is not None and requested_at == opened_at + 2  # open through 3 evaluations

        (request,) = retraining.listing(store.read(), include_closed=True)  # one, however long it stays open
        assert (request.model_name, request.model_version, request.state, request.opened_by) == ("m", "1", "open",
                                                                                                  "collector")
        evidence = json.loads(request.evidence_json)
        trigger = evaluations[requested_at]
        assert evidence["model_version"] == "1" and "x" in evidence["features"]
        assert evidence["statistics"]["x"]["psi"] == pytest.approx(next(c.psi for c in trigger.columns if c.name == "x"))
        assert evidence["window"] == {"start_unix_nano": trigger.window_start_unix_nano,
                                      "end_unix_nano": trigger.window_end_unix_nano, "rows": trigger.rows}
        assert evidence["evaluation_id"] == trigger.id
        assert [int(e["retraining"]["id"]) for e in hook.events if e["event"] == "retraining.open"] == [request.id]

        # once it is closed, the same alert (its evidence) does not open another one: the operator decided
        store.write(lambda db: retraining.change(db, request.id, "cancelled", "ops", "", clock.now))
        send_more = summary_pb2.WindowSummary(agent_id="a", run_id="r", seq=seq, model_name="m", model_version="1",
                                              start_unix_nano=clock.now - 10 * S, end_unix_nano=clock.now,
                                              rows=1000, calls=1000, columns=columns(rng, 1000, shift=0.5))
        store.submit_windows([send_more]).result()
        evaluator.evaluate("m", "1")
        assert [r.state for r in retraining.listing(store.read(), include_closed=True)] == ["cancelled"]

        from collector.store import audit

        assert audit.verify(store.read()).ok
    finally:
        store.close()


def test_the_policy_can_be_disabled(db_url):
    rng = np.random.default_rng(3)
    store = Store(db_url)
    clock = Clock()
    evaluator = DriftEvaluator(store, Recorder(), clock=clock, retrain_after_evaluations=0)
    try:
        store.attach_profile("m", "1", profile(rng), "test", clock.now)
        set_span(store, 30)
        for seq in range(12):
            store.submit_windows([summary_pb2.WindowSummary(
                agent_id="a", run_id="r", seq=seq, model_name="m", model_version="1",
                start_unix_nano=clock.now - 10 * S, end_unix_nano=clock.now, rows=1000, calls=1000,
                columns=columns(rng, 1000, shift=0.5))]).result()
            clock.now += 10 * S
            evaluator.evaluate("m", "1")
        assert store.read().execute("SELECT count(*) FROM alerts").fetchone()[0] == 1
        assert retraining.listing(store.read(), include_closed=True) == []
    finally:
        store.close()
