"""Smoke tests of the request-path benchmarks (benchmarks/*.py): they run and measure what they say.

Behaviour only, never speed: tiny runs, no timing asserted.
"""
from __future__ import annotations

import pytest

from agent import examples
from benchmarks import metrics_overhead, shadow, swap
from test_proxy_mlserver import mlserver_venv  # noqa: F401  (MLServer's venv, created when missing)


@pytest.fixture(scope="module")
def model() -> bytes:
    return examples.logistic_regression()


def test_swap_benchmark_swaps_under_load_and_no_request_fails():
    result = swap.run(swaps=2, interval=2.5, steady=2.0, threads=2, summarizer="thread")
    assert result["failed_requests"] == 0 and not result["refused_swaps"], result
    assert result["served_by_version"]["1"] > 0 and result["served_by_version"]["2"] > 0
    assert result["steady"]["requests"] > 0 and result["swap_windows"]["requests"] > 0
    assert result["ratio_p99"] is not None and result["swap_ms_max"] is not None


@pytest.mark.parametrize("mode", ["in_process", "oip"])
def test_shadow_benchmark_measures_each_configuration(model, mode):
    rows = {r["config"]: r for r in getattr(shadow, mode)(model, batch=1, block=50, rounds=1)}
    assert list(rows) == ["no shadow", "share 0.1", "share 1.0, queue 64", "share 1.0, queue never full"]
    assert rows["no shadow"]["ratio_p50"] == 1.0 and rows["no shadow"]["queued_share"] == 0
    never_full = rows["share 1.0, queue never full"]
    assert never_full["queued_share"] == 1.0 and never_full["skipped_share"] == 0
    full = rows["share 1.0, queue 64"]
    assert full["queued_share"] + full["skipped_share"] == pytest.approx(1.0)
    assert 0 <= rows["share 0.1"]["queued_share"] < 1
    assert shadow.shadow_alone(model, batch=1, n=20) > 0


def test_metrics_benchmark_counts_every_measured_call(model):
    result = metrics_overhead.end_to_end(model, calls=40, warmup=10)
    assert result["counted_by_metrics"] == 100  # only the two servers with metrics count
    assert result["without_p50_us"] > 0 and result["with_p50_us"] > 0
    assert metrics_overhead.in_process(calls=200)["calls"] == 200


def test_serving_benchmark_measures_floor_and_agent_and_skips_a_missing_mlserver(tmp_path, monkeypatch):
    from benchmarks import serving

    monkeypatch.setenv("OUTRIDER_MLSERVER_VENV", str(tmp_path / "no-venv"))
    said: list[str] = []
    result = serving.run(["lr"], [1], [1], ["floor", "agent", "mlserver"], seconds=0.5, rounds=1, log=said.append)
    assert "mlserver" in result["skipped"] and "--setup" in result["skipped"]["mlserver"]
    assert said[0] == result["skipped"]["mlserver"]  # one line saying so, before anything runs
    assert [(r["variant"], r["model"], r["batch"], r["clients"]) for r in result["rows"]] == [
        ("floor", "lr", 1, 1), ("agent", "lr", 1, 1)]
    for row in result["rows"]:
        assert row["errors"] == 0 and row["requests"] > 0 and row["cpu_us_per_request"] > 0
        assert row["p50_ms"] <= row["p99_ms"] and row["load_average"] >= 0
        assert row["client_cpu_us_per_request"] > 0  # the Python clients' own CPU, over the cell
    floor, agent = result["rows"]
    assert floor["dropped_rows"] is None and floor["skipped_rows"] is None  # no /metrics to read
    assert agent["dropped_rows"] == agent["skipped_rows"] == 0  # read from the agent's /metrics at a trickle of load
    summary = {s["variant"]: s for s in result["summary"]}
    assert summary["floor"]["ratio_to_floor"] == 1.0
    assert summary["agent"]["ratio_to_floor"] == agent["requests_per_s"] / floor["requests_per_s"]
    assert result["conditions"]["cores"] and result["conditions"]["cpu"]
    assert "vs floor" in serving.table(result)


