"""Managed agents (agent/rollout.py) against a fake collector on loopback.

The fake is a real gRPC ``AgentService``: it records Hellos, ModelStates and
windows (acked STORED), lets the test push Commands on every open stream, and
serves registered files through FetchArtifact (or corrupts them on request).
The agent is real too: RolloutController + the OIP server, called over gRPC.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import queue
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent import examples
from agent.artifacts import warm_up
from agent.rollout import CURRENT_FILE, RolloutController
from agent.server import InferenceServer, serve_switch
from protos import collector_pb2 as cpb
from protos import collector_pb2_grpc
from protos import open_inference_pb2 as pb
from protos import open_inference_pb2_grpc as pb_grpc
from test_exporter import FAST, free_port, wait_until
from test_server import decode, raw_request, x_rows

NAME = "churn"
Ack = cpb.WindowAck
_ids = itertools.count(1)


class FakeCollector(collector_pb2_grpc.AgentServiceServicer):
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.hellos: list[cpb.Hello] = []
        self.states: list[cpb.ModelState] = []
        self.windows: list = []                   # every window received, in arrival order
        self.files: dict[int, bytes] = {}         # version -> the registered file
        self.corrupt: set[int] = set()            # versions served with a flipped byte
        self.fetches = 0
        self._outboxes: list[queue.SimpleQueue] = []

    def Stream(self, request_iterator, context):
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(request_iterator, outbox), daemon=True).start()
        while context.is_active():
            try:
                message = outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if message is None:
                return
            yield message

    def _read(self, request_iterator, outbox) -> None:
        try:
            for message in request_iterator:
                kind = message.WhichOneof("kind")
                with self.cond:
                    if kind == "hello":
                        self.hellos.append(message.hello)
                        self._outboxes.append(outbox)
                    elif kind == "model_state":
                        self.states.append(message.model_state)
                    elif kind == "windows":
                        self.windows.extend(message.windows.windows)
                        outbox.put(cpb.CollectorMessage(acks=cpb.Acks(acks=[
                            Ack(run_id=w.run_id, seq=w.seq, result=Ack.STORED) for w in message.windows.windows])))
                    self.cond.notify_all()
        except Exception:  # the stream ended
            pass
        finally:
            with self.cond:
                if outbox in self._outboxes:
                    self._outboxes.remove(outbox)
            outbox.put(None)

    def FetchArtifact(self, request, context):
        with self.cond:
            self.fetches += 1
            data = self.files.get(request.version)
        if request.model_name != NAME or data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.model_name} has no version {request.version}")
        sha = hashlib.sha256(data).hexdigest()
        if request.version in self.corrupt:
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        for i in range(0, len(data), 4096):
            first = i == 0
            yield cpb.ArtifactChunk(data=data[i:i + 4096], total_size=len(data) if first else 0,
                                    sha256=sha if first else "")

    # --- what the test does -----------------------------------------------------------
    def command(self, kind: str, **args: str) -> str:
        """Push a command on every open stream (waiting for one); returns its id."""
        command_id = f"test-{next(_ids)}"
        message = cpb.CollectorMessage(command=cpb.Command(id=command_id, kind=kind, args=args))
        with self.cond:
            assert self.cond.wait_for(lambda: self._outboxes, 30), "no agent stream open"
            for outbox in self._outboxes:
                outbox.put(message)
        return command_id

    def state(self, command_id: str, timeout: float = 60) -> cpb.ModelState:
        with self.cond:
            found = self.cond.wait_for(lambda: [s for s in self.states if s.command_id == command_id], timeout)
        assert found, f"no ModelState for {command_id}"
        return found[0]

    def windows_received(self) -> list:
        with self.cond:
            return list(self.windows)


@pytest.fixture
def collector():
    fake = FakeCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    collector_pb2_grpc.add_AgentServiceServicer_to_server(fake, server)
    fake.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield fake
    server.stop(0).wait()


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    return {"v1": examples.logistic_regression(), "v2": examples.random_forest(n_trees=5),
            "narrow": examples.logistic_regression(n_features=5)}


def schema_of(model: bytes) -> str:
    """The registry's schema_json (None for free dimensions, as the registry writes it)."""
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    args = lambda items: [{"name": a.name, "type": a.type,  # noqa: E731
                           "shape": [d if isinstance(d, int) else None for d in a.shape]} for a in items]
    return json.dumps({"inputs": args(sess.get_inputs()), "outputs": args(sess.get_outputs())})


