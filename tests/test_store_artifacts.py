"""Registered artifacts on both engines: in a directory beside a SQLite file, in the database on
PostgreSQL, where a version registered through one collector is fetched through another (no shared
volume), and the retired-artifact cleanup removes its rows."""
from __future__ import annotations

import hashlib
import os

import grpc
import onnx
import pytest

from agent import examples
from agent.errors import InvalidArgument
from collector.api.server import serve_collector
from collector.lifecycle import approvals
from collector.lifecycle.registry import ArtifactStore, DatabaseArtifacts, DirectoryArtifacts
from collector.store.store import Store
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc

MiB = 1 << 20
HANG_GUARD = 60
DAY = 86400


def model(n: int) -> bytes:
    """The example classifier, its own sha256 per ``n``, over 2 MiB (three chunks in the database)."""
    m = onnx.load_model_from_string(examples.logistic_regression())
    m.doc_string = f"build {n}" + "." * (2 * MiB + 4096)
    return m.SerializeToString()


def pieces(data: bytes, step: int = MiB) -> list[bytes]:
    return [data[i:i + step] for i in range(0, len(data), step)]


def test_the_engine_picks_where_artifacts_live(db_url: str) -> None:
    data = os.urandom(2 * MiB + 17)
    sha = hashlib.sha256(data).hexdigest()
    with Store(db_url) as store:
        artifacts = ArtifactStore.for_store(store)
        assert isinstance(artifacts, DatabaseArtifacts if db_url.startswith("postgresql://") else DirectoryArtifacts)
        with pytest.raises(InvalidArgument, match="sha256 mismatch"):
            artifacts.receive(pieces(data), len(data), "0" * 64)
        with pytest.raises(InvalidArgument, match="truncated"):
            artifacts.receive(pieces(data)[:-1], len(data), sha)
        assert not artifacts.exists(sha)  # a bad upload leaves nothing behind
        assert artifacts.receive(pieces(data, 1000), len(data), sha) is True
        assert artifacts.receive(pieces(data), len(data), sha) is False  # the same bytes: stored once
        assert artifacts.read(sha) == data
        with artifacts.open(sha) as stream:
            assert b"".join(iter(lambda: stream.read(300_000), b"")) == data
        assert artifacts.open("ab" * 32) is None
        with pytest.raises(InvalidArgument):
            artifacts.exists("../" + "0" * 61)
        artifacts.remove(sha)  # no version refers to it
        assert not artifacts.exists(sha) and artifacts.open(sha) is None


def fetch(address: str, name: str, version: int) -> bytes:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        chunks = list(stub.FetchArtifact(pb.FetchArtifactRequest(model_name=name, version=version),
                                         timeout=HANG_GUARD))
    return b"".join(c.data for c in chunks)


def register(server, data: bytes) -> pb.ModelVersion:
    meta = pb.RegisterMetadata(name="churn", metrics_json='{"accuracy": 0.9}', sha256=hashlib.sha256(data).hexdigest(),
                               size=len(data))
    return server.registry.register(iter([pb.RegisterChunk(metadata=meta),
                                          *(pb.RegisterChunk(data=p) for p in pieces(data))]), "alice")


def test_a_version_registered_through_one_collector_is_fetched_through_another(postgres_url: str, tmp_path,
                                                                              monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may be written beside a "file" named after the URL
    one = serve_collector(postgres_url, "127.0.0.1:0", drift_interval=0, rollup_interval=3600)
    two = serve_collector(postgres_url, "127.0.0.1:0", drift_interval=0, rollup_interval=3600)
    try:
        v1, v2 = model(1), model(2)
        assert register(one, v1).version == 1 and register(two, v2).version == 2
        assert fetch(f"127.0.0.1:{two.port}", "churn", 1) == v1  # registered through the other collector
        assert fetch(f"127.0.0.1:{one.port}", "churn", 2) == v2
        assert list(tmp_path.iterdir()) == []  # no directory of artifacts anywhere
        # retired and past the retention: one collector's cleanup removes the rows for both
        def retire(db) -> None:  # archived (by a promotion of another version, say), then retired at t=1 ns
            db.execute("UPDATE model_versions SET stage = 'archived' WHERE name = 'churn' AND version = 2")
            approvals.retire(db, "churn", 2, "alice", "bad", 1)

        one.store.write(retire)
        assert two.registry.remove_retired_artifacts(30 * DAY, 31 * DAY * 10**9) == [("churn", 2)]
        assert not one.registry.artifacts.exists(hashlib.sha256(v2).hexdigest())
        with pytest.raises(grpc.RpcError) as removed:
            fetch(f"127.0.0.1:{one.port}", "churn", 2)
        assert removed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert fetch(f"127.0.0.1:{one.port}", "churn", 1) == v1
    finally:
        one.stop(grace=0)
        two.stop(grace=0)
