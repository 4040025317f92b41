"""The model registry and its evaluation gate: a real collector in-process, the real CLI as a subprocess."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from agent import examples
from agent.errors import InvalidArgument
from collector import gate
from collector.auth import AuthConfig
from collector.registry import ArtifactStore, artifacts_root
from collector.server import serve_collector
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from test_audit import ALICE_TOKEN, AUTH_TOML, VIEWER_TOKEN, bearer  # one operator and one viewer

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 60


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Two models (a classifier on 20 features, a regressor on 5), reference and holdout data."""
    d = tmp_path_factory.mktemp("models")
    (d / "lr.onnx").write_bytes(examples.logistic_regression())
    (d / "lin.onnx").write_bytes(examples.linear_regression())
    x, y = examples.tabular_data(500, seed=1)
    np.savez(d / "ref.npz", X=x, label=y)
    x, y = examples.tabular_data(300, seed=2)
    np.savez(d / "holdout.npz", X=x, y=y)
    return {p.stem: p for p in d.iterdir()}


@pytest.fixture
def collector(tmp_path) -> Iterator[tuple[pb_grpc.OpsServiceStub, Path, str]]:
    db = tmp_path / "collector.db"
    server = serve_collector(db, "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH_TOML), drift_interval=0,
                             rollup_interval=3600)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield pb_grpc.OpsServiceStub(channel), db, f"127.0.0.1:{server.port}"
    finally:
        channel.close()
        server.stop(grace=0)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD)


def register(files: dict[str, Path], address: str, name: str, model: str, *extra: str,
             token: str = ALICE_TOKEN) -> subprocess.CompletedProcess:
    return cli("models", "register", name, "--file", str(files[model]), *extra, "--collector", address,
               "--token", token)


def full(files: dict[str, Path]) -> list[str]:
    return ["--reference", str(files["ref"]), "--holdout", str(files["holdout"]), "--label", "y"]


def show(ops: pb_grpc.OpsServiceStub, name: str, version: int = 0) -> pb.ModelVersion:
    return ops.ShowModel(pb.ModelVersionRequest(name=name, version=version), metadata=bearer(VIEWER_TOKEN),
                         timeout=HANG_GUARD)


def test_register_stores_the_version_its_artifact_and_profile_and_the_gate_passes(files, collector):
    ops, db, address = collector
    done = register(files, address, "churn", "lr", *full(files))
    assert done.returncode == 0, done.stderr
    model = files["lr"].read_bytes()
    sha = hashlib.sha256(model).hexdigest()
    assert f"churn version 1 (sha256 {sha}" in done.stdout and "gate: passed" in done.stdout

    v = show(ops, "churn", 1)
    assert (v.version, v.sha256, v.size, v.registered_by, v.gate_passed) == (1, sha, len(model), "alice", True)
    assert (artifacts_root(db) / "sha256" / sha).read_bytes() == model
    schema = json.loads(v.schema_json)
    assert schema["inputs"] == [{"name": "X", "type": "tensor(float)", "shape": [None, 20]}]
    assert {o["name"] for o in schema["outputs"]} == {"label", "probabilities"}
    ref_sha = hashlib.sha256(files["ref"].read_bytes()).hexdigest()
    assert (v.has_profile, v.data_sha256, v.data_rows, v.data_name) == (True, ref_sha, 500, "ref.npz")
    metrics = json.loads(v.metrics_json)
    assert 0.8 < metrics["accuracy"] <= 1 and metrics["labeled"] == 300
    checks = {c["name"]: c["passed"] for c in json.loads(v.gate_json)["checks"]}
    assert checks == {"schema": True, "metrics": True, "latency": True, "finite_predictions": True}

    # the profile is version 1's drift reference
    drift = ops.Drift(pb.DriftRequest(model_name="churn", model_version="1"), metadata=bearer(VIEWER_TOKEN),
                      timeout=HANG_GUARD)
    assert drift.latest and "attach" not in drift.latest[0].reason

    shown = cli("models", "show", "churn", "--collector", address, "--token", VIEWER_TOKEN)
    assert shown.returncode == 0 and sha in shown.stdout and "ok   latency" in shown.stdout
    assert "X tensor(float)[N, 20]" in shown.stdout
    as_json = json.loads(cli("models", "show", "churn", "1", "--json", "--collector", address, "--token",
                             VIEWER_TOKEN).stdout)
    assert as_json["sha256"] == sha and as_json["gate"]["passed"] is True