def serve_args(number: int, model: bytes, /, *, schema_from: bytes | None = None, **override: str) -> dict:
    args = {"version": str(number), "sha256": hashlib.sha256(model).hexdigest(), "size": str(len(model)),
            "schema_json": schema_of(schema_from or model)}
    return {**args, **override}


@dataclass
class Agent:
    ctrl: RolloutController
    server: InferenceServer
    stub: pb_grpc.GRPCInferenceServiceStub
    health: health_pb2_grpc.HealthStub
    channel: grpc.Channel

    def infer(self, rows: int = 4, seed: int = 1) -> pb.ModelInferResponse:
        return self.stub.ModelInfer(raw_request(NAME, {"X": x_rows(rows, seed)}), timeout=30)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(grace=5)


def start_agent(target: str, spool_dir: Path, **kw) -> Agent:
    options = {"summarizer": "thread", "window_seconds": None, "window_rows": 40}
    ctrl = RolloutController(NAME, target, agent_id="agent-a", spool_dir=spool_dir, session_options=options,
                             exporter_options=FAST, **kw)
    server = serve_switch(ctrl.switch, "127.0.0.1:0", owner=ctrl)
    channel = grpc.insecure_channel(server.address)
    return Agent(ctrl, server, pb_grpc.GRPCInferenceServiceStub(channel), health_pb2_grpc.HealthStub(channel),
                 channel)


@pytest.fixture
def agent(collector, tmp_path):
    running = start_agent(collector.target, tmp_path / "spool")
    yield running
    running.stop()


def serve_v1(collector: FakeCollector, models: dict[str, bytes]) -> cpb.ModelState:
    collector.files[1] = models["v1"]
    state = collector.state(collector.command("serve", **serve_args(1, models["v1"])))
    assert state.ok, state.error
    return state


def health(agent: Agent) -> int:
    return agent.health.Check(health_pb2.HealthCheckRequest(service="")).status


# ------------------------------------------------------------------------------ tests

def test_serves_nothing_until_the_collector_names_a_version_then_serves_it(collector, agent, models, tmp_path):
    with pytest.raises(grpc.RpcError) as refused:
        agent.infer()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "waits for the collector to name the production version of churn" in refused.value.details()
    assert not agent.stub.ServerReady(pb.ServerReadyRequest()).ready
    assert not agent.stub.ModelReady(pb.ModelReadyRequest(name=NAME)).ready
    with pytest.raises(grpc.RpcError) as no_metadata:
        agent.stub.ModelMetadata(pb.ModelMetadataRequest(name=NAME))
    assert no_metadata.value.code() == grpc.StatusCode.UNAVAILABLE
    assert health(agent) == health_pb2.HealthCheckResponse.NOT_SERVING
    wait_until(lambda: collector.hellos, what="hello")
    hello = collector.hellos[0]
    assert hello.managed and hello.model_name == NAME and hello.model_version == "" and not hello.inputs

    state = serve_v1(collector, models)
    assert (state.model_version, state.model_sha256) == ("1", hashlib.sha256(models["v1"]).hexdigest())
    reply = agent.infer()
    assert reply.model_version == "1"
    expected = ort.InferenceSession(models["v1"]).run(None, {"X": x_rows()})
    np.testing.assert_array_equal(decode(reply)["probabilities"], expected[1])
    assert agent.stub.ModelReady(pb.ModelReadyRequest(name=NAME, version="1")).ready
    assert list(agent.stub.ModelMetadata(pb.ModelMetadataRequest(name=NAME)).versions) == ["1"]
    assert health(agent) == health_pb2.HealthCheckResponse.SERVING
    hello = agent.ctrl.exporter.hello()  # what a reconnect says
    assert hello.model_version == "1" and hello.model_state.ok and hello.inputs[0].name == "X"
    cached = tmp_path / "spool" / "models"
    assert (cached / f"{state.model_sha256}.onnx").read_bytes() == models["v1"]
    assert json.loads((cached / CURRENT_FILE).read_text())["version"] == "1"

    again = collector.state(collector.command("serve", **serve_args(1, models["v1"])))
    assert again.ok and collector.fetches == 1 and agent.ctrl.stats()["swaps"] == 1  # already served


