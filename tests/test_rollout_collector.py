"""Rollout, rollback and shadow, the collector's side: a real collector in-process, fake managed agents
as raw gRPC stream clients (hello, commands in, FetchArtifact, ModelState out), the CLI as a subprocess."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import onnx
import pytest

from agent.errors import FailedPrecondition
from collector.api.server import serve_collector
from collector.base.auth import AuthConfig
from collector.lifecycle import approvals
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from test_approvals import AUTH_TOML, HANG_GUARD, MODEL, TOKENS, call, cli, promote, reference_profile, refused, stages
from test_collector_server import window
from test_registry import drop_artifact

AGENT_TOKEN = "edge-agent-token-0123456789"
AUTH = AUTH_TOML + f'[[agent]]\nname = "edge"\ntoken = "{AGENT_TOKEN}"\nagent_ids = ["*"]\n'
AGENT_AUTH = (("authorization", f"Bearer {AGENT_TOKEN}"),)
MiB = 1 << 20


@functools.cache
def model_bytes(n: int, big: bool = False) -> bytes:
    """The example classifier with its own sha256 per n (and over 1 MiB when ``big``)."""
    m = onnx.load_model_from_string(MODEL)
    m.doc_string = f"build {n}" + ("." * (MiB + 4096) if big else "")
    return m.SerializeToString()


def register(ops, n: int, big: bool = False) -> pb.ModelVersion:
    data = model_bytes(n, big)
    meta = pb.RegisterMetadata(name="churn", metrics_json='{"accuracy": 0.9}', sha256=hashlib.sha256(data).hexdigest(),
                               size=len(data))
    meta.profile.CopyFrom(reference_profile())
    meta.profile.model_sha256 = ""  # built with MODEL; these bytes differ only in their doc string
    chunks = [pb.RegisterChunk(metadata=meta)] + [pb.RegisterChunk(data=data[i:i + MiB])
                                                   for i in range(0, len(data), MiB)]
    return call(ops, "alice", "RegisterModel", iter(chunks))


def make_production(ops, version: int) -> pb.Approval:
    return call(ops, "bob", "Approve", pb.DecisionRequest(id=promote(ops, "alice", version).id))


def fetch(stub, name: str, version: int, metadata=AGENT_AUTH) -> list[pb.ArtifactChunk]:
    return list(stub.FetchArtifact(pb.FetchArtifactRequest(model_name=name, version=version), metadata=metadata,
                                   timeout=HANG_GUARD))


def wait_for(condition: Callable[[], object]) -> object:
    deadline = time.monotonic() + HANG_GUARD
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return result


class FakeAgent:
    """A managed agent (or, with managed=False, a plain one): a hello, then commands in and ModelState out.
    ``auto`` answers every command itself: it returns the error to report ("" to carry it out)."""

    def __init__(self, address: str, agent_id: str, *, model: str = "churn", managed: bool = True,
                 serving: str = "", shadow: str = "", auto: Callable[[pb.Command], str] | None = None) -> None:
        self.agent_id, self.run_id, self.model = agent_id, uuid.uuid4().hex, model
        self.serving, self.shadow, self.auto, self.seq = serving, shadow, auto, 0
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.AgentServiceStub(self.channel)
        self._out: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        self.references: queue.Queue = queue.Queue()  # "reference" commands (their projections), kept apart
        state = pb.ModelState(model_version=serving, ok=True, shadow_version=shadow, shadow_share=0.5 if shadow else 0)
        self._out.put(pb.AgentMessage(hello=pb.Hello(
            agent_id=agent_id, run_id=self.run_id, host="box", model_name=model, model_version=serving,
            managed=managed, model_state=state, started_unix_nano=time.time_ns())))
        self.replies = self.stub.Stream(iter(self._out.get, None), metadata=AGENT_AUTH, timeout=4 * HANG_GUARD)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.replies:
                if message.HasField("command") and message.command.kind == "reference":
                    self.references.put(message.command)  # tests/test_joint.py checks these
                elif message.HasField("command") and self.auto is not None:
                    self.answer(message.command, self.auto(message.command))
                else:
                    self.inbox.put(message)
        except grpc.RpcError as exc:
            self.inbox.put(exc)

    def command(self) -> pb.Command:
        message = self.inbox.get(timeout=HANG_GUARD)
        assert isinstance(message, pb.CollectorMessage) and message.HasField("command"), message
        return message.command

    def quiet(self) -> None:
        """Nothing was sent to it until now: a window's ack comes back before anything queued later."""
        self.seq += 1
        self._out.put(pb.AgentMessage(windows=pb.WindowBatch(windows=[window(self.seq, agent=self.agent_id,
                                                                              run=self.run_id, model=self.model)])))
        message = self.inbox.get(timeout=HANG_GUARD)
        assert isinstance(message, pb.CollectorMessage) and message.HasField("acks"), message

    def answer(self, command: pb.Command, error: str = "") -> None:
        """Carry out ``command`` as the contract says (fetch, check size and sha256), or report ``error``."""
        if command.kind in ("serve", "shadow") and not error:
            chunks = fetch(self.stub, self.model, int(command.args["version"]))
            data = b"".join(c.data for c in chunks)
            assert (chunks[0].sha256, chunks[0].total_size) == (command.args["sha256"], int(command.args["size"]))
            assert hashlib.sha256(data).hexdigest() == command.args["sha256"] and len(data) == chunks[0].total_size
            if command.kind == "serve":
                self.serving = command.args["version"]
            else:
                self.shadow = command.args["version"]
        if command.kind == "unshadow" and not error:
            self.shadow = ""
        self._out.put(pb.AgentMessage(model_state=pb.ModelState(
            command_id=command.id, model_version=self.serving, ok=not error, error=error,
            shadow_version=self.shadow, shadow_share=0.25 if self.shadow else 0)))

    def close(self) -> None:
        self._out.put(None)
        self.channel.close()


