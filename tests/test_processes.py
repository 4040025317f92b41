"""``outrider agent serve --processes N`` (agent/supervisor.py): real supervisor and child processes on one
loopback port, a real collector, SIGTERM and SIGKILL."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

import faults_support
from faults_support import MODEL, VERSION, Books, children, collector, exit_code, reap, status  # noqa: F401
from protos import open_inference_pb2_grpc as pb_grpc
from test_agent_cli import ROOT, cli, cli_env
from test_server import decode, raw_request, x_rows

HANG_GUARD = 60.0
# gRPC Python shares one connection among channels to the same target; each call must open its own for the
# kernel to spread them over the processes
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def infer(address: str, feeds: dict, version: str = VERSION, model: str = MODEL) -> dict:
    """One ModelInfer on a connection of its own."""
    with grpc.insecure_channel(address, options=OWN_CONNECTION) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(raw_request(model, feeds), timeout=HANG_GUARD)
    assert reply.model_version == version
    return decode(reply)


def metrics(url: str) -> dict[str, dict[tuple, float]]:
    """/metrics as {sample name: {sorted labels: value}}."""
    with urllib.request.urlopen(url, timeout=HANG_GUARD) as reply:
        text = reply.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def requests_by_process(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for labels, value in metrics(url).get("outrider_agent_requests_total", {}).items():
        process = dict(labels)["process"]
        counts[process] = counts.get(process, 0) + value
    return counts


def wait_for(condition, what: str):
    deadline = time.monotonic() + HANG_GUARD
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped counts: it serves nothing)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def agent_id_of(pid: int) -> str | None:
    """The last --agent-id of a process's command line; None for one that has exited (a zombie's command line
    is empty) or is still between fork and exec."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return None
    if b"--agent-id" not in args:
        return None
    return args[len(args) - 1 - args[::-1].index(b"--agent-id") + 1].decode()


def serve_two(model: Path, tmp_path: Path, *more: str) -> tuple[subprocess.Popen, str, str]:
    """``agent serve --processes 2``: the supervisor, the address it serves, its /metrics URL (stderr goes to
    tmp_path/agent.log)."""
    with open(tmp_path / "agent.log", "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "serve", "--model", str(model),
                                 "--model-name", MODEL, "--model-version", VERSION, "--listen", "127.0.0.1:0",
                                 "--processes", "2", "--metrics", "127.0.0.1:0", "--summarizer", "thread",
                                 "--agent-id", "edge", *more],
                                cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=log, text=True)
    faults_support._started.append(proc)  # killed after the test if it fails (the reap fixture)
    first, second = proc.stdout.readline(), proc.stdout.readline()
    assert first.startswith("metrics on "), (first, proc.poll(), (tmp_path / "agent.log").read_text())
    assert second.startswith(f"serving {MODEL} version {VERSION} on 127.0.0.1:"), (second, proc.poll())
    return proc, second.split(" on ")[1].strip(), first.split(" on ")[1].strip()


@pytest.mark.parametrize("value", ["0", "65", "two", "-1", "1.5"])
def test_bad_process_counts_exit_2_in_one_line(lr_model, value):
    result = cli("agent", "serve", "--model", str(lr_model), "--listen", "127.0.0.1:0", "--processes", value)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "--processes" in result.stderr and "from 1 to 64" in result.stderr
    assert result.stdout == ""
    from_env = cli("agent", "serve", "--model", str(lr_model), "--listen", "127.0.0.1:0",
                   env=cli_env(OUTRIDER_AGENT_PROCESSES=value))
    assert from_env.returncode == 2 and from_env.stderr.count("\n") == 1, from_env.stderr