def test_an_incompatible_schema_fails_the_gate_naming_the_schema_check(files, collector):
    ops, db, address = collector
    assert register(files, address, "churn", "lr", *full(files)).returncode == 0
    second = register(files, address, "churn", "lin", "--reference", str(files["ref"]))
    # the regressor takes 5 features: the classifier's reference data does not fit it
    assert second.returncode == 2 and "--reference" in second.stderr
    assert len(ops.ListModels(pb.ListModelsRequest(name="churn"), metadata=bearer(VIEWER_TOKEN),
                              timeout=HANG_GUARD).versions) == 1

    done = register(files, address, "churn", "lin")
    assert done.returncode == 0, done.stderr
    assert "churn version 2" in done.stdout and "gate: FAILED (baseline: version 1)" in done.stdout
    assert "FAIL schema" in done.stdout and "input X has shape [N, 5], was [N, 20]" in done.stdout
    v = show(ops, "churn", 2)
    failed = [c["name"] for c in json.loads(v.gate_json)["checks"] if not c["passed"]]
    assert not v.gate_passed and "schema" in failed
    again = cli("models", "gate", "churn", "2", "--collector", address, "--token", ALICE_TOKEN)
    assert again.returncode == 1 and "FAIL schema" in again.stdout

    listed = cli("models", "list", "churn", "--collector", address, "--token", VIEWER_TOKEN)
    assert listed.returncode == 0
    assert [line.split()[3] for line in listed.stdout.splitlines()[1:]] == ["passed", "FAILED"]


def test_a_compatible_version_is_compared_with_the_last_passing_one(files, collector):
    ops, db, address = collector
    for _ in range(2):  # the same bytes twice: two versions, one artifact
        assert register(files, address, "churn", "lr", *full(files)).returncode == 0
    v2 = show(ops, "churn")
    gate_result = json.loads(v2.gate_json)
    assert v2.version == 2 and v2.gate_passed and gate_result["baseline_version"] == 1
    assert "accuracy" in next(c for c in gate_result["checks"] if c["name"] == "metrics")["detail"]
    assert len(list((artifacts_root(db) / "sha256").iterdir())) == 1


def chunks(meta: pb.RegisterMetadata, data: bytes, step: int = 1000) -> Iterator[pb.RegisterChunk]:
    yield pb.RegisterChunk(metadata=meta)
    for i in range(0, len(data), step):
        yield pb.RegisterChunk(data=data[i:i + step])


def test_a_corrupt_upload_is_refused_and_leaves_nothing(files, collector):
    ops, db, address = collector
    model = files["lr"].read_bytes()
    sha = hashlib.sha256(model).hexdigest()
    garbage = b"not an onnx model" * 10
    cases = {
        "sha256 mismatch": (pb.RegisterMetadata(name="m", sha256="0" * 64, size=len(model)), model),
        "truncated": (pb.RegisterMetadata(name="m", sha256=sha, size=len(model)), model[:-10]),
        "longer than its declared size": (pb.RegisterMetadata(name="m", sha256=sha, size=len(model) - 10), model),
        "not a loadable ONNX model": (pb.RegisterMetadata(name="m", sha256=hashlib.sha256(garbage).hexdigest(),
                                                          size=len(garbage)), garbage),
        "64 lowercase hex": (pb.RegisterMetadata(name="m", sha256="../../etc/passwd", size=len(model)), model),
    }
    for expected, (meta, data) in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            ops.RegisterModel(chunks(meta, data), metadata=bearer(ALICE_TOKEN), timeout=HANG_GUARD)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
        assert expected in info.value.details()
    assert not ops.ListModels(pb.ListModelsRequest(), metadata=bearer(ALICE_TOKEN), timeout=HANG_GUARD).versions
    root = artifacts_root(db)
    assert not [p for p in root.rglob("*") if p.is_file()]
    entries = ops.ListAudit(pb.ListAuditRequest(), metadata=bearer(ALICE_TOKEN), timeout=HANG_GUARD).entries
    assert not [e for e in entries if e.action.startswith("model.")]


