"""``outrider agent proxy --managed`` (issue 13): promotions and rollbacks in a real collector's registry load the
version on a real MLServer 1.7.1 through the OIP model-repository extension, and the proxy acks, monitors and pins.

MLServer (its own venv, ``benchmarks/mlserver_env.py``) serves two versions of model "m" from one repository: a
logistic regression (version 1) and a small forest (version 2), both ONNX built from scikit-learn, through the
custom runtime. MLServer's own default for a call naming no version is its newest version loaded (2), so a reply
of version 1 to such a call through the proxy shows the pin. The proxy runs as a process (the CLI), the collector
in-process with tokens, as ``test_rollout_collector`` runs it.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent import examples
from agent.profile import build_profile
from benchmarks import mlserver_env
from protos import agent_pb2, agent_pb2_grpc
from protos import collector_pb2 as cpb
from protos import open_inference_pb2 as pb
from test_approvals import TOKENS, call, cli, promote
from test_delivery import reap, start, wait_until  # noqa: F401  (reap: kills what a failed test left running)
from test_proxy import HANG_GUARD, Raw, infer_request
from test_proxy_mlserver import mlserver_venv  # noqa: F401  (the session's MLServer venv)
from test_proxy_rest import call as rest_call
from test_proxy_rest import infer_body
from test_rollout_collector import AGENT_TOKEN, acks, agent_state, running_collector

pytestmark = pytest.mark.slow  # MLServer takes seconds to start

AGENT = "proxy-m"
# Its ready line says "waiting for the collector to name a version", or already "monitoring version 1" when the
# collector's answer to its Hello came first.
READY = r"(proxying .*\(m: (?:waiting for the collector to name a version|monitoring version \d+)\).*)"


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    return {"1": examples.logistic_regression(), "2": examples.random_forest(n_trees=5)}


@pytest.fixture(scope="module")
def mlserver(mlserver_venv: Path, models: dict[str, bytes],  # noqa: F811
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("mlserver-repository")
    server = mlserver_env.start(folder, None, "m", venv=mlserver_venv, versions=models)
    server.folder = folder
    yield server
    server.stop()


def register(ops: Any, data: bytes) -> cpb.ModelVersion:
    with tempfile.TemporaryDirectory() as d:
        x, y = examples.tabular_data(300, seed=1)
        np.savez(Path(d) / "ref.npz", X=x, label=y)
        profile = build_profile(data, str(Path(d) / "ref.npz"), model_name="m")
    meta = cpb.RegisterMetadata(name="m", metrics_json='{"accuracy": 0.9}', sha256=hashlib.sha256(data).hexdigest(),
                                size=len(data))
    meta.profile.CopyFrom(profile)
    return call(ops, "alice", "RegisterModel", iter([cpb.RegisterChunk(metadata=meta), cpb.RegisterChunk(data=data)]))


def make_production(ops: Any, version: int) -> int:
    """Promote ``version`` (two people); the id of the rollout that pushed it."""
    approval = promote(ops, "alice", version, name="m")
    call(ops, "bob", "Approve", cpb.DecisionRequest(id=approval.id))
    return newest_rollout(ops)


def newest_rollout(ops: Any) -> int:
    return call(ops, "dave", "ListRollouts", cpb.ListRolloutsRequest(model_name="m")).rollouts[0].id


def answered(ops: Any, rollout_id: int) -> tuple[str, str]:
    wait_until(lambda: acks(ops, rollout_id).get(AGENT, ("pending", ""))[0] != "pending", timeout=HANG_GUARD * 2,
               what=f"the proxy's answer to rollout {rollout_id}")
    return acks(ops, rollout_id)[AGENT]


class Traffic:
    """Calls naming no version, over gRPC and REST through the proxy; rows sent per version answered."""

    def __init__(self, grpc_address: str, rest_port: int) -> None:
        self.raw, self.rest_port = Raw(grpc_address), rest_port
        self.rows: Counter[str] = Counter()
        self.rng = np.random.default_rng(5)
        self.ids = iter(range(1, 1_000_000))
        self.last_id = ""  # of the last gRPC call (7 rows)

    def send(self) -> set[str]:
        """One gRPC and one REST call; the versions that answered."""
        x = self.rng.standard_normal((7, 20)).astype(np.float32)
        self.last_id = f"g-{next(self.ids)}"
        code, reply, _, _ = self.raw.call("ModelInfer", infer_request(x, self.last_id))
        assert code == "OK", reply
        grpc_version = pb.ModelInferResponse.FromString(reply).model_version
        status, _, body = rest_call(self.rest_port, "POST", "/v2/models/m/infer", *infer_body(x[:3], "r"))
        assert status == 200, body
        rest_version = json.loads(body)["model_version"]
        self.rows[grpc_version] += 7
        self.rows[rest_version] += 3
        return {grpc_version, rest_version}


def test_promotion_rollback_and_a_failed_load_through_mlserver(tmp_path: Path, mlserver: Any,
                                                               models: dict[str, bytes]):
    with running_collector(tmp_path) as (_, ops, address, _):
        for data in models.values():
            register(ops, data)
        first = make_production(ops, 1)
        proxy, line = start(["agent", "proxy", "--upstream", mlserver.grpc_address, "--upstream-http",
                             mlserver.http_address, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                             "--model-name", "m", "--managed", "--collector", address, "--token", AGENT_TOKEN,
                             "--agent-id", AGENT, "--spool-dir", str(tmp_path / "spool"), "--window-seconds", "0.5",
                             "--summarizer", "thread", "--upstream-load-timeout-seconds", "60"],
                            READY)
        grpc_address, rest_url = re.search(r"on (\S+) \(m: .*REST \S+ on (\S+)", line).groups()
        traffic = Traffic(grpc_address, int(rest_url.rsplit(":", 1)[1]))
        try:
            # on its hello the proxy is told production (version 1): loaded, ready, acked in the promotion's rollout
            assert answered(ops, first) == ("ok", "")
            state = agent_state(ops, AGENT)
            assert state.managed and (state.model_version, state.desired_version, state.model_error) == ("1", "1", "")
            direct = Raw(mlserver.grpc_address).call("ModelInfer", infer_request(np.zeros((1, 20), np.float32)))
            assert pb.ModelInferResponse.FromString(direct[1]).model_version == "2"  # MLServer's own default
            assert traffic.send() == {"1"}  # pinned to the registry's production version

            served_by_1 = traffic.last_id
            promoted = make_production(ops, 2)
            assert answered(ops, promoted) == ("ok", "")
            assert traffic.send() == {"2"}
            # labels of a call version 1 answered still join it after the switch, as on a managed agent
            labels = [agent_pb2.Label(request_id=served_by_1, row=j, class_label="1") for j in range(7)]
            with grpc.insecure_channel(grpc_address) as channel:
                joined = agent_pb2_grpc.FeedbackServiceStub(channel).Feedback(
                    agent_pb2.FeedbackRequest(labels=labels), timeout=HANG_GUARD)
            assert (joined.matched, joined.unmatched) == (7, 0)
            shown = cli("rollout", "show", str(promoted), "--collector", address, "--token", TOKENS["dave"])
            assert shown.returncode == 0 and AGENT in shown.stdout and " ok " in shown.stdout, shown.stdout

            back = call(ops, "alice", "Rollback", cpb.RollbackRequest(model_name="m", reason="p99 doubled")).id
            assert answered(ops, back) == ("ok", "")
            assert traffic.send() == {"1"}

            # version 3: in the registry, and in MLServer's repository as a file its runtime cannot load
            register(ops, examples.random_forest(n_trees=3))
            mlserver_env.write_version(mlserver.folder, b"not an onnx model", "m", "3")
            failed = make_production(ops, 3)
            state, error = answered(ops, failed)
            assert state == "failed" and f"upstream {mlserver.grpc_address} could not load model 'm'" in error, error
            assert "INVALID_PROTOBUF" in error or "protobuf" in error.lower(), error  # onnxruntime's, via MLServer
            shown = agent_state(ops, AGENT)
            assert (shown.model_version, shown.desired_version) == ("1", "3") and shown.model_error == error
            assert traffic.send() == {"1"}  # the version before goes on, served and monitored

            # version 4: in the registry, not in MLServer's repository (a load of "m" succeeds without it)
            shutil.rmtree(mlserver.folder / "m-v3")
            register(ops, examples.random_forest(n_trees=4))
            state, error = answered(ops, make_production(ops, 4))
            assert state == "failed" and "lists no version '4' of it (it lists: 1, 2)" in error, error
            assert traffic.send() == {"1"}
        finally:
            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(HANG_GUARD) == 0  # the last window flushed and delivered

        def stored() -> Counter[str]:
            windows = call(ops, "dave", "ListWindows", cpb.ListWindowsRequest(model_name="m", limit=10_000)).windows
            assert {w.agent_id for w in windows} <= {AGENT}
            rows: Counter[str] = Counter()
            for w in windows:
                rows[w.model_version] += w.rows
            return rows

        wait_until(lambda: stored() == traffic.rows, timeout=HANG_GUARD, what=f"rows {dict(traffic.rows)} stored")
        assert set(traffic.rows) == {"1", "2"}


def test_over_rest_alone_promotion_and_rollback_load_the_version_through_the_rest_extension(
        tmp_path: Path, mlserver: Any, models: dict[str, bytes]):
    """The proxy forwarding only REST (no --upstream): loads go through ``POST /v2/repository/models/m/load``,
    readiness and the index through REST too; unversioned REST calls are pinned as over gRPC."""
    with running_collector(tmp_path) as (_, ops, address, _):
        for data in models.values():
            register(ops, data)
        first = make_production(ops, 1)
        proxy, line = start(["agent", "proxy", "--upstream-http", mlserver.http_address, "--listen", "127.0.0.1:0",
                             "--http-listen", "127.0.0.1:0", "--model-name", "m", "--managed", "--collector", address,
                             "--token", AGENT_TOKEN, "--agent-id", AGENT, "--spool-dir", str(tmp_path / "spool"),
                             "--window-seconds", "0.5", "--summarizer", "thread",
                             "--upstream-load-timeout-seconds", "60"],
                            READY)
        port = int(re.search(r"REST \S+ on (\S+)", line).group(1).rsplit(":", 1)[1])
        sent: Counter[str] = Counter()

        def answering() -> str:
            status, _, body = rest_call(port, "POST", "/v2/models/m/infer", *infer_body(np.ones((4, 20)), "r"))
            assert status == 200, body
            version = json.loads(body)["model_version"]
            sent[version] += 4
            return version

        try:
            assert answered(ops, first) == ("ok", "")
            assert answering() == "1"  # MLServer's own default would be 2: pinned over REST
            assert answered(ops, make_production(ops, 2)) == ("ok", "")
            assert answering() == "2"
            back = call(ops, "alice", "Rollback", cpb.RollbackRequest(model_name="m", reason="p99 doubled")).id
            assert answered(ops, back) == ("ok", "")
            assert answering() == "1"
            register(ops, examples.random_forest(n_trees=4))  # in the registry, not in MLServer's repository
            state, error = answered(ops, make_production(ops, 3))
            assert state == "failed" and f"upstream {mlserver.http_address} loaded model 'm' but lists no version " \
                                         "'3' of it (it lists: 1, 2)" in error, error
            assert answering() == "1"
        finally:
            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(HANG_GUARD) == 0

        def stored() -> Counter[str]:
            windows = call(ops, "dave", "ListWindows", cpb.ListWindowsRequest(model_name="m", limit=10_000)).windows
            return Counter({v: sum(w.rows for w in windows if w.model_version == v)
                            for v in {w.model_version for w in windows}})

        wait_until(lambda: stored() == sent, timeout=HANG_GUARD, what=f"rows {dict(sent)} stored")


def test_a_pin_appends_the_version_and_changes_nothing_else():
    from agent.proxy_grpc import _with_version

    request = infer_request(np.ones((2, 20), np.float32), "id-1", outputs=("label",))
    request.parameters["priority"].int64_param = 3
    wire = request.SerializeToString()
    for version in ("2", "v" * 200):  # one and two bytes of length
        pinned = _with_version(wire, version)
        expected = pb.ModelInferRequest()
        expected.CopyFrom(request)
        expected.model_version = version
        assert pinned.startswith(wire) and pb.ModelInferRequest.FromString(pinned) == expected


def test_managed_flags_are_checked(tmp_path: Path):
    from test_proxy import run_cli

    no_collector = run_cli("agent", "proxy", "--upstream", "127.0.0.1:1", "--model-name", "m", "--managed")
    assert no_collector.code == 2 and "--managed needs --collector" in no_collector.one_line()
    pinned = run_cli("agent", "proxy", "--upstream", "127.0.0.1:1", "--model-name", "m", "--managed",
                     "--collector", "127.0.0.1:2", "--model-version", "3")
    assert pinned.code == 2 and "collector names the version" in pinned.one_line()
    template = run_cli("agent", "proxy", "--upstream", "127.0.0.1:1", "--model-name", "m", "--managed",
                       "--collector", "127.0.0.1:2", "--upstream-version", "v1")
    assert template.code == 2 and "does not contain {version}" in template.one_line()
