"""Three collectors on one PostgreSQL, as an operator runs them (issue 14): real ``outrider collector serve``
processes (``--db postgresql://... --collector-id cN``), two managed ``outrider agent serve`` processes
streaming to different collectors, tritonclient load against both, and the CLI for every operator step.

v1 is requested by alice and approved by bob through c3, which holds no agent's stream: both agents,
on c1 and c2, get it and ack, as ListRollouts through c1 shows. The load shifts X[3]; c1 is killed
with SIGKILL; its agent moves to another collector with its spool. Exactly one drift alert opens for
X[3], whichever collector holds the evaluation lease. v2 is promoted through c2 and both agents ack
it (seen through c3); its drift alert opens once too, evaluated by a survivor (c1, started first, holds
the lease of the background loops until it dies, as a rule). At the end every row served is stored or
counted as dropped (Status through either survivor), each agent run's windows are one gapless sequence
stored once, and the audit trail verifies.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from agent.demo import train  # a scikit-learn model as ONNX, with its reference and holdout files
from collector.store.engine import open_engine
from faults_support import reap  # noqa: F401  (kills what a failed test left running)
from faults_support import ROOT, Books, start, status, stop, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")]

MODEL = "churn"
TOKENS = {"agents": "three-agents-token-01", "alice": "three-alice-token-001", "bob": "three-bob-token-00001"}
AGENT_IDS = ("edge-1", "edge-3")  # crc32 % 3: 0 and 2, the first address each agent tries (agent/exporter.py)
AUTH = (f'[[agent]]\nname = "agents"\ntoken = "{TOKENS["agents"]}"\nagent_ids = {json.dumps(list(AGENT_IDS))}\n'
        f'\n[[operator]]\nname = "alice"\nrole = "operator"\ntoken = "{TOKENS["alice"]}"\n'
        f'\n[[operator]]\nname = "bob"\nrole = "approver"\ntoken = "{TOKENS["bob"]}"\n')
SHIFT = 2.0  # X[3] of the load, in standard deviations of the reference

# tritonclient's protos clash with ours: the load runs in processes of its own. It stops when its stdin
# closes and prints the rows answered and the requests that failed.
TRITON_LOAD = textwrap.dedent("""
    import json, sys, threading
    import numpy as np
    import tritonclient.grpc as triton
    url, shift, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    client = triton.InferenceServerClient(url)
    rng = np.random.default_rng(seed)
    rows, failures = 0, []
    while not stop.is_set():
        n = int(rng.integers(1, 17))
        x = rng.standard_normal((n, 20)).astype(np.float32)
        x[:, 3] += shift
        tensor = triton.InferInput("X", [n, 20], "FP32")
        tensor.set_data_from_numpy(x)
        try:
            reply = client.infer("churn", [tensor], client_timeout=30)
            assert reply.as_numpy("label").shape == (n,)
        except Exception as exc:  # reported to the test
            failures.append(repr(exc)[:300])
            stop.wait(0.1)
            continue
        rows += n
        stop.wait(0.002)
    print(json.dumps({"rows": rows, "failures": failures}), flush=True)
""")


class TritonLoad:
    def __init__(self, address: str, seed: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", TRITON_LOAD, address, str(SHIFT), str(seed)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def stop(self) -> dict:
        out, _ = self.proc.communicate("", timeout=120)
        assert self.proc.returncode == 0, out
        return json.loads(out)


def cli(who: str, address: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env.update(OUTRIDER_COLLECTOR=address, OUTRIDER_TOKEN=TOKENS[who], PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          encoding="utf-8", timeout=300)


def ok(who: str, address: str, *args: str) -> str:
    result = cli(who, address, *args)
    assert result.returncode == 0, f"[{who}@{address}] outrider {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def as_json(who: str, address: str, *args: str):
    return json.loads(ok(who, address, *args, "--json"))


class Database:
    """What the test reads straight from the shared database: which collector holds each agent's stream
    (Status says whether an agent is connected, not where), and every stored window's key."""

    def __init__(self, url: str) -> None:
        self.engine = open_engine(url)
        self.conn = self.engine.writer()

    def streams(self) -> dict[str, str]:
        """agent id -> the collector id holding its (newest connected) run's stream."""
        rows = self.conn.query("SELECT agent_id, collector_id FROM agents WHERE connected = 1 AND collector_id <> ''")
        return {r["agent_id"]: r["collector_id"] for r in rows}

    def background_lease(self) -> str:
        """The collector holding the lease of the rollup and drift loops ("" if none)."""
        rows = list(self.conn.query("SELECT holder FROM leases WHERE name = 'background'"))
        return rows[0]["holder"] if rows else ""

    def window_keys(self) -> list[tuple[str, str, int]]:
        return [(r["agent_id"], r["run_id"], r["seq"])
                for r in self.conn.query("SELECT agent_id, run_id, seq FROM windows")]

    def close(self) -> None:
        self.conn.close()
        self.engine.close()