@pytest.fixture
def collector(db_url, tmp_path, monkeypatch) -> Iterator[tuple]:
    """A collector on each engine (a SQLite file, then PostgreSQL)."""
    monkeypatch.chdir(tmp_path)  # on PostgreSQL the artifacts' directory is made relative to the working one
    with running_collector(tmp_path, db_url) as parts:
        yield parts


@contextlib.contextmanager
def running_collector(tmp_path, db: str | Path | None = None) -> Iterator[tuple]:
    """A collector with AUTH: the server, an OpsService stub, its address, connect(agent_id) -> FakeAgent.
    ``db``: a SQLite path or a PostgreSQL URL (default: collector.db in ``tmp_path``)."""
    server = serve_collector(db or tmp_path / "collector.db", "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH),
                             drift_interval=0, rollup_interval=3600)
    address = f"127.0.0.1:{server.port}"
    channel = grpc.insecure_channel(address)
    agents: list[FakeAgent] = []

    def connect(agent_id: str, **kw) -> FakeAgent:
        agents.append(FakeAgent(address, agent_id, **kw))
        return agents[-1]

    try:
        yield server, pb_grpc.OpsServiceStub(channel), address, connect
    finally:
        for agent in agents:
            agent.close()
        channel.close()
        server.stop(grace=0)


def rollouts(ops, who: str = "dave") -> list[pb.Rollout]:
    return list(call(ops, who, "ListRollouts", pb.ListRolloutsRequest(model_name="churn")).rollouts)


def acks(ops, rollout_id: int) -> dict[str, tuple[str, str]]:
    shown = call(ops, "dave", "ShowRollout", pb.ShowRolloutRequest(id=rollout_id))
    return {a.agent_id: (a.state, a.error) for a in shown.agents}


def agent_state(ops, agent_id: str) -> pb.AgentState:
    agents = call(ops, "dave", "Status", pb.StatusRequest()).agents
    return next((a for a in agents if a.agent_id == agent_id), pb.AgentState())  # empty until its hello is in


