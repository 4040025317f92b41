"""Model governance end to end (issue 5), as people run it: a collector process with an auth file, two
agent processes started with only the model's name, and the real CLI for every operator step.

v1 is registered, gated, requested by alice, approved by bob and served by both agents; v2 fails the gate
and cannot be promoted; v3 is requested by carol, who may not approve her own request, approved by bob and
swapped in under load without a failed request; a rollback returns every agent to v1; v3 is retired and
can then be neither promoted nor rolled back to; the audit trail verifies, and stops verifying once one of
its rows is edited in the SQLite file. A viewer can change nothing.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from agent.demo import train  # a scikit-learn model as ONNX, with its reference and holdout files
from protos import collector_pb2, collector_pb2_grpc
from protos import open_inference_pb2 as pb
from protos import open_inference_pb2_grpc as pb_grpc
from test_audit import tamper  # drops the audit triggers, then edits
from test_delivery import start, wait_until  # real processes, as the delivery tests start them

ROOT = Path(__file__).resolve().parents[1]
MODEL = "churn"
pytestmark = pytest.mark.slow
TOKENS = {"agents": "gov-agents-token-0001", "alice": "gov-alice-token-00001", "carol": "gov-carol-token-00001",
          "bob": "gov-bob-token-0000001", "admin": "gov-admin-token-00001", "viewer": "gov-viewer-token-0001"}
# carol may approve (approver >= operator), so what stops her approving her own request is the two-person
# rule, not her role; alice (operator) is refused either way.
ROLES = {"alice": "operator", "carol": "approver", "bob": "approver", "admin": "admin", "viewer": "viewer"}
AUTH = f'[[agent]]\nname = "agents"\ntoken = "{TOKENS["agents"]}"\nagent_ids = ["a1", "a2"]\n' + "".join(
    f'\n[[operator]]\nname = "{who}"\nrole = "{role}"\ntoken = "{TOKENS[who]}"\n' for who, role in ROLES.items())


def infer_request(rng: np.random.Generator, n: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="X", datatype="FP32", shape=[n, 20])
    request.raw_input_contents.append(rng.standard_normal((n, 20)).astype("<f4").tobytes())
    return request


def answered_by(address: str) -> str:
    """The model version that answers one real OIP ModelInfer at ``address``."""
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(np.random.default_rng(), 3),
                                                                     timeout=30)
    assert len(np.frombuffer(reply.raw_output_contents[0], "<i8")) == 3
    return reply.model_version


class Load:
    """Client threads sending ModelInfer to every agent without pause; every failure is kept."""

    def __init__(self, addresses: list[str], per_agent: int = 2) -> None:
        self.answered: collections.Counter[tuple[str, str]] = collections.Counter()  # (agent, version) -> replies
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(a, i), daemon=True)
                         for i, a in enumerate(addresses * per_agent)]
        for t in self._threads:
            t.start()

    def _run(self, address: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not self._stop.is_set():
                try:
                    reply = stub.ModelInfer(infer_request(rng, int(rng.integers(1, 17))), timeout=30)
                except grpc.RpcError as exc:
                    with self._lock:
                        self.failures.append(f"{address}: {exc.code().name}: {exc.details()}")
                    continue
                with self._lock:
                    self.answered[address, reply.model_version] += 1
                self._stop.wait(0.002)

    def count(self, address: str, version: str) -> int:
        with self._lock:
            return self.answered[address, version]

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


class Operators:
    """The people at the CLI (``python -m agent.cli`` with OUTRIDER_COLLECTOR/OUTRIDER_TOKEN), and the
    collector's Status RPC to wait on."""

    def __init__(self, address: str) -> None:
        self.address = address

    def run(self, who: str, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
        env.update(OUTRIDER_COLLECTOR=self.address, OUTRIDER_TOKEN=TOKENS[who], PYTHONPATH=str(ROOT),
                   PYTHONIOENCODING="utf-8")
        return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env, capture_output=True,
                              encoding="utf-8", timeout=300)

    def ok(self, who: str, *args: str) -> str:
        result = self.run(who, *args)
        assert result.returncode == 0, f"[{who}] outrider {' '.join(args)}: {result.stdout}{result.stderr}"
        return result.stdout

    def json(self, who: str, *args: str):
        return json.loads(self.ok(who, *args, "--json"))

    def refused(self, who: str, *args: str, says: str) -> None:
        result = self.run(who, *args)
        assert result.returncode != 0, f"[{who}] outrider {' '.join(args)} was not refused: {result.stdout}"
        assert says in result.stderr and not result.stderr.startswith("Traceback"), result.stderr

    def stages(self) -> dict[int, str]:
        return {v["version"]: v["stage"] for v in self.json("viewer", "models", "list", MODEL)["versions"]}

    def pending(self) -> list[dict]:
        return self.json("viewer", "approvals", "list")["approvals"]

    def changes(self) -> list[dict]:
        """Audited changes; refused calls add ``auth.failure`` rows and change nothing else."""
        return [e for e in self.json("viewer", "audit", "--limit", "1000")["entries"]
                if e["action"] != "auth.failure"]

    def refusals(self, who: str) -> list[dict]:
        return [e for e in self.json("viewer", "audit", "--limit", "1000")["entries"]
                if e["action"] == "auth.failure" and e["actor"] == who]

    def state(self) -> tuple:
        return self.stages(), self.pending(), self.changes()

    def serving(self) -> dict[str, str]:
        """agent id -> the version it serves, for the model's connected agents (the Status RPC)."""
        with grpc.insecure_channel(self.address) as channel:
            status = collector_pb2_grpc.OpsServiceStub(channel).Status(
                collector_pb2.StatusRequest(), metadata=(("authorization", f"Bearer {TOKENS['viewer']}"),), timeout=30)
        return {a.agent_id: a.model_version for a in status.agents if a.connected and a.model_name == MODEL}

    def wait_serving(self, version: str) -> None:
        wait_until(lambda: self.serving() == {"a1": version, "a2": version}, timeout=180,
                   what=f"both agents to serve version {version}")


