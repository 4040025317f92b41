"""Effectively-once delivery: what an agent stream may carry, and kill -9 of either side with real processes.

In process, over a real collector on loopback:
- windows of the Hello's agent are stored whatever their run (an agent restarted
  while the collector was down sends its earlier runs' windows on its new
  stream), in any order, once; for the Hello's model or its spooled models only;
- a window damaged after it was sealed is refused with its reason, never stored;
- an agent token speaks only for its entry's agent ids and models.

With real processes (slow):
- the collector is SIGKILLed in the middle of a load and restarted: rows
  stored + rows counted as dropped == rows served, exactly, and no request failed;
- an agent is SIGKILLed and restarted with the same spool: every window it had
  spooled before the kill is stored exactly once (only its open window, never
  spooled, is lost); the collector shows the restart.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest

from agent import checksum
from agent.spool import decode
from collector.base.auth import AuthConfig
# reap: kills what a failed test left running; ROOT, exit_code and start: other tests import them from here
import faults_support
from faults_support import ROOT, exit_code, reap, start  # noqa: F401
from faults_support import (Books, Load, agent, assert_balanced, collector, spool_files, status, stop, stored_rows,
                            wait_until, windows)
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from test_collector_server import AgentConn, batch, hello, running, window

STORED, DUPLICATE, REJECTED = pb.WindowAck.STORED, pb.WindowAck.DUPLICATE, pb.WindowAck.REJECTED


def results(acks: list[pb.WindowAck]) -> list[tuple[str, int, int]]:
    return [(a.run_id, a.seq, a.result) for a in acks]


# ------------------------------------------------------------------ what a stream may carry


def test_windows_of_the_agents_earlier_runs_are_stored_once_in_any_order(tmp_path):
    with running(tmp_path / "c.db") as c:
        conn = c.connect(hello(run="run-3", spooled_models=["old"]),
                         batch(window(0, run="run-1", model="old"), window(0, run="run-3"),
                               window(0, run="run-2"), window(1, run="run-1", model="old")))
        assert results(conn.acks(4)) == [("run-1", 0, STORED), ("run-3", 0, STORED), ("run-2", 0, STORED),
                                         ("run-1", 1, STORED)]
        conn.send(batch(window(0, run="run-1", model="old"), window(1, run="run-3")))  # a resend, then new
        assert results(conn.acks(2)) == [("run-1", 0, DUPLICATE), ("run-3", 1, STORED)]
        conn.send(batch(window(2, run="run-1", model="fraud"), window(2, agent="edge-2", run="run-1")))
        refused = conn.acks(2)
        assert [a.result for a in refused] == [REJECTED, REJECTED]
        assert "window of model 'fraud' sent on a stream whose hello names 'credit' and spooled models ['old']" \
            in refused[0].reason
        assert "window of agent 'edge-2' sent on the stream of agent 'edge-1'" in refused[1].reason
        conn.close()

        state = c.status()
        # runs whose Hello never reached the collector get their row from their windows
        assert sorted((a.run_id, a.windows) for a in state.agents) == [("run-1", 2), ("run-2", 1), ("run-3", 2)]
        assert sorted((m.model_name, m.windows) for m in state.models) == [("credit", 3), ("old", 2)]
        assert (state.counters.windows_stored, state.counters.windows_duplicate,
                state.counters.windows_rejected) == (5, 1, 2)


def test_a_window_damaged_after_it_was_sealed_is_rejected_and_never_stored(tmp_path):
    with running(tmp_path / "c.db") as c:
        damaged = checksum.seal(window(1))
        damaged.rows += 1  # what a flipped bit does: every other check still passes
        conn = c.connect(hello(), batch(checksum.seal(window(0)), damaged, window(2)))  # 2: never sealed
        acks = {a.seq: a for a in conn.acks(3)}
        assert {seq: a.result for seq, a in acks.items()} == {0: STORED, 1: REJECTED, 2: STORED}
        assert "checksum mismatch" in acks[1].reason
        conn.close()
        assert sorted(w.seq for w in c.windows(model_name="credit")) == [0, 2]
        assert c.status().counters.windows_rejected == 1


AGENT_TOKEN, FLEET_TOKEN, ADMIN_TOKEN = "web-1-token-0123456789", "fleet-token-0123456789", "admin-token-0123456789"
AUTH = f"""
[[agent]]
name = "web-1"
token = "{AGENT_TOKEN}"
models = ["credit"]
[[agent]]
name = "fleet"
token = "{FLEET_TOKEN}"
agent_ids = ["web-*"]
[[operator]]
name = "ada"
token = "{ADMIN_TOKEN}"
role = "admin"
"""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_agent_tokens_speak_only_for_their_agent_ids_and_models(tmp_path):
    with running(tmp_path / "c.db", auth=AuthConfig.from_toml(AUTH)) as c:
        def refusal(token: str, first: pb.AgentMessage) -> str:
            conn = AgentConn(c.agents, bearer(token))
            conn.send(first, None)
            error = conn.error()
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            return error.details()

        assert refusal(AGENT_TOKEN, hello(agent="web-2")) == (
            "agent token 'web-1' may speak for agent ids ['web-1'], not 'web-2'; "
            "add it to agent_ids in the collector's auth file")
        model = hello(agent="web-1")
        model.hello.model_name = "fraud"
        assert refusal(AGENT_TOKEN, model) == (
            "agent token 'web-1' may send for models ['credit'], not 'fraud'; "
            "add it to models in the collector's auth file")
        assert "not 'fraud' (its spool holds windows of it)" in refusal(
            AGENT_TOKEN, hello(agent="web-1", spooled_models=["fraud"]))
        assert "not 'edge-1'" in refusal(FLEET_TOKEN, hello(agent="edge-1"))

        ok = AgentConn(c.agents, bearer(FLEET_TOKEN))  # agent_ids = ["web-*"], any model
        ok.send(hello(agent="web-7", run="r"), batch(window(0, agent="web-7", run="r")))
        assert [a.result for a in ok.acks(1)] == [STORED]
        ok.close()

        fetch = pb_grpc.AgentServiceStub(c.channel).FetchArtifact
        with pytest.raises(grpc.RpcError) as denied:
            list(fetch(pb.FetchArtifactRequest(model_name="fraud", version=1), metadata=bearer(AGENT_TOKEN),
                       timeout=60))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may fetch models ['credit'], not 'fraud'" in denied.value.details()
        with pytest.raises(grpc.RpcError) as missing:  # permitted: it only does not exist
            list(fetch(pb.FetchArtifactRequest(model_name="credit", version=1), metadata=bearer(AGENT_TOKEN),
                       timeout=60))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        admin = bearer(ADMIN_TOKEN)
        state = c.ops.Status(pb.StatusRequest(), metadata=admin, timeout=60)
        assert [a.agent_id for a in state.agents] == ["web-7"]  # nothing of the refused Hellos was recorded
        assert state.counters.auth_failures == 5

        def audited() -> list[pb.AuditEntry]:
            entries = c.ops.ListAudit(pb.ListAuditRequest(), metadata=admin, timeout=60).entries
            return [e for e in entries if e.action == "auth.failure"]

        c.server.auth.on_refusal.flush(everything=True)  # refusals are aggregated per minute; write them now
        wait_until(lambda: len(audited()) == 5, timeout=30, what="the refusals in the audit trail")
        assert {e.actor for e in audited()} == {"web-1", "fleet"}
        assert any("not 'web-2'" in e.reason for e in audited())


# ------------------------------------------------------------------ real processes, kill -9


@pytest.mark.slow
def test_collector_killed_mid_load_loses_and_duplicates_nothing(tmp_path: Path, lr_model: Path, db_url: str):
    db = db_url  # a SQLite file, then a PostgreSQL database (the collector's connections die with it)
    col, address = collector(db)
    ag, agent_address = agent(lr_model, address, tmp_path / "spool")
    load = Load(agent_address)
    wait_until(lambda: stored_rows(address) > 0, what="first windows stored")
    col.send_signal(signal.SIGKILL)
    col.wait()
    time.sleep(1.0)  # traffic goes on while the collector is down: windows pile up in the spool
    col, address2 = collector(db, listen=address)  # same address: the agent reconnects by itself
    assert address2 == address
    time.sleep(1.0)
    served = load.stop()
    stop(ag)  # flushes the open window into the spool and delivers it: exits once all is acked
    assert_balanced(address, served)
    assert Books.of(address).spool_dropped_windows == 0
    seqs = sorted(w.seq for w in windows(address))
    assert seqs == list(range(len(seqs))), "every window stored once, none missing"
    stop(col)


@pytest.mark.slow
def test_agent_killed_and_restarted_with_its_spool(tmp_path: Path, lr_model: Path, db_url: str):
    db, spool = db_url, tmp_path / "spool"
    col, address = collector(db)
    ag, agent_address = agent(lr_model, address, spool)
    load = Load(agent_address)
    wait_until(lambda: stored_rows(address) > 0, what="first windows stored")
    ag.send_signal(signal.SIGKILL)
    ag.wait()
    served_before_kill = load.stop(agent_killed=True)
    stored_before = {(w.run_id, w.seq): w.rows for w in windows(address)}
    (run1,) = {run for run, _ in stored_before}
    # what the killed agent had spooled but not seen acked (some may be stored already: acked, not yet deleted)
    spooled = {(w.run_id, w.seq): w.rows for w in (decode(p.read_bytes()) for p in spool_files(spool))}

    ag, agent_address = agent(lr_model, address, spool)  # same spool: resends what was not acked
    wait_until(lambda: any(a.run_id != run1 and a.connected for a in status(address).agents),
               what="the restarted agent's stream")
    wait_until(lambda: not spool_files(spool), what="the spool emptied")
    stop(ag)
    run1_windows = {(w.run_id, w.seq): w.rows for w in windows(address) if w.run_id == run1}
    assert run1_windows == {**stored_before, **spooled}, "every spooled window stored exactly once"
    seqs = sorted(seq for _, seq in run1_windows)
    assert seqs == list(range(len(seqs)))  # nothing between them lost
    assert 0 < sum(run1_windows.values()) <= served_before_kill  # only the open window, never spooled, is lost
    runs = [a for a in status(address).agents if a.agent_id == "a1"]
    assert len(runs) == 2 and max(a.restarts for a in runs) == 1
    assert Books.of(address).spool_dropped_windows == 0
    stop(col)


def test_a_process_whose_ready_line_never_comes_fails_the_test_instead_of_hanging_it(tmp_path):
    """``start`` waits a bounded time: a ready line that never matches (a race in a pattern, a changed message)
    is an assertion naming what the process printed, and the process is killed."""
    with pytest.raises(AssertionError, match=r"printed no line matching 'never printed' in 3 s; it printed "
                                             r"\['collector listening on"):
        start(["collector", "serve", "--db", str(tmp_path / "c.db"), "--listen", "127.0.0.1:0"], "never printed",
              ready_guard=3)
    assert faults_support._started[-1].wait(timeout=30) == -signal.SIGKILL
