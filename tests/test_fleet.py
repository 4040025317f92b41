"""Several collectors on one database (collector.api.fleet): leases of the background loops, the
fleet's "connected" from heartbeats, and pushes made through one collector reaching agents streaming
to another. Real PostgreSQL (the postgres_url fixture), real collectors in-process, one as a real
subprocess killed with SIGKILL; the lease and stream SQL on both engines."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from collector.api.metrics import CollectorMetrics
from collector.api.server import serve_collector
from collector.base.auth import AuthConfig
from collector.store import collectors as members
from collector.store import leases
from collector.store.engine import open_engine
from collector.store.migrations import migrate
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from test_approvals import HANG_GUARD, TOKENS, call, cli, reference_profile
from test_rollout_collector import AUTH, FakeAgent, acks, make_production, register, wait_for
from test_web import fetch

REPO = Path(__file__).resolve().parents[1]
S = 1_000_000_000


@pytest.fixture
def migrated(db_url: str):
    engine = open_engine(db_url)
    conn = engine.writer()
    migrate(conn)
    yield conn
    conn.close()
    engine.close()


def _acquire(conn, holder: str, now: int, ttl: int = 10 * S) -> bool:
    with conn.transaction():
        return leases.acquire(conn, "background", holder, now, ttl)


def test_a_lease_has_one_holder_until_it_expires_or_is_released(migrated):
    conn = migrated
    assert _acquire(conn, "a", 100 * S)
    assert not _acquire(conn, "b", 105 * S)  # a holds it until 110 s
    assert _acquire(conn, "a", 105 * S)  # renewed: now until 115 s
    assert not _acquire(conn, "b", 114 * S)
    assert _acquire(conn, "b", 116 * S)  # a stopped renewing: expired, b takes it
    assert not _acquire(conn, "a", 117 * S)
    with conn.transaction():
        assert not leases.release(conn, "background", "a")  # not a's to give up
        assert leases.release(conn, "background", "b")
    assert _acquire(conn, "a", 118 * S)  # released: taken at once
    assert [(h["name"], h["holder"], h["live"]) for h in leases.holders(conn, 118 * S)] == [("background", "a", True)]


def test_a_run_is_connected_while_its_collector_heartbeats(migrated):
    conn = migrated
    with conn.transaction():
        for cid in ("a", "b"):
            members.heartbeat(conn, cid, f"{cid}:1", 0, 100 * S)
        for agent, cid in (("x", "a"), ("y", "b")):
            conn.insert("agents", {"agent_id": agent, "run_id": "r", "connected": 1})
            members.stream_opened(conn, agent, "r", cid)
    assert members.connected_runs(conn, 90 * S) == {("x", "r"), ("y", "r")}
    assert members.connected_runs(conn, 90 * S, besides="a") == {("y", "r")}
    with conn.transaction():
        members.heartbeat(conn, "a", "a:1", 0, 120 * S)
    assert members.connected_runs(conn, 110 * S) == {("x", "r")}  # b's heartbeat is too old
    with conn.transaction():  # y failed over to a before b noticed its stream had ended
        members.stream_opened(conn, "y", "r", "a")
        assert members.stream_closed(conn, "y", "r", "b", 121 * S) == 0  # b's late close changes nothing
    assert members.connected_runs(conn, 110 * S) == {("x", "r"), ("y", "r")}
    with conn.transaction():
        assert members.stream_closed(conn, "y", "r", "a", 122 * S) == 1
    assert members.connected_runs(conn, 110 * S) == {("x", "r")}


def test_a_collector_that_stops_is_listed_as_stopped_and_one_long_gone_is_forgotten(migrated):
    conn = migrated
    with conn.transaction():
        members.heartbeat(conn, "live", "l:1", 10 * S, 200 * S)
        members.heartbeat(conn, "silent", "s:1", 10 * S, 50 * S)  # killed: its heartbeat stopped at 50 s
        members.heartbeat(conn, "stopped", "t:1", 10 * S, 140 * S)
        members.leave(conn, "stopped", 150 * S)
    rows = {r["id"]: (r["live"], r["stopped"], r["heartbeat_ns"]) for r in members.collector_rows(conn, 190 * S)}
    assert rows == {"live": (True, False, 200 * S), "silent": (False, False, 50 * S),
                    "stopped": (False, True, 150 * S)}
    assert [r["id"] for r in members.collector_rows(conn, 190 * S)] == ["live", "stopped", "silent"]
    with conn.transaction():
        assert members.prune(conn, 100 * S) == 1  # silent since 50 s
    assert {r["id"] for r in members.collector_rows(conn, 0)} == {"live", "stopped"}
    with conn.transaction():
        assert members.prune(conn, 160 * S) == 1  # stopped at 150 s
    assert [r["id"] for r in members.collector_rows(conn, 0)] == ["live"]


# ------------------------------------------------------------------ collectors on one PostgreSQL


@contextlib.contextmanager
def collectors(url: str, *ids: str, **kw) -> Iterator[list]:
    """Collectors ``ids`` on database ``url``, each as (server, ops stub, address)."""
    running = []
    options = dict(auth=AuthConfig.from_toml(AUTH), drift_interval=0, rollup_interval=3600, heartbeat_interval=0.5,
                   resync_interval=1.0)
    try:
        for cid in ids:
            server = serve_collector(url, "127.0.0.1:0", collector_id=cid, **{**options, **kw})
            address = f"127.0.0.1:{server.port}"
            running.append((server, pb_grpc.OpsServiceStub(grpc.insecure_channel(address)), address))
        yield running
    finally:
        for server, _, _ in running:
            server.stop(grace=0)


def connected(ops, agent_id: str) -> bool | None:
    """The agent's connected state in ``ops``'s Status (None: not listed)."""
    agents = call(ops, "dave", "Status", pb.StatusRequest()).agents
    return next((a.connected for a in agents if a.agent_id == agent_id), None)


def count_passes(server) -> dict[str, int]:
    """Counts the passes of ``server``'s rollup and evaluation loops (wrapping the calls they make)."""
    passes = {"rollup": 0, "evaluation": 0}

    def counted(name, fn):
        def run(*args, **kw):
            passes[name] += 1
            return fn(*args, **kw)
        return run

    server.store.rollup = counted("rollup", server.store.rollup)
    evaluator = server.evaluation.evaluator
    evaluator.evaluate_all = counted("evaluation", evaluator.evaluate_all)
    return passes