def collector_process(tmp: Path, listen: str = "127.0.0.1:0") -> tuple[subprocess.Popen, str]:
    # drift and the rollback policy are off: this test is about people's decisions, not the policies
    return start(["collector", "serve", "--db", str(tmp / "c.db"), "--listen", listen,
                  "--auth-file", str(tmp / "tokens.toml"), "--drift-interval", "0", "--rollback-watch-seconds", "0",
                  "--gate-latency-budget-ms", "5000"], r"collector listening on (\S+)")


def stop(procs: list[subprocess.Popen]) -> list[int | str]:
    """SIGTERM each process, agents first (they deliver their last windows), then the collector; exit codes."""
    codes: list[int | str] = []
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            codes.append(proc.wait(90))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(f"{proc.args[3:5]} killed after 90 s")
    return codes


def test_register_gate_approve_swap_rollback_retire_audit(tmp_path: Path):
    (tmp_path / "tokens.toml").write_text(AUTH)
    v1, ref1, holdout = train(tmp_path, "v1", 0.0, seed=1)
    v2, ref2, _ = train(tmp_path, "v2", 0.0, seed=2, flip=True)  # a pipeline bug: trained on flipped labels
    v3, ref3, _ = train(tmp_path, "v3", 0.0, seed=3)
    collector, address = collector_process(tmp_path)
    procs, load = [collector], None
    try:
        ops = Operators(address)
        # 1. v1: registered and gated; requested by alice, approved by bob; served by agents that waited for it
        registered = ops.json("alice", "models", "register", MODEL, "--file", str(v1), "--reference", str(ref1),
                              "--holdout", str(holdout))
        assert (registered["version"], registered["gate_passed"], registered["stage"]) == (1, True, "candidate")
        agents = {}
        for agent_id in ("a1", "a2"):
            proc, agents[agent_id] = start(
                ["agent", "serve", "--model-name", MODEL, "--collector", address, "--token", TOKENS["agents"],
                 "--listen", "127.0.0.1:0", "--agent-id", agent_id, "--spool-dir", str(tmp_path / agent_id)],
                r"serving \S+ \(managed by .*waiting for the collector.*\) on (\S+)\s*$")
            procs.append(proc)
        ops.wait_serving("")  # connected, nothing to serve yet
        request = ops.json("alice", "models", "promote", MODEL, "1", "--reason", "first release")
        ops.refused("alice", "approve", str(request["id"]), says="needs approver")
        assert [a["id"] for a in ops.pending()] == [request["id"]]
        before = ops.state()
        for args in (["approve", str(request["id"])], ["models", "promote", MODEL, "1", "--reason", "x"],
                     ["models", "register", MODEL, "--file", str(v3)],
                     ["rollback", MODEL, "--to", "1", "--reason", "x"],
                     ["models", "retire", MODEL, "1", "--reason", "x"]):
            ops.refused("viewer", *args, says="has role viewer")
        assert ops.state() == before  # the refusals reach the audit trail at the minute's end: checked in 6.
        ops.ok("bob", "approve", str(request["id"]))
        ops.wait_serving("1")
        assert [answered_by(agents[a]) for a in ("a1", "a2")] == ["1", "1"]

        # 2. v2 is clearly worse on the holdout: the gate fails it and its promotion is refused
        registered = ops.json("alice", "models", "register", MODEL, "--file", str(v2), "--reference", str(ref2),
                              "--holdout", str(holdout))
        assert (registered["version"], registered["gate_passed"]) == (2, False)
        assert not next(c for c in registered["gate"]["checks"] if c["name"] == "metrics")["passed"]
        before = ops.state()
        ops.refused("alice", "models", "promote", MODEL, "2", "--reason", "try it", says="evaluation gate")
        assert ops.state() == before and ops.pending() == []

        # 3. v3 passes; carol requests and may not approve it; bob approves; the agents swap under load
        registered = ops.json("carol", "models", "register", MODEL, "--file", str(v3), "--reference", str(ref3),
                              "--holdout", str(holdout))
        assert (registered["version"], registered["gate_passed"]) == (3, True), registered["gate"]
        load = Load(list(agents.values()))
        wait_until(lambda: all(load.count(a, "1") >= 20 for a in agents.values()), what="load on v1")
        request = ops.json("carol", "models", "promote", MODEL, "3", "--reason", "better model")
        ops.refused("carol", "approve", str(request["id"]), says="cannot approve their own request")
        assert [a["id"] for a in ops.pending()] == [request["id"]]
        ops.ok("bob", "approve", str(request["id"]))
        ops.wait_serving("3")
        wait_until(lambda: all(load.count(a, "3") >= 20 for a in agents.values()), what="load answered by v3")
        assert [answered_by(agents[a]) for a in ("a1", "a2")] == ["3", "3"]
        assert load.failures == []
        assert ops.stages() == {1: "archived", 2: "candidate", 3: "production"}

        # 4. rollback (no approval needed: v1 was approved before); every agent acknowledges; load goes on
        rolled = ops.json("alice", "rollback", MODEL, "--reason", "customers complain", "--wait", "120")
        assert (rolled["kind"], rolled["version"], rolled["from_version"]) == ("rollback", 1, 3)
        assert sorted((a["agent_id"], a["state"]) for a in rolled["agents"]) == [("a1", "ok"), ("a2", "ok")]
        shown = ops.json("viewer", "rollout", "show", str(rolled["id"]))
        assert sorted(a["state"] for a in shown["agents"]) == ["ok", "ok"]
        ops.wait_serving("1")
        counts = {a: load.count(a, "1") for a in agents.values()}
        wait_until(lambda: all(load.count(a, "1") >= counts[a] + 20 for a in agents.values()), what="load on v1 again")
        assert [answered_by(agents[a]) for a in ("a1", "a2")] == ["1", "1"]
        load.stop()
        assert load.failures == [], load.failures[:3]
        assert ops.stages() == {1: "production", 2: "candidate", 3: "archived"}

        # 5. v3 is retired: from then on it can be neither promoted nor rolled back to
        ops.ok("alice", "models", "retire", MODEL, "3", "--reason", "superseded, and it misbehaved")
        before = ops.state()
        assert before[0][3] == "retired"
        ops.refused("alice", "models", "promote", MODEL, "3", "--reason", "again", says="retired")
        ops.refused("alice", "rollback", MODEL, "--to", "3", "--reason", "again", says="retired")
        assert ops.state() == before and ops.serving() == {"a1": "1", "a2": "1"}

        # 6. the audit trail verifies, and names the row someone edited in the file while the collector was down
        assert "audit trail intact" in ops.ok("viewer", "audit", "verify")
        approval = next(e for e in ops.changes() if e["actor"] == "bob")
        collector.send_signal(signal.SIGTERM)
        assert collector.wait(60) == 0
        tamper(tmp_path / "c.db", f"UPDATE audit SET actor = 'mallory' WHERE id = {approval['id']}")
        collector, restarted = collector_process(tmp_path, listen=address)  # the agents reconnect by themselves
        procs[0] = collector
        assert restarted == address
        broken = ops.run("viewer", "audit", "verify")
        assert broken.returncode == 1 and f"broken at row {approval['id']}" in broken.stderr, broken.stderr
        # the viewer's five refused changes: recorded by the minute, flushed at the latest on SIGTERM
        refused = ops.refusals("viewer")
        assert len(refused) == 5 and all(e["object"] for e in refused), refused
        ops.wait_serving("1")
    finally:
        if load is not None:
            load.stop()
        codes = stop(procs)
    assert codes == [0] * len(procs), codes  # 7. every process exits 0 on SIGTERM
