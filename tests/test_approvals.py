"""Stages and two-person approval of promotions: a real collector in-process, one CLI run as a subprocess."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from agent import examples
from collector.api.server import serve_collector
from collector.base.auth import AuthConfig
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 60
TOKENS = {name: f"{name}-token-0123456789" for name in ("alice", "bob", "carol", "dave", "root")}
ROLES = {"alice": "operator", "bob": "approver", "carol": "approver", "dave": "viewer", "root": "admin"}
AUTH_TOML = "".join(f'[[operator]]\nname = "{n}"\ntoken = "{TOKENS[n]}"\nrole = "{ROLES[n]}"\n\n' for n in TOKENS)
MODEL = examples.logistic_regression()


@functools.cache
def reference_profile() -> object:
    """The reference profile every version carries (the gate checks the predictions on it)."""
    from agent.profile import build_profile

    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "ref.npz"
        x, y = examples.tabular_data(300, seed=1)
        np.savez(data, X=x, label=y)
        return build_profile(MODEL, str(data), model_name="churn")


@pytest.fixture
def collector(db_url, tmp_path, monkeypatch) -> Iterator[tuple[pb_grpc.OpsServiceStub, str]]:
    """A collector on each engine (a SQLite file, then PostgreSQL)."""
    monkeypatch.chdir(tmp_path)  # on PostgreSQL the artifacts' directory is made relative to the working one
    server = serve_collector(db_url, "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH_TOML),
                             drift_interval=0, rollup_interval=3600)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield pb_grpc.OpsServiceStub(channel), f"127.0.0.1:{server.port}"
    finally:
        channel.close()
        server.stop(grace=0)


def call(ops: pb_grpc.OpsServiceStub, who: str, method: str, request) -> object:
    return getattr(ops, method)(request, metadata=(("authorization", f"Bearer {TOKENS[who]}"),), timeout=HANG_GUARD)


def refused(ops: pb_grpc.OpsServiceStub, who: str, method: str, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(ops, who, method, request)
    return caught.value


def register(ops: pb_grpc.OpsServiceStub, accuracy: float, name: str = "churn") -> pb.ModelVersion:
    meta = pb.RegisterMetadata(name=name, metrics_json=json.dumps({"accuracy": accuracy}),
                               sha256=hashlib.sha256(MODEL).hexdigest(), size=len(MODEL))
    meta.profile.CopyFrom(reference_profile())
    chunks = iter([pb.RegisterChunk(metadata=meta), pb.RegisterChunk(data=MODEL)])
    return call(ops, "alice", "RegisterModel", chunks)


def promote(ops, who: str, version: int, override: str = "", name: str = "churn") -> pb.Approval:
    return call(ops, who, "RequestPromotion", pb.PromotionRequest(name=name, version=version, reason=f"ship v{version}",
                                                                   override_gate_reason=override))


def stages(ops, name: str = "churn") -> dict[int, str]:
    return {v.version: v.stage for v in call(ops, "dave", "ListModels", pb.ListModelsRequest(name=name)).versions}


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD)


def test_two_person_promotion_archives_the_previous_production_version(collector):
    ops, address = collector
    v1 = register(ops, 0.90)
    assert v1.stage == "candidate" and v1.gate_passed

    staged = call(ops, "alice", "SetStage", pb.SetStageRequest(name="churn", version=1, stage="staging",
                                                               reason="try it"))
    assert staged.stage == "staging"
    err = refused(ops, "alice", "SetStage", pb.SetStageRequest(name="churn", version=1, stage="production",
                                                               reason="now"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "promote" in err.details()

    first = promote(ops, "alice", 1)
    assert (first.state, first.requested_by, first.model_name, first.version) == ("pending", "alice", "churn", 1)
    err = refused(ops, "bob", "RequestPromotion", pb.PromotionRequest(name="churn", version=1, reason="again"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "pending" in err.details()
    err = refused(ops, "alice", "Approve", pb.DecisionRequest(id=first.id))  # an operator is no approver
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    approved = call(ops, "bob", "Approve", pb.DecisionRequest(id=first.id, reason="looks good"))
    assert (approved.state, approved.decided_by, approved.decision_reason) == ("approved", "bob", "looks good")
    assert stages(ops) == {1: "production"}
    err = refused(ops, "carol", "Approve", pb.DecisionRequest(id=first.id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "already approved" in err.details()
    err = refused(ops, "alice", "RequestPromotion", pb.PromotionRequest(name="churn", version=1, reason="x"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "production" in err.details()

    register(ops, 0.91)
    second = promote(ops, "bob", 2)  # an approver may request, but not approve their own request
    err = refused(ops, "bob", "Approve", pb.DecisionRequest(id=second.id))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "the requester cannot approve their own request" in err.details()
    assert stages(ops) == {1: "production", 2: "candidate"}
    call(ops, "carol", "Approve", pb.DecisionRequest(id=second.id))
    assert stages(ops) == {1: "archived", 2: "production"}
    shown = call(ops, "dave", "ShowModel", pb.ModelVersionRequest(name="churn", version=1))
    assert shown.stage == "archived" and shown.stage_unix_nano > 0

    listed = call(ops, "dave", "ListApprovals", pb.ListApprovalsRequest(include_decided=True)).approvals
    assert [(a.id, a.state, a.requested_by, a.decided_by) for a in listed] == [
        (first.id, "approved", "alice", "bob"), (second.id, "approved", "bob", "carol")]
    assert not call(ops, "dave", "ListApprovals", pb.ListApprovalsRequest()).approvals

    assert call(ops, "dave", "VerifyAudit", pb.VerifyAuditRequest()).ok
    trail = [(e.actor, e.action, e.object) for e in
             reversed(call(ops, "dave", "ListAudit", pb.ListAuditRequest(model_name="churn")).entries)]
    assert ("alice", "approval.request", f"approval/{first.id}") in trail
    assert ("bob", "approval.approve", f"approval/{first.id}") in trail
    assert ("carol", "approval.approve", f"approval/{second.id}") in trail
    moves = [(a, o) for a, action, o in trail if action == "model.stage"]
    assert moves == [("alice", "model/churn/1"), ("bob", "model/churn/1"), ("carol", "model/churn/1"),
                     ("carol", "model/churn/2")]


def test_a_failed_gate_blocks_the_request_unless_an_admin_overrides_it(collector):
    ops, _ = collector
    register(ops, 0.90)
    bad = register(ops, 0.50)  # far worse than version 1: the metrics check fails
    assert not bad.gate_passed
    err = refused(ops, "alice", "RequestPromotion", pb.PromotionRequest(name="churn", version=2, reason="ship"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "metrics" in err.details()
    err = refused(ops, "bob", "RequestPromotion", pb.PromotionRequest(name="churn", version=2, reason="ship",
                                                                      override_gate_reason="trust me"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in err.details()
    assert not call(ops, "dave", "ListApprovals", pb.ListApprovalsRequest(include_decided=True)).approvals

    made = promote(ops, "root", 2, override="holdout set is stale; accuracy checked by hand")
    assert made.gate_override_reason == "holdout set is stale; accuracy checked by hand"
    call(ops, "bob", "Approve", pb.DecisionRequest(id=made.id))
    assert stages(ops) == {1: "candidate", 2: "production"}
    entries = call(ops, "dave", "ListAudit", pb.ListAuditRequest(model_name="churn")).entries
    overrides = [e for e in entries if e.action == "model.gate_override"]
    assert len(overrides) == 1 and overrides[0].actor == "root"
    assert overrides[0].reason == "holdout set is stale; accuracy checked by hand"
    assert "metrics" in json.loads(overrides[0].before)["failed"]
    assert call(ops, "dave", "VerifyAudit", pb.VerifyAuditRequest()).ok


def test_reject_keeps_the_stage_and_a_viewer_only_reads(collector):
    ops, address = collector
    register(ops, 0.90)
    made = promote(ops, "alice", 1)
    for method, request in (("RequestPromotion", pb.PromotionRequest(name="churn", version=1, reason="x")),
                            ("SetStage", pb.SetStageRequest(name="churn", version=1, stage="staging", reason="x")),
                            ("Approve", pb.DecisionRequest(id=made.id)),
                            ("Reject", pb.DecisionRequest(id=made.id, reason="x"))):
        assert refused(ops, "dave", method, request).code() == grpc.StatusCode.PERMISSION_DENIED, method
    assert [a.id for a in call(ops, "dave", "ListApprovals", pb.ListApprovalsRequest()).approvals] == [made.id]

    err = refused(ops, "bob", "Reject", pb.DecisionRequest(id=made.id))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "reason" in err.details()
    rejected = call(ops, "bob", "Reject", pb.DecisionRequest(id=made.id, reason="wait for the new holdout"))
    assert (rejected.state, rejected.decided_by) == ("rejected", "bob")
    assert stages(ops) == {1: "candidate"}
    err = refused(ops, "carol", "Approve", pb.DecisionRequest(id=made.id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "only pending" in err.details()
    assert refused(ops, "carol", "Approve", pb.DecisionRequest(id=999)).code() == grpc.StatusCode.NOT_FOUND

    again = promote(ops, "alice", 1)  # a decided request does not block a new one
    listed = cli("approvals", "list", "--all", "--json", "--collector", address, "--token", TOKENS["dave"])
    assert listed.returncode == 0, listed.stderr
    assert [(a["id"], a["state"]) for a in json.loads(listed.stdout)["approvals"]] == [(made.id, "rejected"),
                                                                                        (again.id, "pending")]
    own = cli("approve", str(again.id), "--collector", address, "--token", TOKENS["alice"])
    assert own.returncode != 0 and "needs approver" in own.stderr
    done = cli("approve", str(again.id), "--reason", "ok", "--collector", address, "--token", TOKENS["carol"])
    assert done.returncode == 0, done.stderr
    assert f"approval {again.id} approved: churn version 1 is now production" in done.stdout
    shown = cli("models", "show", "churn", "1", "--collector", address, "--token", TOKENS["dave"])
    assert shown.returncode == 0 and "stage:      production" in shown.stdout, shown.stderr
    verified = cli("audit", "verify", "--collector", address, "--token", TOKENS["dave"])
    assert verified.returncode == 0 and "audit trail intact" in verified.stdout, verified.stderr
    trail = cli("audit", "--model", "churn", "--collector", address, "--token", TOKENS["dave"])
    assert all(a in trail.stdout for a in ("approval.request", "approval.reject", "approval.approve", "model.stage"))


def test_the_gate_compares_with_what_production_serves_not_with_the_newest_candidate(collector):
    ops, _ = collector
    register(ops, 0.90)
    call(ops, "bob", "Approve", pb.DecisionRequest(id=promote(ops, "alice", 1).id))
    assert register(ops, 0.95).gate_passed  # a better candidate, never promoted
    v3 = register(ops, 0.93)  # worse than v2 by more than the tolerance, better than production
    assert v3.gate_passed and json.loads(v3.gate_json)["baseline_version"] == 1