def test_bad_input_with_processes_is_one_line_and_starts_nothing(lr_model, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = cli("agent", "serve", "--model", str(bad), "--listen", "127.0.0.1:0", "--processes", "3",
                 "--log-level", "warning")
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.count("\n") == 1 and "cannot load" in result.stderr, result.stderr  # once, not 3 times
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = cli("agent", "serve", "--model", str(lr_model), "--processes", "2",
                     "--listen", f"127.0.0.1:{busy.getsockname()[1]}")
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.count("\n") == 1 and "Address already in use" in result.stderr, result.stderr


@pytest.mark.slow
def test_two_processes_serve_one_port_report_as_two_agents_and_drain_on_sigterm(lr_model, tmp_path):
    coll, collector_address = collector(tmp_path / "c.db", log=tmp_path / "collector.log")
    proc, address, metrics_url = serve_two(lr_model, tmp_path, "--collector", collector_address,
                                           "--window-seconds", "0.5", "--spool-dir", str(tmp_path / "spool"))
    pids = children(proc.pid)
    assert len(pids) == 2 and sorted(agent_id_of(p) for p in pids) == ["edge/0", "edge/1"]
    session = ort.InferenceSession(str(lr_model))
    served = 0
    for i in range(40):  # one connection each: the kernel spreads them over both processes
        feeds = {"X": x_rows(n=1 + i % 5, seed=i)}
        expected = session.run(None, feeds)
        outputs = infer(address, feeds)
        np.testing.assert_array_equal(outputs["label"], expected[0])
        np.testing.assert_allclose(outputs["probabilities"], expected[1], rtol=1e-6)
        served += len(feeds["X"])
    by_process = requests_by_process(metrics_url)
    assert set(by_process) == {"0", "1"} and all(n > 0 for n in by_process.values()), by_process
    assert sum(by_process.values()) == 40
    page = metrics(metrics_url)
    assert page["outrider_agent_processes"][()] == 2 and page["outrider_agent_process_restarts_total"][()] == 0
    # a second group cannot join this port (nor steal half its connections)
    other = cli("agent", "serve", "--model", str(lr_model), "--processes", "2", "--listen", address)
    assert other.returncode == 2 and "Address already in use" in other.stderr, other.stderr

    proc.send_signal(signal.SIGTERM)
    assert exit_code(proc) == 0
    assert all(gone(p) for p in pids)
    books = Books.of(collector_address)  # the last windows were flushed and delivered before exiting
    assert books.stored == served and books.window_dropped == 0, books
    agents = {a.agent_id: a.rows for a in status(collector_address).agents}
    assert set(agents) == {"edge/0", "edge/1"} and all(rows > 0 for rows in agents.values()), agents
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["0", "1"]
    log = (tmp_path / "agent.log").read_text()
    for index in (0, 1):  # each process runs grpcio's threads server: cheaper than an event loop there
        assert re.search(rf"\[process {index}\] agent\.server: serving m version 1 on \S+ \(threads server", log), log


@pytest.mark.slow
def test_a_killed_process_is_restarted_and_the_port_keeps_serving(lr_model, tmp_path):
    proc, address, metrics_url = serve_two(lr_model, tmp_path)
    first = children(proc.pid)
    victim = next(p for p in first if agent_id_of(p) == "edge/0")
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(lambda: (len(now := children(proc.pid)) == 2 and victim not in now and now),
                        "a new process 0")
    newcomer = next(p for p in replaced if p not in first)
    # between fork and exec the newcomer still shows the supervisor's command line
    wait_for(lambda: agent_id_of(newcomer) == "edge/0", "the new process's own command line")
    wait_for(lambda: metrics(metrics_url)["outrider_agent_processes"][()] == 2, "both processes serving")
    assert metrics(metrics_url)["outrider_agent_process_restarts_total"][()] == 1
    feeds = {"X": x_rows()}
    for _ in range(20):  # every new connection is answered, by either process
        infer(address, feeds)
    assert set(requests_by_process(metrics_url)) == {"0", "1"}
    log = (tmp_path / "agent.log").read_text()
    assert f"process 0 (pid {victim}, agent id edge/0) was killed by SIGKILL; restarting it" in log, log
    assert "[process 1] agent.server: serving m version 1" in log  # whose line each is, in the shared stderr
    proc.send_signal(signal.SIGTERM)
    assert exit_code(proc) == 0


@pytest.mark.slow
def test_a_crash_loop_stops_every_process_with_exit_1(lr_model, tmp_path):
    from agent.supervisor import MAX_RESTARTS

    proc, _, _ = serve_two(lr_model, tmp_path, "--log-level", "warning")
    survivor = next(p for p in children(proc.pid) if agent_id_of(p) == "edge/1")
    for _ in range(MAX_RESTARTS + 1):
        victim = wait_for(lambda: next((p for p in children(proc.pid) if agent_id_of(p) == "edge/0"), None),
                          "process 0")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: gone(victim), "the kill")
        if proc.poll() is None:
            wait_for(lambda: proc.poll() is not None or any(p != victim and agent_id_of(p) == "edge/0"
                                                           for p in children(proc.pid)), "a restart")
    assert exit_code(proc) == 1
    assert gone(survivor)
    last = (tmp_path / "agent.log").read_text().strip().splitlines()[-1]
    assert last.startswith("outrider: error: process 0") and f"after {MAX_RESTARTS} restarts" in last, last