def connected(via: str) -> dict[str, bool]:
    """agent id -> connected, as Status through collector ``via`` says (one run per agent here)."""
    reply = status(via, metadata=(("authorization", f"Bearer {TOKENS['alice']}"),))
    return {a.agent_id: a.connected for a in reply.agents}


def ordered(addresses: list[str], agent_id: str, first: int) -> str:
    """``--collector`` for ``agent_id`` so that the address it tries first is ``addresses[first]``."""
    at = zlib.crc32(agent_id.encode()) % len(addresses)
    rotated = [addresses[(first - at + i) % len(addresses)] for i in range(len(addresses))]
    assert rotated[at] == addresses[first]
    return ",".join(rotated)


def promote(via: str, version: int, reason: str) -> int:
    """alice requests, bob approves, both through collector ``via``; the rollout's id."""
    request = as_json("alice", via, "models", "promote", MODEL, str(version), "--reason", reason)
    ok("bob", via, "approve", str(request["id"]))
    rollouts = as_json("alice", via, "rollouts", MODEL)["rollouts"]
    return max(r["id"] for r in rollouts if r["version"] == version)


def acks(via: str, rollout_id: int) -> dict[str, str]:
    shown = as_json("alice", via, "rollout", "show", str(rollout_id))
    return {a["agent_id"]: a["state"] for a in shown["agents"]}


def drift_alerts(via: str, *, resolved: bool = False) -> list[tuple[str, str]]:
    """(version, column) of the model's open drift alerts (and resolved ones too, with ``resolved``)."""
    alerts = as_json("alice", via, "alerts", *(["--all"] if resolved else []))["alerts"]
    return sorted((a["model_version"], a["column"]) for a in alerts
                  if a["kind"] == "drift" and a["model_name"] == MODEL and (resolved or a["state"] == "open"))