def test_approval_pushes_serve_to_every_managed_agent_and_tracks_their_acks(collector):
    server, ops, address, connect = collector
    v1 = register(ops, 1)
    one, two = connect("edge-1"), connect("edge-2")
    plain, other = connect("plain", managed=False, serving="7"), connect("other", model="fraud")
    for agent in (one, two, plain, other):
        agent.quiet()  # no production version yet: nothing to serve, the agents wait
    assert agent_state(ops, "edge-1").managed and not agent_state(ops, "plain").managed
    assert agent_state(ops, "edge-1").desired_version == ""

    make_production(ops, 1)
    [made] = rollouts(ops)
    assert (made.kind, made.version, made.from_version, made.actor) == ("promote", 1, 0, "bob")
    assert acks(ops, made.id) == {"edge-1": ("pending", ""), "edge-2": ("pending", "")}
    for agent in (one, two):
        command = agent.command()
        assert (command.id, command.kind) == (f"rollout-{made.id}", "serve")
        names = {i: list(c.names) for i, c in v1.feature_names.items()}  # the version's, from its reference
        assert names == {"X": [f"X[{i}]" for i in range(20)]}
        assert dict(command.args) == {"version": "1", "sha256": v1.sha256, "size": str(v1.size),
                                      "schema_json": v1.schema_json, "feature_names": json.dumps(
                                          names, separators=(",", ":"))}
        agent.answer(command)
    wait_for(lambda: acks(ops, made.id) == {"edge-1": ("ok", ""), "edge-2": ("ok", "")})
    state = agent_state(ops, "edge-2")
    assert (state.model_version, state.desired_version, state.model_error) == ("1", "1", "")
    for agent in (plain, other):
        agent.quiet()  # neither is a managed agent of churn: told nothing


def test_a_failed_answer_is_recorded_and_shown_and_a_new_agent_gets_production(collector):
    server, ops, address, connect = collector
    for n in (1, 2):
        register(ops, n)
    make_production(ops, 1)
    first = connect("edge-1")
    command = first.command()  # on hello: production, counted in the rollout that made it production
    assert command.args["version"] == "1" and command.id == f"rollout-{rollouts(ops)[0].id}"
    first.answer(command)
    make_production(ops, 2)
    second_rollout = rollouts(ops)[0]
    assert (second_rollout.version, second_rollout.from_version) == (2, 1)
    first.answer(first.command(), error="output 'label' has type tensor(string), the schema says tensor(int64)")
    wait_for(lambda: acks(ops, second_rollout.id)["edge-1"][0] == "failed")
    assert "tensor(string)" in acks(ops, second_rollout.id)["edge-1"][1]
    state = agent_state(ops, "edge-1")
    assert (state.model_version, state.desired_version) == ("1", "2") and "tensor(string)" in state.model_error

    shown = cli("status", "--collector", address, "--token", TOKENS["dave"])
    assert shown.returncode == 0, shown.stderr
    line = next(row for row in shown.stdout.splitlines() if row.startswith("edge-1"))
    assert "churn@1" in line and "FAILED" in line
    assert "the last command failed, it serves 1: output 'label' has type tensor(string)" in shown.stdout

    late = connect("edge-3")
    command = late.command()
    assert (command.kind, command.args["version"], command.id) == ("serve", "2", f"rollout-{second_rollout.id}")
    late.answer(command)
    wait_for(lambda: acks(ops, second_rollout.id).get("edge-3") == ("ok", ""))
    late.quiet()  # no shadow is set and none runs: nothing else
    shown = cli("status", "--collector", address, "--token", TOKENS["dave"]).stdout.splitlines()
    assert " ok " in next(row for row in shown if row.startswith("edge-3"))


