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
from collector.api.server import serve_collector
from collector.base.auth import AuthConfig
from collector.lifecycle import gate
from collector.lifecycle.registry import DirectoryArtifacts, artifacts_root
from collector.store.engine import open_engine
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
def collector(db_url, tmp_path, monkeypatch) -> Iterator[tuple[pb_grpc.OpsServiceStub, str, str]]:
    """A collector on each engine: its OpsService stub, its database (a SQLite path or a PostgreSQL URL),
    its address."""
    monkeypatch.chdir(tmp_path)  # on PostgreSQL the artifacts' directory is made relative to the working one
    db = db_url
    server = serve_collector(db, "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH_TOML), drift_interval=0,
                             rollup_interval=3600)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield pb_grpc.OpsServiceStub(channel), db, f"127.0.0.1:{server.port}"
    finally:
        channel.close()
        server.stop(grace=0)


def _on_postgresql(db) -> bool:
    return str(db).startswith(("postgresql://", "postgres://"))


def artifact_shas(db) -> dict[str, bytes]:
    """sha256 -> bytes of every artifact the collector at ``db`` keeps: in the directory beside a SQLite
    file, in the database on PostgreSQL (``collector.lifecycle.registry.ArtifactStore``)."""
    if not _on_postgresql(db):
        root = artifacts_root(db) / "sha256"
        return {p.name: p.read_bytes() for p in root.iterdir()} if root.is_dir() else {}
    engine = open_engine(db)
    conn = engine.connect()
    try:
        found: dict[str, bytes] = {}
        for sha, data in conn.execute("SELECT sha256, data FROM artifacts ORDER BY sha256, chunk"):
            found[sha] = found.get(sha, b"") + data
        return found
    finally:
        conn.close()
        engine.close()  # its reader pool too


def drop_artifact(db, sha: str) -> None:
    """Lose an artifact behind the registry's back (an operator's mistake, a disk)."""
    if not _on_postgresql(db):
        (artifacts_root(db) / "sha256" / sha).unlink()
        return
    engine = open_engine(db)
    conn = engine.connect()
    try:
        conn.execute("DELETE FROM artifacts WHERE sha256 = ?", [sha])
    finally:
        conn.close()
        engine.close()


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
    assert artifact_shas(db)[sha] == model
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
    assert len(artifact_shas(db)) == 1


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
    assert not artifact_shas(db)
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


# ------------------------------------------------------------------ column names


NAMES = [f"feat_{i}" for i in range(20)]


def named_csv(path: Path, names: list[str] = NAMES, n: int = 400, seed: int = 3) -> Path:
    import csv

    x, y = examples.tabular_data(n, seed=seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*names, "y"])
        writer.writerows([*(f"{v:.9g}" for v in row), int(label)] for row, label in zip(x.tolist(), y))
    return path


def test_the_references_names_become_the_versions_and_are_shown(files, collector, tmp_path):
    ops, db, address = collector
    data = named_csv(tmp_path / "ref.csv")
    done = register(files, address, "churn", "lr", "--reference", str(data), "--label", "y")  # y: no feature
    assert done.returncode == 0, done.stderr
    v = show(ops, "churn", 1)
    assert v.has_profile and v.data_name == "ref.csv"
    assert {i: list(c.names) for i, c in v.feature_names.items()} == {"X": NAMES}
    assert json.loads(v.schema_json)["inputs"][0]["name"] == "X"
    flags = ["--collector", address, "--token", VIEWER_TOKEN]
    shown = cli("models", "show", "churn", "1", *flags)
    assert f"columns of X: {', '.join(NAMES)}" in shown.stdout
    as_json = json.loads(cli("models", "show", "churn", "1", "--json", *flags).stdout)
    assert as_json["feature_names"] == {"X": NAMES} and "feature_names" not in as_json["schema"]
    # a version registered without a reference has no names: its agents name the columns themselves
    assert register(files, address, "churn", "lr").returncode == 0
    assert not show(ops, "churn", 2).feature_names
    assert "no names registered" in cli("models", "show", "churn", "2", *flags).stdout


def test_register_refuses_a_profile_whose_columns_do_not_fit_the_model(files, collector, tmp_path):
    from agent.profile import build_profile

    ops, db, address = collector
    model = files["lr"].read_bytes()
    narrow = tmp_path / "narrow.onnx"
    narrow.write_bytes(examples.logistic_regression(n_features=5))
    x, _ = examples.tabular_data(100, n_features=5)
    np.save(tmp_path / "x5.npy", x)
    other = build_profile(narrow, tmp_path / "x5.npy")  # 5 columns: not this model's 20
    other.model_sha256 = ""
    renamed = build_profile(files["lr"], files["ref"])
    del renamed.feature_names["X"].names[-1]  # names that are not its columns
    for profile, words in ((other, "the profile does not fit the model: 5 feature names"),
                           (renamed, "feature_names of input 'X' (19 names) are not the 20 feature columns")):
        meta = pb.RegisterMetadata(name="churn", sha256=hashlib.sha256(model).hexdigest(), size=len(model),
                                   profile=profile)
        with pytest.raises(grpc.RpcError) as info:
            ops.RegisterModel(chunks(meta, model, 1 << 20), metadata=bearer(ALICE_TOKEN), timeout=HANG_GUARD)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details(), \
            info.value.details()
    assert not ops.ListModels(pb.ListModelsRequest(), metadata=bearer(ALICE_TOKEN), timeout=HANG_GUARD).versions
    assert not artifact_shas(db)
    alone = register(files, address, "churn", "lr", "--feature-names", "a,b")
    assert alone.returncode == 2 and "pass --reference too" in alone.stderr