@pytest.mark.slow
def test_processes_stop_when_their_supervisor_is_killed(lr_model, tmp_path):
    proc, _, _ = serve_two(lr_model, tmp_path)
    pids = children(proc.pid)
    proc.kill()
    proc.wait()
    for pid in pids:
        wait_for(lambda: gone(pid), f"process {pid} to stop")
    assert "the supervising process is gone; stopping" in (tmp_path / "agent.log").read_text()


@pytest.mark.slow
def test_managed_processes_each_swap_before_the_rollout_is_acked(tmp_path):
    from test_rollout_collector import AGENT_TOKEN, acks, agent_state, make_production, register, rollouts
    from test_rollout_collector import running_collector

    with running_collector(tmp_path) as (_, ops, collector_address, _):
        register(ops, 1)
        make_production(ops, 1)
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "agent", "serve", "--processes", "2", "--model-name", "churn",
             "--collector", collector_address, "--listen", "127.0.0.1:0", "--agent-id", "edge",
             "--spool-dir", str(tmp_path / "spool"), "--summarizer", "thread"],
            cwd=ROOT, env=cli_env(OUTRIDER_AGENT_TOKEN=AGENT_TOKEN), stdout=subprocess.PIPE,
            stderr=open(tmp_path / "agent.log", "w"), text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith(f"serving churn (managed by {collector_address};"), (line, proc.poll())
            address = line.split(" on ")[-1].strip()
            for agent_id in ("edge/0", "edge/1"):
                wait_for(lambda: agent_state(ops, agent_id).model_version == "1", f"{agent_id} on version 1")

            register(ops, 2)
            make_production(ops, 2)
            rollout = next(r for r in rollouts(ops) if r.kind == "promote" and r.version == 2)
            answered = wait_for(lambda: (a := acks(ops, rollout.id)) and all(s != "pending" for s, _ in a.values())
                                and a, "the rollout's acks")
            assert answered == {"edge/0": ("ok", ""), "edge/1": ("ok", "")}, answered
            # acked: both processes serve version 2, whichever a connection lands on
            assert {agent_state(ops, a).model_version for a in ("edge/0", "edge/1")} == {"2"}
            for _ in range(20):
                infer(address, {"X": x_rows()}, version="2", model="churn")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(HANG_GUARD) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


class Group:
    """What ProcessMetrics reads of a supervisor (agent.supervisor.Supervisor): whom to scrape, and counts."""

    def __init__(self, targets: list[tuple[int, str]]) -> None:
        self.targets, self.restarts = targets, 3

    def scrape_targets(self) -> list[tuple[int, str]]:
        return self.targets

    def serving(self) -> int:
        return len(self.targets)


def test_one_metrics_page_labels_each_process_and_counts_a_process_it_cannot_read():
    from agent.metrics import AgentMetrics, ProcessMetrics

    parts = [AgentMetrics(), AgentMetrics()]
    for calls, part in zip((2, 5), parts):
        for _ in range(calls):
            part.observe(0.001, None)
    endpoints = [part.start_http("127.0.0.1:0") for part in parts]
    with socket.socket() as closed:  # a port nobody listens on: a process stopping under the scrape
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}/metrics"
    merged = ProcessMetrics(Group([(0, endpoints[0].url), (1, endpoints[1].url), (2, dead)]))
    try:
        page = metrics(merged.start_http("127.0.0.1:0").url)
    finally:
        merged.close()
        for part in parts:
            part.close()
    assert page["outrider_agent_requests_total"] == {(("model", ""), ("process", "0"), ("version", "")): 2,
                                                     (("model", ""), ("process", "1"), ("version", "")): 5}
    assert page["outrider_agent_inference_latency_seconds_count"][(("model", ""), ("process", "1"),
                                                                   ("version", ""))] == 5
    assert page["outrider_agent_processes"][()] == 3 and page["outrider_agent_process_restarts_total"][()] == 3
    assert page["outrider_agent_process_scrape_failures_total"][()] == 1


def test_without_load_balanced_so_reuseport_more_than_one_process_is_a_usage_error(monkeypatch):
    from agent import supervisor

    supervisor.check_platform()  # Linux, where the suite runs
    monkeypatch.setattr(sys, "platform", "darwin")  # has SO_REUSEPORT, but the last listener takes every connection
    with pytest.raises(supervisor.UsageError, match=r"needs SO_REUSEPORT with load balancing \(Linux\).*--processes 1"):
        supervisor.check_platform()
