"""benchmarks/loadgen.py and its compiled client (benchmarks/loadgen/loadgen.cc) against a real ``outrider agent
serve``: what it reports is what the server counted. Built here when missing; without grpc++ these tests skip
(one line on what to install), except on CI (CI=true), where they fail."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import loadgen
from test_agent_cli import ROOT, cli_env, read_line

HANG_GUARD = 60.0


@pytest.fixture(scope="module")
def binary(loadgen_binary: Path) -> Path:
    return loadgen_binary


@pytest.fixture(scope="module")
def agent(lr_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A real ``agent serve`` of the 20-feature logistic regression as "bench": its address and /metrics URL."""
    tmp = tmp_path_factory.mktemp("loadgen")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "serve", "--model", str(lr_model),
                             "--model-name", "bench", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                             "--summarizer", "thread", "--spool-dir", str(tmp / "spool")],
                            cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first, second = read_line(proc), read_line(proc)
        assert first.startswith("metrics on ") and second.startswith("serving bench version "), (first, second)
        yield second.split(" on ")[1].strip(), first.split(" on ")[1].strip()
    finally:
        proc.terminate()
        proc.wait(HANG_GUARD)


def counted(url: str, name: str, **labels: str) -> float:
    """The sum of a counter's samples on /metrics whose labels include ``labels``."""
    with urllib.request.urlopen(url, timeout=HANG_GUARD) as reply:
        text = reply.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def test_loadgen_calls_a_real_agent_and_the_server_counted_every_call(binary, agent):
    address, url = agent
    before = counted(url, "outrider_agent_requests_total")
    with loadgen.Load(address, loadgen.infer_request("bench", batch=1, width=20), connections=2,
                      seconds=1.0) as load:
        load.go()
        result = load.wait()
    assert result.requests > 0 and result.failures == {} and result.first_failure is None
    assert len(result.latencies) == result.requests and np.all(np.diff(result.latencies) >= 0)
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms <= result.max_ms
    assert result.client_cpu_s > 0 and result.cpu_us_per_request > 0 and 0.9 < result.wall_s < 5
    assert result.requests_per_s == pytest.approx(result.requests / result.wall_s, rel=1e-3)
    # the server saw every call loadgen counted, and its 2 warm-up calls
    assert counted(url, "outrider_agent_requests_total") - before >= result.requests + 2


def test_two_processes_merge_their_latencies_and_counts(binary, agent):
    address, url = agent
    before = counted(url, "outrider_agent_requests_total")
    result = loadgen.run(address, loadgen.infer_request("bench", 4, 20).SerializeToString(), processes=2,
                         connections=1, seconds=0.5, warmup=3)
    assert result.requests == len(result.latencies) > 0 and result.failures == {}
    assert counted(url, "outrider_agent_requests_total") - before >= result.requests + 2 * 3


def test_an_unknown_model_stops_loadgen_at_its_warm_up_saying_why(binary, agent):
    address, _ = agent
    with pytest.raises(RuntimeError, match="warm-up call .* failed: NOT_FOUND .*'nope'"):
        loadgen.Load(address, loadgen.infer_request("nope", 1, 20), connections=2, seconds=1.0)


def test_failures_are_counted_by_status_code_and_match_the_server(binary, agent):
    address, url = agent
    before = counted(url, "outrider_agent_request_failures_total", reason="NOT_FOUND")
    result = loadgen.run(address, loadgen.infer_request("nope", 1, 20), connections=2, seconds=0.5, warmup=0)
    assert result.requests == 0 and len(result.latencies) == 0 and result.p99_ms is None
    assert set(result.failures) == {"NOT_FOUND"} and result.failures["NOT_FOUND"] > 0
    assert "'nope'" in result.first_failure
    assert counted(url, "outrider_agent_request_failures_total", reason="NOT_FOUND") - before >= result.failed


def test_the_binary_prints_ready_then_one_json_line_and_dumps_its_latencies(binary, agent, tmp_path):
    address, _ = agent
    (tmp_path / "request").write_bytes(loadgen.infer_request("bench", 1, 20).SerializeToString())
    proc = subprocess.Popen([str(binary), "--target", address, "--request", str(tmp_path / "request"),
                             "--connections", "2", "--seconds", "0.3", "--latencies", str(tmp_path / "latencies")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert read_line(proc) == "ready\n"
    out, _ = proc.communicate("go\n", timeout=HANG_GUARD)
    assert proc.returncode == 0
    (line,) = out.splitlines()
    answer = json.loads(line)
    assert {"requests", "failures", "requests_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "cpu_s",
            "wall_s"} <= set(answer)
    dumped = np.fromfile(tmp_path / "latencies", dtype="<f8")
    assert len(dumped) == answer["requests"] > 0
    assert answer["max_ms"] == pytest.approx(dumped.max() * 1e3, abs=1e-5)


def test_a_bad_command_line_exits_2_saying_why(binary):
    done = subprocess.run([str(binary), "--target", "127.0.0.1:1"], capture_output=True, text=True,
                          timeout=HANG_GUARD)
    assert done.returncode == 2 and "--request" in done.stderr and done.stdout == ""


def test_without_grpc_plus_plus_the_reason_names_the_packages(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither g++ nor pkg-config
    reason = loadgen.missing()
    assert reason is not None and "apt-get install -y libgrpc++-dev protobuf-compiler-grpc pkg-config" in reason


def test_the_processes_benchmark_runs_with_the_compiled_client(binary):
    done = subprocess.run([sys.executable, "benchmarks/processes.py", "--processes", "1", "--clients", "1",
                           "--threads", "2", "--seconds", "1", "--rounds", "1", "--client", "cpp", "--json"],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["rounds"]
    assert row["client"] == "cpp" and row["requests"] > 0 and row["failed"] == 0
    assert row["agent_cpu_us_per_request"] > 0 and row["client_cpu_us_per_request"] > 0


def test_the_proxy_benchmark_runs_with_the_compiled_client(binary):
    from benchmarks import proxy as bench

    (row,) = bench.run([2], [3], seconds=0.5, rounds=1, client="cpp")
    assert row["client"] == "cpp" and row["direct"]["failed"] == 0 and row["proxy"]["failed"] == 0
    assert row["direct"]["rps"] > 0 and row["proxy"]["rps"] > 0 and row["proxy"]["proxy_cpu_ms_per_1k"] > 0
    assert row["direct"]["client_cpu_ms_per_1k"] > 0 and row["proxy"]["client_cpu_ms_per_1k"] > 0