@pytest.fixture
def served(db_url, tmp_path, monkeypatch):
    """A collector whose store a test can give windows, as agents would; on each engine."""
    monkeypatch.chdir(tmp_path)  # on PostgreSQL the artifacts' directory is made relative to the working one
    server = serve_collector(db_url, "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH_TOML), drift_interval=0,
                             rollup_interval=3600)
    try:
        yield server, f"127.0.0.1:{server.port}"
    finally:
        server.stop(grace=0)


def profile_file(model: Path, data: Path, out: Path, *extra: str) -> Path:
    made = cli("profile", "--model", str(model), "--data", str(data), "--out", str(out), *extra)
    assert made.returncode == 0, made.stderr
    return out


def attach(address: str, name: str, version: str, profile: Path) -> subprocess.CompletedProcess:
    return cli("attach", name, version, str(profile), "--collector", address, "--token", ALICE_TOKEN)


def send_window(server, model: Path, version: str, names: list[str] | None) -> None:
    """One window of a static agent serving ``model`` with these column names."""
    from agent.session import MonitoredSession

    session = MonitoredSession(str(model), model_name="credit", model_version=version, feature_names=names,
                               summarizer="thread", window_seconds=None, agent_id="web-1")
    session.run(None, {"X": examples.tabular_data(50)[0]})
    session.close()
    server.store.submit_windows(session.sink.windows).result(timeout=HANG_GUARD)


def test_attach_checks_the_columns_against_the_registered_names(files, served, tmp_path):
    server, address = served
    data = named_csv(tmp_path / "ref.csv")
    assert register(files, address, "credit", "lr", "--reference", str(data), "--label", "y").returncode == 0
    assert register(files, address, "credit", "lr").returncode == 0  # version 2: no names registered
    named = profile_file(files["lr"], data, tmp_path / "named.pb", "--label", "y")
    plain = profile_file(files["lr"], files["ref"], tmp_path / "plain.pb")  # X[0] ... X[19]

    refused = attach(address, "credit", "1", plain)
    assert refused.returncode == 1, refused.stdout
    assert "not the columns credit version 1 was registered with" in refused.stderr
    assert "missing [feat_0" in refused.stderr and "drift would compare 0 of its 20:" in refused.stderr
    assert server.store.profile("credit", "1").data_name == "ref.csv"  # the registered one, unchanged
    done = attach(address, "credit", "1", named)
    assert done.returncode == 0 and not done.stderr, done.stderr

    # version 2: no names registered and no traffic yet: attached, and said to be unchecked
    unchecked = attach(address, "credit", "2", named)
    assert unchecked.returncode == 0
    assert unchecked.stderr.startswith("outrider: warning: credit version 2 was registered without a reference")
    # once an agent has reported it, its columns decide
    send_window(server, files["lr"], "2", None)
    refused = attach(address, "credit", "2", named)
    assert refused.returncode == 1 and "not the columns agent web-1 reported for credit version 2" in refused.stderr
    assert server.store.profile("credit", "2").data_name == "ref.csv"  # the one attached before stays
    assert attach(address, "credit", "2", plain).returncode == 0


def test_attach_checks_the_columns_against_the_agents_of_an_unregistered_version(files, served, tmp_path):
    server, address = served
    data = named_csv(tmp_path / "ref.csv")
    named = profile_file(files["lr"], data, tmp_path / "named.pb", "--label", "y")
    unchecked = attach(address, "credit", "7", named)
    assert unchecked.returncode == 0 and "is not registered and no agent has reported it" in unchecked.stderr
    send_window(server, files["lr"], "8", None)  # an agent without the names
    refused = attach(address, "credit", "8", named)
    assert refused.returncode == 1 and "outrider agent serve --feature-names" in refused.stderr
    assert server.store.profile("credit", "8") is None
    send_window(server, files["lr"], "9", NAMES)  # an agent given the reference's names
    done = attach(address, "credit", "9", named)
    assert done.returncode == 0 and not done.stderr, done.stderr
    narrow = tmp_path / "narrow.onnx"
    narrow.write_bytes(examples.logistic_regression(n_features=5))
    x, _ = examples.tabular_data(100, n_features=5)
    np.save(tmp_path / "x5.npy", x)
    assert register(files | {"narrow": narrow}, address, "credit", "narrow").returncode == 0  # version 1
    wrong = attach(address, "credit", "1", named)
    assert wrong.returncode == 1 and "20 feature columns for input 'X', which has 5" in wrong.stderr


# ------------------------------------------------------------------ the parts, directly


def test_artifact_names_come_only_from_the_hash(tmp_path):
    store = DirectoryArtifacts(tmp_path / "a")
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