def test_serving_benchmark_runs_with_the_compiled_client(loadgen_binary):
    from benchmarks import serving

    result = serving.run(["lr"], [1], [2], ["floor", "agent", "floor-processes-2"], seconds=0.5, rounds=1,
                         log=lambda _: None, client="cpp")
    assert {row["variant"] for row in result["rows"]} == {"floor", "agent", "floor-processes-2"}
    assert result["conditions"]["client"] == "cpp"
    for row in result["rows"]:
        assert row["errors"] == 0 and row["requests"] > 0 and row["cpu_us_per_request"] > 0
        assert row["client_cpu_us_per_request"] > 0 and row["p50_ms"] <= row["p99_ms"]
        assert row["switches_per_request"] > 0  # a gRPC Python server's threads hand every call on
    assert "client µs/req" in serving.table(result) and "switches/req" in serving.table(result)


def test_the_floor_with_two_processes_is_one_tree_serving_on_one_port(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import grpc
    import numpy as np

    from protos import open_inference_pb2 as pb
    from protos import open_inference_pb2_grpc as pb_grpc

    model = tmp_path / "lr.onnx"
    model.write_bytes(examples.logistic_regression())
    floor = Path(__file__).resolve().parents[1] / "benchmarks" / "_floor_server.py"
    proc = subprocess.Popen([sys.executable, str(floor), str(model), "lr", "--processes", "2"], stdout=subprocess.PIPE,
                            text=True)
    try:
        address = proc.stdout.readline().split()[-1]  # type: ignore[union-attr]
        (child,) = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        argv = open(f"/proc/{child}/cmdline").read().split("\0")
        assert argv[argv.index("--listen") + 1] == address and "--reuse-port" in argv  # the same port, shared
        x = np.zeros((1, 20), np.float32)
        request = pb.ModelInferRequest(model_name="lr", raw_input_contents=[x.tobytes()])
        request.inputs.add(name="X", datatype="FP32", shape=[1, 20])
        for _ in range(8):  # each on a connection of its own: the kernel may hand any of them to either process
            with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
                assert [o.name for o in reply.outputs] == ["label", "probabilities"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not Path(f"/proc/{child}").exists() or "Z" in open(f"/proc/{child}/stat").read().split()[2]
    finally:
        proc.kill()


@pytest.mark.slow
def test_serving_benchmark_runs_mlserver(mlserver_venv):  # noqa: F811  (created when missing, as on CI)
    from benchmarks import serving

    result = serving.run(["lr"], [1], [1], ["mlserver"], seconds=0.5, rounds=1, log=lambda _: None)
    (row,) = result["rows"]
    assert row["variant"] == "mlserver" and row["errors"] == 0 and row["requests"] > 0
    assert row["cpu_us_per_request_children"] > 0  # its inference-pool worker is counted


@pytest.mark.slow
def test_ingest_serve_rounds_store_every_window_through_real_collectors(tmp_path, postgres_url):
    from benchmarks import ingest

    postgres = ingest.Postgres(postgres_url)  # --db URL: its tables emptied before each round
    for setup, on in (("sqlite", None), ("postgresql", postgres), ("postgresql x2", postgres)):
        r = ingest.serve_round(setup, windows=8, streams=2, batch=2, inflight=2, directory=str(tmp_path),
                               postgres=on)
        assert r["stored"] == r["in_database"] == 8, r  # every window acked after its commit, and there
        assert r["refused"] == r["duplicates"] == r["unacked"] == 0, r
        assert len(r["collector_cpu_us_per_window"]) == (2 if setup.endswith("x2") else 1)
        assert r["server_cpu_us_per_window"] is None  # --db: not our server, its processes not ours to read
        assert r["disk_bytes_per_window"] > r["window_bytes"] // 2, r  # the bodies are on disk
    median = ingest.serve_median([r, r])
    assert median["stored"] == 16 and median["windows_per_s_each_round"] == [r["windows_per_s"]] * 2


@pytest.mark.slow
def test_drift_eval_full_runs_on_postgresql(tmp_path, postgres_url):
    from benchmarks import drift_eval_full, ingest

    r = drift_eval_full.measure(agents=2, minutes=2, repeats=1, cold_repeats=1, directory=str(tmp_path),
                                postgres=ingest.Postgres(postgres_url))
    assert r["engine"] == "postgresql" and r["windows_stored"] == 2 * 12 and r["evaluated"]
    assert r["windows_in_hour"] >= r["windows_stored"] and r["read_ms"][0] > 0