def test_rollback_to_the_previous_and_to_a_named_version_with_the_cli(collector):
    server, ops, address, connect = collector
    for n in (1, 2, 3):
        register(ops, n)
        make_production(ops, n)
    connect("edge-1", auto=lambda command: "")
    wait_for(lambda: agent_state(ops, "edge-1").model_version == "3")

    back = call(ops, "alice", "Rollback", pb.RollbackRequest(model_name="churn", reason="p99 doubled"))
    assert (back.kind, back.version, back.from_version, back.actor) == ("rollback", 2, 3, "alice")
    assert stages(ops) == {1: "archived", 2: "production", 3: "archived"}
    wait_for(lambda: acks(ops, back.id) == {"edge-1": ("ok", "")})
    assert agent_state(ops, "edge-1").model_version == "2"

    done = cli("rollback", "churn", "--to", "1", "--reason", "v2 too", "--wait", "60", "--collector", address,
               "--token", TOKENS["alice"])
    assert done.returncode == 0, done.stderr
    assert "rolled back churn to version 1 (version 2 archived)" in done.stdout and "1 ok, 0 failed" in done.stdout
    assert stages(ops) == {1: "production", 2: "archived", 3: "archived"}
    assert agent_state(ops, "edge-1").model_version == "1"

    listed = cli("rollouts", "churn", "--json", "--collector", address, "--token", TOKENS["dave"])
    assert listed.returncode == 0, listed.stderr
    kinds = [(r["kind"], r["version"], r["from_version"]) for r in json.loads(listed.stdout)["rollouts"]]
    assert kinds == [("rollback", 1, 2), ("rollback", 2, 3), ("promote", 3, 2), ("promote", 2, 1), ("promote", 1, 0)]
    newest = json.loads(listed.stdout)["rollouts"][0]["id"]
    shown = cli("rollout", "show", str(newest), "--collector", address, "--token", TOKENS["dave"])
    assert shown.returncode == 0 and "edge-1" in shown.stdout and " ok " in shown.stdout, shown.stderr
    assert cli("rollout", "show", "999", "--collector", address, "--token", TOKENS["dave"]).returncode == 1

    trail = call(ops, "dave", "ListAudit", pb.ListAuditRequest(model_name="churn")).entries
    rolled = [(e.actor, json.loads(e.before), json.loads(e.after)["production"]) for e in trail
              if e.action == "model.rollback"]
    assert rolled == [("alice", {"production": 2}, 1), ("alice", {"production": 3}, 2)]
    assert call(ops, "dave", "VerifyAudit", pb.VerifyAuditRequest()).ok

    # an agent that fails, then one that never answers: --wait says so and exits 1
    connect("broken", auto=lambda command: "cannot load: out of memory" if command.args["version"] == "2" else "")
    wait_for(lambda: agent_state(ops, "broken").model_version == "1")
    failed = cli("rollback", "churn", "--reason", "again", "--wait", "60", "--collector", address,
                 "--token", TOKENS["alice"])
    assert failed.returncode == 1 and "not every agent serves churn version 2" in failed.stderr, failed.stderr
    assert "broken run" in failed.stdout and "failed: cannot load: out of memory" in failed.stdout
    silent = connect("silent")
    silent.command()
    late = cli("rollback", "churn", "--reason", "and back", "--wait", "0.5", "--collector", address,
               "--token", TOKENS["alice"])
    assert late.returncode == 1 and "silent run" in late.stdout and "no answer within 0.5 s" in late.stdout