def test_only_one_collector_runs_the_loops_and_another_takes_over_when_it_stops(postgres_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the registry's artifacts live beside the "database path"
    with collectors(postgres_url, "first", "second", rollup_interval=0.1, drift_interval=0.1) as [(a, _, _), (b, _, _)]:
        passes = {id(server): count_passes(server) for server in (a, b)}
        held = {"first": a.agents.fleet.leases, "second": b.agents.fleet.leases}
        holder = wait_for(lambda: next((cid for cid, ls in held.items() if ls[leases.BACKGROUND].held), None))
        first, second = (a, b) if holder == "first" else (b, a)
        wait_for(lambda: passes[id(first)]["rollup"] >= 5 and passes[id(first)]["evaluation"] >= 5)
        assert passes[id(second)] == {"rollup": 0, "evaluation": 0}  # several renewals, no pass there
        assert first.agents.fleet.leases[leases.BACKGROUND].held
        assert not second.agents.fleet.leases[leases.BACKGROUND].held
        metrics = CollectorMetrics()
        metrics.watch(first.store, first.agents, first.auth)
        assert 'outrider_collector_lease_held{lease="background"} 1.0' in generate_latest(metrics.registry).decode()
        first.stop(grace=0)  # a clean stop releases its leases
        wait_for(lambda: second.agents.fleet.leases[leases.BACKGROUND].held)


def answer_ok(agent: FakeAgent, command: pb.Command) -> None:
    """The agent carried ``command`` out (the artifact's download is the registry's test, not this one's)."""
    agent.serving = command.args.get("version", agent.serving)
    agent._out.put(pb.AgentMessage(model_state=pb.ModelState(command_id=command.id, model_version=agent.serving,
                                                             ok=True)))


def test_a_promotion_through_one_collector_reaches_agents_on_the_others_and_their_acks_show_everywhere(
        postgres_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with collectors(postgres_url, "a", "b", "c") as [(_, ops_a, addr_a), (_, ops_b, addr_b), (_, ops_c, addr_c)]:
        here, there, third = FakeAgent(addr_a, "edge-a"), FakeAgent(addr_b, "edge-b"), FakeAgent(addr_c, "edge-c")
        try:
            for agent in (here, there, third):
                agent.quiet()
            register(ops_a, 1)
            make_production(ops_a, 1)  # requested and approved through collector a
            [made] = call(ops_b, "dave", "ListRollouts", pb.ListRolloutsRequest(model_name="churn")).rollouts
            for agent in (here, there, third):
                command = agent.command()
                assert (command.id, command.kind, command.args["version"]) == (f"rollout-{made.id}", "serve", "1")
                answer_ok(agent, command)
            # each ack is written by the collector holding that agent's stream, and read through any
            for ops in (ops_a, ops_b, ops_c):
                wait_for(lambda ops=ops: acks(ops, made.id) == {a: ("ok", "") for a in ("edge-a", "edge-b", "edge-c")})
            there.quiet()  # the agent on b got the promotion once, not again from the listener of a
            assert there.inbox.empty()
        finally:
            for agent in (here, there, third):
                agent.close()


def test_the_resync_pushes_a_rollout_no_announcement_brought(postgres_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with collectors(postgres_url, "a", "b") as [(_, ops_a, _), (b, _, addr_b)]:
        b.agents.fleet._listener.stop()  # b hears nothing from now on (a listener that is reconnecting)
        agent = FakeAgent(addr_b, "edge-b")
        try:
            agent.quiet()
            register(ops_a, 1)
            make_production(ops_a, 1)
            command = agent.command()  # brought by b's resync (every second here)
            assert command.kind == "serve" and command.args["version"] == "1"
        finally:
            agent.close()


def test_a_profile_attached_through_one_collector_reaches_agents_on_the_others(postgres_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with collectors(postgres_url, "a", "b") as [(_, ops_a, _), (_, _, addr_b)]:
        agent = FakeAgent(addr_b, "edge-b", managed=False, serving="1")
        try:
            wait_for(lambda: connected(ops_a, "edge-b"))  # (no window: the profile's columns are another test's)
            call(ops_a, "alice", "AttachProfile", pb.AttachProfileRequest(model_name="churn", model_version="1",
                                                                          profile=reference_profile()))
            command = agent.references.get(timeout=HANG_GUARD)
            assert command.kind == "reference" and command.args["version"] == "1"
        finally:
            agent.close()


def test_status_through_any_collector_lists_every_agent_with_its_connected_state(postgres_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with collectors(postgres_url, "a", "b", rollup_interval=0.2,
                    http="127.0.0.1:0") as [(server_a, ops_a, addr_a), (_, ops_b, addr_b)]:
        here, there = FakeAgent(addr_a, "edge-a"), FakeAgent(addr_b, "edge-b")
        try:
            here.quiet()
            there.quiet()
            for ops in (ops_a, ops_b):
                wait_for(lambda ops=ops: connected(ops, "edge-a") and connected(ops, "edge-b"))
            wait_for(lambda: call(ops_a, "dave", "Status", pb.StatusRequest()).leases)  # the first rollup pass
            for ops, me in ((ops_a, "a"), (ops_b, "b")):  # each answers for the fleet, and says who it is
                status = call(ops, "dave", "Status", pb.StatusRequest())
                assert status.collector_id == me
                assert {a.agent_id: a.collector_id for a in status.agents} == {"edge-a": "a", "edge-b": "b"}
                assert sorted((c.collector_id, c.address, c.live) for c in status.collectors) == [
                    ("a", addr_a, True), ("b", addr_b, True)]
                assert [(lease.name, lease.live) for lease in status.leases] == [(leases.BACKGROUND, True)]
                assert status.leases[0].holder in ("a", "b")
            shown = cli("status", "--collector", addr_b, "--token", TOKENS["dave"])
            assert shown.returncode == 0, shown.stderr
            table = {line.split()[0]: line.split() for line in shown.stdout.splitlines() if line.split()}
            assert table["COLLECTOR"][:3] == ["COLLECTOR", "ADDRESS", "STATE"]
            assert table["b"][1:5] == ["(this", "one)", addr_b, "live"] and table["a"][1:3] == [addr_a, "live"]
            assert table["edge-a"][-1] == "a" and table["edge-b"][-1] == "b"  # the COLLECTOR column
            assert leases.BACKGROUND in table[status.leases[0].holder]
            code, _, page = fetch(server_a.web.url, "/", token=TOKENS["dave"])
            assert code == 200 and "<h2>Collectors</h2>" in page
            assert f"<td>{addr_b}</td>" in page and page.count(">live</span>") == 2
            there.close()
            for ops in (ops_a, ops_b):
                wait_for(lambda ops=ops: connected(ops, "edge-b") is False)
            assert connected(ops_a, "edge-a") and connected(ops_b, "edge-a")
            status = call(ops_a, "dave", "Status", pb.StatusRequest())
            assert {a.agent_id: a.collector_id for a in status.agents} == {"edge-a": "a", "edge-b": ""}
        finally:
            here.close()


SUBPROCESS_COLLECTOR = textwrap.dedent("""
    import sys, threading
    from collector.api.server import serve_collector
    from collector.base.auth import AuthConfig
    server = serve_collector(sys.argv[1], "127.0.0.1:0", auth=AuthConfig.from_toml(sys.argv[2]), collector_id="doomed",
                             drift_interval=0.2, rollup_interval=0.2, heartbeat_interval=0.5, resync_interval=1.0)
    print(server.port, flush=True)
    threading.Event().wait()
""")


@pytest.mark.slow
def test_a_killed_collectors_agents_stop_counting_as_connected_and_its_leases_pass_on(postgres_url, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SUBPROCESS_COLLECTOR, postgres_url, AUTH], cwd=tmp_path,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        port = int(proc.stdout.readline())
        agent = FakeAgent(f"127.0.0.1:{port}", "edge-doomed")
        agent.quiet()
        with collectors(postgres_url, "survivor", drift_interval=0.2, rollup_interval=0.2) as [(a, ops, _)]:
            assert connected(ops, "edge-doomed")  # streaming to another collector whose heartbeat is fresh
            wait_for(lambda: a.store.read().execute("SELECT count(*) FROM leases WHERE holder = 'doomed'"
                                                    ).fetchone()[0] == 1)
            assert not a.agents.fleet.leases[leases.BACKGROUND].held
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=HANG_GUARD)
            # its row still says connected; its heartbeat stops, and after the timeout (1.5 s) it is not
            wait_for(lambda: connected(ops, "edge-doomed") is False)
            wait_for(lambda: a.agents.fleet.leases[leases.BACKGROUND].held)
            status = call(ops, "dave", "Status", pb.StatusRequest())
            assert [(c.collector_id, c.live, c.stopped) for c in status.collectors] == [
                ("survivor", True, False), ("doomed", False, False)]  # silent: killed, not stopped
            assert [(lease.holder, lease.live) for lease in status.leases] == [("survivor", True)]
        agent.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=HANG_GUARD)


def test_on_sqlite_the_one_collector_holds_every_lease_even_one_its_crashed_predecessor_left(tmp_path):
    db = tmp_path / "collector.db"
    engine = open_engine(db)
    conn = engine.writer()
    migrate(conn)
    with conn.transaction():  # a collector killed while holding its leases, for an hour more
        leases.acquire(conn, leases.BACKGROUND, "crashed", time.time_ns(), 3600 * S)
    conn.close()
    engine.close()
    server = serve_collector(db, "127.0.0.1:0", rollup_interval=0.1, drift_interval=0.1)
    try:
        wait_for(lambda: server.agents.fleet.leases[leases.BACKGROUND].held)
    finally:
        server.stop(grace=0)