def test_a_viewer_lists_and_shows_but_cannot_register(files, collector):
    ops, db, address = collector
    assert register(files, address, "churn", "lr", *full(files)).returncode == 0
    refused = register(files, address, "churn", "lr", token=VIEWER_TOKEN)
    assert refused.returncode == 1 and "viewer" in refused.stderr and "RegisterModel" in refused.stderr
    model = files["lr"].read_bytes()
    meta = pb.RegisterMetadata(name="churn", sha256=hashlib.sha256(model).hexdigest(), size=len(model))
    for call, request in (("RegisterModel", chunks(meta, model)),
                          ("RunGate", pb.ModelVersionRequest(name="churn", version=1))):
        with pytest.raises(grpc.RpcError) as info:
            getattr(ops, call)(request, metadata=bearer(VIEWER_TOKEN), timeout=HANG_GUARD)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert cli("models", "list", "--collector", address, "--token", VIEWER_TOKEN).returncode == 0
    assert cli("models", "show", "churn", "1", "--collector", address, "--token", VIEWER_TOKEN).returncode == 0
    missing = cli("models", "show", "nope", "--collector", address, "--token", VIEWER_TOKEN)
    assert missing.returncode == 1 and "not registered" in missing.stderr
    assert len(ops.ListModels(pb.ListModelsRequest(), metadata=bearer(VIEWER_TOKEN), timeout=HANG_GUARD).versions) == 1


def test_the_audit_trail_lists_registrations_and_stays_intact(files, collector):
    ops, db, address = collector
    assert register(files, address, "churn", "lr", *full(files)).returncode == 0
    flags = ["--collector", address, "--token", VIEWER_TOKEN]
    verified = cli("audit", "verify", *flags)
    assert verified.returncode == 0 and "intact" in verified.stdout
    entries = json.loads(cli("audit", "--model", "churn", "--json", *flags).stdout)["entries"]
    assert [(e["action"], e["object"], e["actor"]) for e in entries] == [
        ("model.gate", "model/churn/1", "alice"), ("model.register", "model/churn/1", "alice")]
    assert json.loads(entries[1]["after"])["sha256"] == hashlib.sha256(files["lr"].read_bytes()).hexdigest()


# ------------------------------------------------------------------ the parts, directly


def test_artifact_names_come_only_from_the_hash(tmp_path):
    store = ArtifactStore(tmp_path / "a")
    for bad in ("../x", "A" * 64, "0" * 63, "/" + "0" * 63):
        with pytest.raises(InvalidArgument):
            store.path(bad)
    assert store.path("ab" * 32) == tmp_path / "a" / "sha256" / ("ab" * 32)


def test_metric_tolerances():
    policy = gate.GatePolicy(accuracy_tolerance=0.01, mae_tolerance=0.05)
    assert gate.check_metrics({"accuracy": 0.895}, {"accuracy": 0.9}, policy)["passed"]
    assert not gate.check_metrics({"accuracy": 0.88}, {"accuracy": 0.9}, policy)["passed"]
    assert gate.check_metrics({"mae": 1.04}, {"mae": 1.0}, policy)["passed"]
    assert not gate.check_metrics({"mae": 1.06}, {"mae": 1.0}, policy)["passed"]
    assert not gate.check_metrics({}, {"mae": 1.0}, policy)["passed"]
    assert gate.check_metrics({}, None, policy)["passed"]