def test_three_collectors_one_database_failover_promotion_drift_and_audit(postgres_url: str, tmp_path: Path):
    (tmp_path / "tokens.toml").write_text(AUTH)
    v1, ref1, holdout = train(tmp_path, "v1", 0.0, seed=1)
    v2, ref2, _ = train(tmp_path, "v2", 0.0, seed=2)
    db = Database(postgres_url)
    collectors: dict[str, tuple[subprocess.Popen, str]] = {}
    for cid in ("c1", "c2", "c3"):
        # short loop intervals: the background lease lives 3 intervals, so a killed holder's passes on quickly
        collectors[cid] = start(
            ["collector", "serve", "--db", postgres_url, "--collector-id", cid, "--listen", "127.0.0.1:0",
             "--auth-file", str(tmp_path / "tokens.toml"), "--drift-interval", "1", "--rollup-interval", "1",
             "--rollback-watch-seconds", "0", "--retrain-after-evaluations", "0", "--gate-latency-budget-ms", "5000"],
            r"collector listening on (\S+)", log=tmp_path / f"{cid}.log")
    address = {cid: addr for cid, (_, addr) in collectors.items()}
    addresses = [address["c1"], address["c2"], address["c3"]]
    loads: list[TritonLoad] = []
    try:
        registered = as_json("alice", address["c3"], "models", "register", MODEL, "--file", str(v1),
                             "--reference", str(ref1), "--holdout", str(holdout))
        assert (registered["version"], registered["gate_passed"]) == (1, True), registered
        registered = as_json("alice", address["c3"], "models", "register", MODEL, "--file", str(v2),
                             "--reference", str(ref2), "--holdout", str(holdout))
        assert (registered["version"], registered["gate_passed"]) == (2, True), registered["gate"]
        ok("alice", address["c2"], "drift-config", MODEL, "--set", '{"span_seconds": 2, "consecutive": 2}')

        # 1. two managed agents, each on its own collector (c1 and c2), waiting for a version
        agents: dict[str, tuple[subprocess.Popen, str]] = {}
        for agent_id, home in zip(AGENT_IDS, (0, 1)):
            agents[agent_id] = start(
                ["agent", "serve", "--model-name", MODEL, "--collector", ordered(addresses, agent_id, home),
                 "--token", TOKENS["agents"], "--listen", "127.0.0.1:0", "--agent-id", agent_id,
                 "--spool-dir", str(tmp_path / agent_id), "--window-seconds", "0.5", "--summarizer", "thread"],
                rf"serving {MODEL} \(managed by .*\) on (\S+)", log=tmp_path / f"{agent_id}.log")
        wait_until(lambda: db.streams() == {"edge-1": "c1", "edge-3": "c2"},
                   what="each agent streaming to its collector")
        wait_until(lambda: db.background_lease() != "", what="a collector taking the background lease")
        holder = db.background_lease()  # c1, started first, as a rule: then its lease passes on too

        # 2. v1 requested and approved through c3: pushed to the agents on c1 and c2, acks seen through c1
        first = promote(address["c3"], 1, "first release")
        wait_until(lambda: acks(address["c1"], first) == {a: "ok" for a in AGENT_IDS}, what="both agents acking v1")

        # 3. load with X[3] shifted; c1 (edge-1's collector) is killed once windows flow from both agents
        loads = [TritonLoad(agents[a][1], seed) for seed, a in enumerate(AGENT_IDS)]
        wait_until(lambda: {k[0] for k in db.window_keys()} >= set(AGENT_IDS), what="windows from both agents")
        killed, _ = collectors["c1"]
        killed.kill()  # SIGKILL
        killed.wait()
        wait_until(lambda: db.streams().get("edge-1") in ("c2", "c3"), what="edge-1 moving to a live collector")
        moved_to = db.streams()["edge-1"]
        for via in ("c2", "c3"):  # Status through either survivor answers for the whole fleet
            wait_until(lambda via=via: connected(address[via]) == {a: True for a in AGENT_IDS},
                       what=f"both agents connected in {via}'s Status")
        stored = len(db.window_keys())
        wait_until(lambda: len([k for k in db.window_keys() if k[0] == "edge-1"]) > 0 and len(db.window_keys())
                   >= stored + 10, what=f"windows stored through {moved_to} after the kill")

        # 4. the drift: one alert for X[3], however many collectors run (the lease decides who evaluates)
        wait_until(lambda: ("1", "X[3]") in drift_alerts(address["c2"]), timeout=180, what="the drift alert")
        for via in ("c2", "c3"):
            alerts = drift_alerts(address[via])
            assert alerts.count(("1", "X[3]")) == 1, alerts
            assert not [c for _, c in alerts if c.startswith("X[") and c != "X[3]"], alerts
        assert db.background_lease() in ("c2", "c3") or holder != "c1"

        # 5. v2 promoted through c2, acked by both agents (edge-1 now on c2 or c3), seen through c3
        second = promote(address["c2"], 2, "second release")
        wait_until(lambda: acks(address["c3"], second) == {a: "ok" for a in AGENT_IDS}, what="both agents acking v2")
        # evaluations go on without c1: v2's traffic is shifted too, and its alert opens once
        wait_until(lambda: ("2", "X[3]") in drift_alerts(address["c3"]), timeout=180, what="v2's drift alert")
        assert drift_alerts(address["c2"]).count(("2", "X[3]")) == 1

        # 6. the books: every row served is stored once or counted as dropped
        served = 0
        for load in loads:
            result = load.stop()
            assert result["failures"] == [], result["failures"][:3]
            served += result["rows"]
        loads = []
        for proc, _ in agents.values():
            stop(proc)  # flushes its last window and delivers it
        books, through_c2 = (Books.of(address[via], model=MODEL, versions=("1", "2"),
                                      metadata=(("authorization", f"Bearer {TOKENS['alice']}"),))
                             for via in ("c3", "c2"))
        assert books.accounted == served, f"served {served} rows, but {books}"
        assert through_c2 == books  # the same totals through any collector
        assert books.spool_dropped_windows == 0, books
        keys = db.window_keys()
        assert len(keys) == len(set(keys)), "a window stored twice"
        for agent_id in AGENT_IDS:
            runs = {run for a, run, _ in keys if a == agent_id}
            assert len(runs) == 1, runs
            seqs = sorted(seq for a, _, seq in keys if a == agent_id)
            assert seqs == list(range(len(seqs))), f"{agent_id}: a window missing in its sequence"
        # v1's alert resolves once v2 replaces it; it was still opened once, not once per collector
        assert drift_alerts(address["c3"], resolved=True).count(("1", "X[3]")) == 1

        # 7. the audit trail, written by three collectors, verifies through either survivor
        for via in ("c2", "c3"):
            assert "audit trail intact" in ok("alice", address[via], "audit", "verify", "--collector", address[via])
    finally:
        for load in loads:
            load.proc.kill()
            load.proc.wait()
        db.close()
    for cid in ("c2", "c3"):
        stop(collectors[cid][0])