def test_rollback_to_a_retired_or_never_production_version_is_refused_and_changes_nothing(collector):
    server, ops, address, connect = collector
    for n in (1, 2, 3):
        register(ops, n)
    err = refused(ops, "alice", "Rollback", pb.RollbackRequest(model_name="churn", reason="x"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "no production version" in err.details()
    for n in (1, 2):
        make_production(ops, n)
    before = (stages(ops), rollouts(ops))

    err = refused(ops, "alice", "Rollback", pb.RollbackRequest(model_name="churn", to_version=3, reason="x"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "never production" in err.details()
    assert "outrider models promote churn 3" in err.details()
    for request, code in ((pb.RollbackRequest(model_name="churn", to_version=9, reason="x"), "NOT_FOUND"),
                          (pb.RollbackRequest(model_name="churn"), "INVALID_ARGUMENT"),
                          (pb.RollbackRequest(model_name="nope", reason="x"), "NOT_FOUND")):
        assert refused(ops, "alice", "Rollback", request).code().name == code
    assert refused(ops, "dave", "Rollback", pb.RollbackRequest(model_name="churn", reason="x")).code() == \
        grpc.StatusCode.PERMISSION_DENIED
    call(ops, "alice", "RetireModel", pb.RetireRequest(name="churn", version=1, reason="leaks"))
    err = refused(ops, "alice", "Rollback", pb.RollbackRequest(model_name="churn", reason="x"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "retired" in err.details()
    assert "--to VERSION" in err.details()
    assert stages(ops) == {**before[0], 1: "retired"} and rollouts(ops) == before[1]
    assert not [e for e in call(ops, "dave", "ListAudit", pb.ListAuditRequest()).entries if e.action == "model.rollback"]

    viewer = cli("rollback", "churn", "--reason", "x", "--collector", address, "--token", TOKENS["dave"])
    assert viewer.returncode == 1 and "needs operator" in viewer.stderr
    retired = cli("rollback", "churn", "--to", "1", "--reason", "x", "--collector", address,
                  "--token", TOKENS["alice"])
    assert retired.returncode == 1 and "retired" in retired.stderr and len(retired.stderr.splitlines()) == 1


def test_fetch_artifact_streams_chunks_and_refuses_what_cannot_be_served(collector):
    server, ops, address, connect = collector
    register(ops, 1)
    big = register(ops, 2, big=True)
    stub = pb_grpc.AgentServiceStub(connect("edge-1").channel)  # no production yet: it only waits
    chunks = fetch(stub, "churn", 2)
    assert len(chunks) == 2 and all(len(c.data) <= MiB for c in chunks)
    assert (chunks[0].total_size, chunks[0].sha256) == (big.size, big.sha256)
    assert (chunks[1].total_size, chunks[1].sha256) == (0, "")
    assert b"".join(c.data for c in chunks) == model_bytes(2, big=True)

    def code(name: str, version: int, metadata=AGENT_AUTH) -> tuple[str, str]:
        with pytest.raises(grpc.RpcError) as caught:
            fetch(stub, name, version, metadata)
        return caught.value.code().name, caught.value.details()

    assert code("churn", 7)[0] == "NOT_FOUND" and code("fraud", 1)[0] == "NOT_FOUND"
    assert code("churn", 1, (("authorization", f"Bearer {TOKENS['root']}"),))[0] == "PERMISSION_DENIED"
    drop_artifact(server.store.path, big.sha256)
    assert code("churn", 2) == ("FAILED_PRECONDITION", "the artifact of churn version 2 has been removed")
    make_production(ops, 1)
    register(ops, 3)
    make_production(ops, 3)
    call(ops, "alice", "RetireModel", pb.RetireRequest(name="churn", version=1, reason="old"))
    assert code("churn", 1)[0] == "FAILED_PRECONDITION" and "retired" in code("churn", 1)[1]


def test_shadow_set_and_clear_are_pushed_checked_and_audited(collector):
    server, ops, address, connect = collector
    for n in (1, 2, 3):
        register(ops, n)
    make_production(ops, 1)
    call(ops, "alice", "SetStage", pb.SetStageRequest(name="churn", version=2, stage="staging", reason="try"))
    agent = connect("edge-1")
    agent.answer(agent.command())

    bad = {"candidate": pb.SetShadowRequest(model_name="churn", version=3, share=0.5, reason="x"),
           "zero": pb.SetShadowRequest(model_name="churn", version=2, share=0, reason="x"),
           "over": pb.SetShadowRequest(model_name="churn", version=2, share=1.5, reason="x"),
           "reason": pb.SetShadowRequest(model_name="churn", version=2, share=0.5)}
    codes = {k: refused(ops, "alice", "SetShadow", r).code().name for k, r in bad.items()}
    assert codes == {"candidate": "FAILED_PRECONDITION", "zero": "INVALID_ARGUMENT", "over": "INVALID_ARGUMENT",
                     "reason": "INVALID_ARGUMENT"}
    assert refused(ops, "dave", "SetShadow", bad["candidate"]).code() == grpc.StatusCode.PERMISSION_DENIED
    err = refused(ops, "alice", "ClearShadow", pb.SetShadowRequest(model_name="churn", reason="x"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "no shadow" in err.details()
    agent.quiet()

    made = call(ops, "alice", "SetShadow", pb.SetShadowRequest(model_name="churn", version=2, share=0.25,
                                                               reason="compare"))
    assert (made.kind, made.version, made.share) == ("shadow", 2, 0.25)
    command = agent.command()
    assert (command.id, command.kind, command.args["version"], command.args["share"]) == (
        f"rollout-{made.id}", "shadow", "2", "0.25")
    agent.answer(command)
    wait_for(lambda: acks(ops, made.id) == {"edge-1": ("ok", "")})
    assert (agent_state(ops, "edge-1").shadow_version, agent_state(ops, "edge-1").shadow_share) == ("2", 0.25)

    late = connect("edge-2")
    assert [(c.kind, c.args["version"]) for c in (late.command(), late.command())] == [("serve", "1"),
                                                                                       ("shadow", "2")]
    cleared = call(ops, "alice", "ClearShadow", pb.SetShadowRequest(model_name="churn", reason="enough"))
    assert (cleared.kind, cleared.version) == ("unshadow", 2)
    for a in (agent, late):
        command = a.command()
        assert (command.id, command.kind, dict(command.args)) == (f"rollout-{cleared.id}", "unshadow", {})
    stale = connect("edge-3", serving="1", shadow="2")  # still runs a shadow nobody set any more
    assert [c.kind for c in (stale.command(), stale.command())] == ["serve", "unshadow"]
    actions = [e.action for e in call(ops, "dave", "ListAudit", pb.ListAuditRequest(model_name="churn")).entries]
    assert actions[:2] == ["model.unshadow", "model.shadow"]


def test_an_approved_rollback_request_performs_the_rollback(collector):
    server, ops, address, connect = collector
    for n in (1, 2):
        register(ops, n)
        make_production(ops, n)
    agent = connect("edge-1")
    agent.answer(agent.command())
    opened = server.store.write(lambda db: approvals.request_rollback(db, "churn", 0, "collector", "accuracy fell",
                                                                      time.time_ns()))
    assert (opened.kind, opened.version, opened.state, opened.requested_by) == ("rollback", 1, "pending", "collector")
    with pytest.raises(FailedPrecondition, match="already has a pending rollback request"):
        server.store.write(lambda db: approvals.request_rollback(db, "churn", 0, "collector", "again", time.time_ns()))
    listed = call(ops, "dave", "ListApprovals", pb.ListApprovalsRequest()).approvals
    assert [(a.id, a.kind) for a in listed] == [(opened.id, "rollback")]
    agent.quiet()  # a request changes nothing yet

    approved = call(ops, "bob", "Approve", pb.DecisionRequest(id=opened.id, reason="agreed"))
    assert (approved.state, approved.kind) == ("approved", "rollback")
    assert stages(ops) == {1: "production", 2: "archived"}
    newest = rollouts(ops)[0]
    assert (newest.kind, newest.version, newest.from_version, newest.actor) == ("rollback", 1, 2, "bob")
    command = agent.command()
    assert (command.id, command.args["version"]) == (f"rollout-{newest.id}", "1")
    entries = call(ops, "dave", "ListAudit", pb.ListAuditRequest(model_name="churn")).entries
    assert [e.actor for e in entries if e.action == "model.rollback"] == ["bob"]