def test_swap_under_load_fails_no_request_and_windows_number_on(collector, agent, models):
    serve_v1(collector, models)
    collector.files[2] = models["v2"]
    acked = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()
    served = {"1": 0, "2": 0}
    after_ack: list[str] = []
    failures: list[BaseException] = []

    def client(seed: int) -> None:
        with grpc.insecure_channel(agent.server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            n = 0
            while not stop.is_set():
                late = acked.is_set()
                try:
                    reply = stub.ModelInfer(raw_request(NAME, {"X": x_rows(3, seed + n)}), timeout=30)
                except grpc.RpcError as exc:
                    failures.append(exc)
                    return
                n += 1
                with lock:
                    served[reply.model_version] = served.get(reply.model_version, 0) + 3
                    if late:
                        after_ack.append(reply.model_version)

    threads = [threading.Thread(target=client, args=(i * 1000,)) for i in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: served["1"] >= 300, what="load on v1")
    state = collector.state(collector.command("serve", **serve_args(2, models["v2"])))
    acked.set()
    wait_until(lambda: len(after_ack) >= 60 or failures, what="requests after the swap")
    stop.set()
    for t in threads:
        t.join(30)
    assert state.ok and state.model_version == "2", state.error
    assert not failures
    assert set(served) == {"1", "2"} and served["2"] > 0
    assert set(after_ack) == {"2"}

    agent.stop()  # flushes each version's last window through the one exporter
    windows = collector.windows_received()
    assert sorted(w.seq for w in windows) == list(range(len(windows)))  # no gap, no duplicate
    assert {w.run_id for w in windows} == {agent.ctrl.run_id}
    sha = {"1": hashlib.sha256(models["v1"]).hexdigest(), "2": hashlib.sha256(models["v2"]).hexdigest()}
    for version in ("1", "2"):
        mine = [w for w in windows if w.model_version == version]
        assert all(w.model_sha256 == sha[version] for w in mine)
        assert sum(w.rows + w.dropped_rows for w in mine) == served[version]  # warm-up calls not counted


@pytest.mark.parametrize("case, words", [
    ("bad sha256", "but the command names"),
    ("corrupt file", "as received has sha256"),
    ("wrong size", "bytes, but the command says"),
    ("schema mismatch", "does not match its registry schema"),
    ("not registered", "cannot fetch churn version 9"),
    ("bad args", "expected a registry version number"),
    ("names that do not fit", "3 feature names given for input 'X', which has 20 columns"),
    ("names that are not JSON", "expected a JSON object {input: [names]}"),
])
def test_a_version_that_fails_is_reported_and_the_old_one_keeps_serving(collector, agent, models, case, words):
    serve_v1(collector, models)
    v2 = models["v2"]
    collector.files[2] = v2
    args = {
        "bad sha256": serve_args(2, v2, sha256=hashlib.sha256(b"other").hexdigest()),
        "corrupt file": serve_args(2, v2),
        "wrong size": serve_args(2, v2, size=str(len(v2) + 1)),
        "schema mismatch": serve_args(2, models["narrow"], schema_from=models["v1"]),
        "not registered": serve_args(9, v2),
        "bad args": serve_args(2, v2, version="two"),
        "names that do not fit": serve_args(2, v2, feature_names='{"X": ["a", "b", "c"]}'),
        "names that are not JSON": serve_args(2, v2, feature_names="a,b,c"),
    }[case]
    if case == "corrupt file":
        collector.corrupt.add(2)
    if case == "schema mismatch":
        collector.files[2] = models["narrow"]
    state = collector.state(collector.command("serve", **args))
    assert not state.ok and words in state.error, state.error
    assert (state.model_version, state.model_sha256) == ("1", hashlib.sha256(models["v1"]).hexdigest())
    assert agent.infer().model_version == "1"
    assert agent.ctrl.stats()["failed"] == 1
    assert agent.ctrl.exporter.hello().model_state.error == state.error
    assert not list((agent.ctrl.cache.directory).glob("*.tmp"))
    if case in ("bad sha256", "corrupt file", "wrong size"):
        assert not agent.ctrl.cache.path(hashlib.sha256(v2).hexdigest()).exists()


def feature_columns(windows: list, version: str) -> set[tuple[str, ...]]:
    return {tuple(c.name for c in w.columns[:20]) for w in windows if w.model_version == version and w.rows}


def test_the_versions_column_names_name_its_windows_and_survive_a_restart(collector, models, tmp_path):
    """The registry names each version's columns (from its reference); the agent reports them so."""
    names = {"1": [f"a{i}" for i in range(20)], "2": [f"b{i}" for i in range(20)]}
    first = start_agent(collector.target, tmp_path / "spool")
    try:
        for number, model in ((1, models["v1"]), (2, models["v2"])):
            collector.files[number] = model
            state = collector.state(collector.command(
                "serve", **serve_args(number, model, feature_names=json.dumps({"X": names[str(number)]}))))
            assert state.ok, state.error
            for seed in range(10):  # 40 rows: one window
                assert first.infer(4, seed).model_version == str(number)
            wait_until(lambda: feature_columns(collector.windows_received(), str(number)), what="a window")
            assert feature_columns(collector.windows_received(), str(number)) == {tuple(names[str(number)])}
        saved = json.loads((tmp_path / "spool" / "models" / CURRENT_FILE).read_text())
        assert saved["feature_names"] == {"X": names["2"]}
    finally:
        first.stop()
    again = start_agent(f"127.0.0.1:{free_port()}", tmp_path / "spool")  # no collector: serves what it had
    try:
        assert again.ctrl.restored and again.infer().model_version == "2"
        assert again.ctrl.switch.current.session.slots[0].columns == names["2"]
    finally:
        again.stop()


def test_a_managed_agent_takes_no_names_of_its_own(collector, tmp_path):
    with pytest.raises(ValueError, match="come from the registry"):
        RolloutController(NAME, collector.target, agent_id="agent-a", spool_dir=tmp_path / "spool",
                          session_options={"feature_names": ["a"]})


@pytest.mark.parametrize("build", [examples.mixed_inputs_classifier, examples.typed_identity,
                                   examples.image_scorer])
def test_warm_up_feeds_every_input_type_and_shape(build):
    warm_up(ort.InferenceSession(build(), providers=["CPUExecutionProvider"]))


def test_unknown_command_kind_is_refused(collector, agent):
    state = collector.state(collector.command("explode"))
    assert not state.ok and "unknown command kind 'explode'" in state.error


def test_restart_without_the_collector_serves_the_cached_version(collector, models, tmp_path):
    first = start_agent(collector.target, tmp_path / "spool")
    try:
        serve_v1(collector, models)
    finally:
        first.stop()
    dead = f"127.0.0.1:{free_port()}"
    again = start_agent(dead, tmp_path / "spool")
    try:
        assert again.ctrl.restored
        reply = again.infer()
        assert reply.model_version == "1"
        assert health(again) == health_pb2.HealthCheckResponse.SERVING
        hello = again.ctrl.exporter.hello()
        assert hello.managed and hello.model_version == "1" and hello.model_state.model_version == "1"
        assert hello.run_id == again.ctrl.run_id != first.ctrl.run_id
    finally:
        again.stop()


def test_a_damaged_cache_is_not_served(collector, models, tmp_path):
    first = start_agent(collector.target, tmp_path / "spool")
    try:
        sha = serve_v1(collector, models).model_sha256
    finally:
        first.stop()
    path = tmp_path / "spool" / "models" / f"{sha}.onnx"
    path.write_bytes(path.read_bytes()[:-1])
    again = start_agent(f"127.0.0.1:{free_port()}", tmp_path / "spool")
    try:
        assert not again.ctrl.restored and again.ctrl.switch.current is None
        assert not path.exists()
    finally:
        again.stop()


def test_cli_managed_agent_waits_then_serves(collector, models, tmp_path):
    import subprocess
    import sys

    from test_agent_cli import ROOT, cli_env, read_line

    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "agent", "serve", "--model-name", NAME, "--collector", collector.target,
         "--listen", "127.0.0.1:0", "--spool-dir", str(tmp_path / "spool"), "--summarizer", "thread"],
        cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(proc)
        assert line.startswith(f"serving {NAME} (managed by {collector.target}; waiting"), (line, proc.stderr)
        port = int(line.rsplit(":", 1)[1])
        serve_v1(collector, models)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(raw_request(NAME, {"X": x_rows()}))
        assert reply.model_version == "1"
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_every_version_runs_with_the_agents_onnxruntime_options(collector, models, tmp_path):
    import onnxruntime as ort

    from agent.runtime import RuntimeOptions

    runtime = RuntimeOptions(intra_op_threads=2, inter_op_threads=3, graph_optimization="basic")
    options = {"summarizer": "thread", "window_seconds": None, "window_rows": 40, "runtime": runtime}
    ctrl = RolloutController(NAME, collector.target, agent_id="agent-a", spool_dir=tmp_path / "spool",
                             session_options=options, exporter_options=FAST)
    server = serve_switch(ctrl.switch, "127.0.0.1:0", owner=ctrl)
    try:
        serve_v1(collector, models)
        used = ctrl.switch.current.session.inference_session.get_session_options()
        assert (used.intra_op_num_threads, used.inter_op_num_threads) == (2, 3)
        assert used.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        assert used.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    finally:
        server.stop(grace=5)
