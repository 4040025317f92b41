"""Prometheus /metrics of agent and collector: real servers on loopback, real requests, windows and
a drift evaluation, then every family scraped over HTTP and parsed by prometheus_client's own parser."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import MonitoredSession, examples
from agent.metrics import LATENCY_BUCKETS, AgentMetrics
from agent.profile import build_profile
from agent.server import serve
from collector.api.metrics import ACK_BUCKETS, CollectorMetrics
from collector.api.server import serve_collector
from collector.base.auth import AuthConfig
from protos import collector_pb2 as cpb
from protos import collector_pb2_grpc as cpb_grpc
from protos import open_inference_pb2 as pb
from protos import open_inference_pb2_grpc as pb_grpc
from test_auth import ADMIN_TOKEN, AGENT_TOKEN, AUTH_TOML, bearer
from test_collector_server import AgentConn, batch, hello, window
from test_delivery import wait_until

ROOT = Path(__file__).resolve().parents[1]
ROWS, GOOD, NOT_FOUND, INVALID = 50, 10, 2, 3  # rows per request; requests of each outcome
DISCRETE, MISSING = 5, 7  # features: small integers in reference and traffic; 20 % missing in traffic only

AGENT_FAMILIES = {
    "outrider_agent_requests": "counter", "outrider_agent_request_failures": "counter",
    "outrider_agent_inference_latency_seconds": "histogram", "outrider_agent_model_info": "gauge",
    "outrider_agent_rows_captured": "counter", "outrider_agent_rows_summarized": "counter",
    "outrider_agent_rows_dropped": "counter", "outrider_agent_rows_skipped": "counter",
    "outrider_agent_window_sink_errors": "counter",
    "outrider_agent_windows_sent": "counter", "outrider_agent_windows_acked": "counter",
    "outrider_agent_windows_rejected": "counter", "outrider_agent_stream_retries": "counter",
    "outrider_agent_spool_write_errors": "counter", "outrider_agent_windows_in_flight": "gauge",
    "outrider_agent_spool_windows": "gauge", "outrider_agent_spool_bytes": "gauge",
    "outrider_agent_spool_dropped_windows": "counter", "outrider_agent_spool_dropped_rows": "counter",
    "outrider_agent_collector_connected": "gauge",
}
COLLECTOR_FAMILIES = {
    "outrider_collector_windows": "counter", "outrider_collector_auth_failures": "counter",
    "outrider_collector_write_queue_depth": "gauge", "outrider_collector_agents_connected": "gauge",
    "outrider_collector_agent_info": "gauge", "outrider_collector_rows": "counter",
    "outrider_collector_dropped_rows": "counter", "outrider_collector_open_alerts": "gauge",
    "outrider_collector_drift_statistic": "gauge", "outrider_collector_drift_p_value": "gauge",
    "outrider_collector_drift_detected": "gauge", "outrider_collector_drift_evaluation_timestamp_seconds": "gauge",
    "outrider_collector_drift_test_p_value": "gauge", "outrider_collector_drift_not_compared": "gauge",
    "outrider_collector_ack_latency_seconds": "histogram", "outrider_collector_rollup_buckets_skipped": "counter",
    "outrider_collector_span_cache_windows": "counter",
}


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict, sample: str, **labels: str) -> float:
    """The one sample named ``sample`` whose labels include ``labels``."""
    found = [s.value for s in samples(families, sample) if labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{sample}{labels}: {found}"
    return found[0]


def samples(families: dict, name: str) -> list:
    """The samples called ``name`` (the parser names a family without _total, _bucket, ...)."""
    family = families[re.sub(r"_(total|bucket|count|sum)$", "", name)]
    return [s for s in family.samples if s.name == name]


def assert_histogram(families: dict, name: str, buckets: tuple, count: int, **labels: str) -> None:
    rows = [s for s in families[name].samples if s.name == f"{name}_bucket" and labels.items() <= s.labels.items()]
    bounds = [float(s.labels["le"]) for s in rows]
    assert bounds == [*buckets, float("inf")]  # fixed buckets: mergeable across instances
    counts = [s.value for s in rows]
    assert counts == sorted(counts) and counts[-1] == count  # cumulative, +Inf holds every observation
    assert value(families, f"{name}_count", **labels) == count
    assert value(families, f"{name}_sum", **labels) > 0


def request(x: np.ndarray, model: str = "m", name: str = "X") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.astype("<f4").tobytes())
    return req


def short_raw(x: np.ndarray) -> pb.ModelInferRequest:
    """Fewer bytes than the shape says."""
    req = request(x)
    req.raw_input_contents[0] = req.raw_input_contents[0][:-4]
    return req


@dataclass
class World:
    agent: dict
    collector: dict
    collector_before_raw: dict
    evaluation: cpb.DriftEvaluation
    open_alerts: int
    session_stats: dict
    exporter_stats: dict


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, module_db_url: str) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("metrics")
    model = tmp / "m.onnx"
    model.write_bytes(examples.logistic_regression())
    x_ref, _ = examples.tabular_data(n=5000, seed=1)
    x_ref[:, DISCRETE] = np.random.default_rng(1).integers(0, 5, len(x_ref))  # a small-integer feature
    np.savez(tmp / "ref.npz", X=x_ref)

    collector_metrics = CollectorMetrics()
    collector = serve_collector(module_db_url, "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH_TOML), drift_interval=0,
                                rollup_interval=3600, metrics=collector_metrics)
    collector_url = collector_metrics.start_http("127.0.0.1:0").url
    channel = grpc.insecure_channel(collector.address)
    ops = cpb_grpc.OpsServiceStub(channel)
    admin = bearer(ADMIN_TOKEN)
    reference = build_profile(model, tmp / "ref.npz", model_name="m")
    gone = reference.columns.add()
    gone.CopyFrom(reference.columns[0])
    gone.name, gone.source = "gone", "extra"  # a reference column no traffic column matches: not compared
    attached = ops.AttachProfile(cpb.AttachProfileRequest(model_name="m", model_version="1", profile=reference),
                                 metadata=admin, timeout=60)
    assert attached.columns == len(reference.columns)
    ops.SetDriftConfig(cpb.DriftConfigRequest(model_name="m", config_json='{"min_rows": 200, "consecutive": 1}'),
                       metadata=admin, timeout=60)

    session = MonitoredSession(str(model), model_name="m", model_version="1", summarizer="thread",
                               window_rows=100, window_seconds=None, agent_id="edge-1", collector=collector.address,
                               collector_token=AGENT_TOKEN, spool_dir=tmp / "spool")
    agent_metrics = AgentMetrics()
    agent = serve(session, "m", "1", "127.0.0.1:0", metrics=agent_metrics)
    agent_url = agent_metrics.start_http("127.0.0.1:0").url
    infer_channel = grpc.insecure_channel(agent.address)
    stub = pb_grpc.GRPCInferenceServiceStub(infer_channel)
    raw = None
    try:
        x, _ = examples.tabular_data(n=ROWS * GOOD, seed=2)
        x[:, 3] += 3.0  # traffic that drifts in X[3]
        x[:, DISCRETE] = np.random.default_rng(2).integers(0, 5, len(x))
        x[::5, MISSING] = np.nan  # and goes 20 % missing in X[7]
        for i in range(GOOD):
            stub.ModelInfer(request(x[i * ROWS:(i + 1) * ROWS]), timeout=30)
        bad = [(request(x[:5], model="other"), grpc.StatusCode.NOT_FOUND)] * NOT_FOUND + [
            (request(x[:5, :19]), grpc.StatusCode.INVALID_ARGUMENT),
            (request(x[:5], name="Y"), grpc.StatusCode.INVALID_ARGUMENT),
            (short_raw(x[:5]), grpc.StatusCode.INVALID_ARGUMENT)]
        assert len(bad) == NOT_FOUND + INVALID
        for req, code in bad:
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(req, timeout=30)
            assert err.value.code() == code

        exporter = session.sink
        wait_until(lambda: session.stats()["rows_summarised"] == ROWS * GOOD and exporter.stats()["spool_windows"] == 0
                   and exporter.stats()["windows_acked"] == ROWS * GOOD // 100, timeout=120,
                   what="the agent's windows to be acked")
        before_raw = scrape(collector_url)

        # A stream of our own: a stored window, its resend (duplicate), one of another agent (rejected).
        raw = AgentConn(cpb_grpc.AgentServiceStub(channel), metadata=bearer(AGENT_TOKEN))
        raw.send(hello(run="raw"), batch(window(1, run="raw")))
        assert [a.result for a in raw.acks(1)] == [cpb.WindowAck.STORED]
        raw.send(batch(window(1, run="raw")))
        assert [a.result for a in raw.acks(1)] == [cpb.WindowAck.DUPLICATE]
        raw.send(batch(window(2, agent="edge-2", run="raw")))
        assert [a.result for a in raw.acks(1)] == [cpb.WindowAck.REJECTED]
        with pytest.raises(grpc.RpcError) as err:  # one refused call
            ops.Status(cpb.StatusRequest(), metadata=bearer("not-a-valid-token-at-all"), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        evaluation = ops.EvaluateDrift(cpb.DriftRequest(model_name="m", model_version="1"), metadata=admin,
                                       timeout=60).latest[0]
        alerts = ops.ListAlerts(cpb.ListAlertsRequest(model_name="m"), metadata=admin, timeout=30).alerts
        yield World(agent=scrape(agent_url), collector=scrape(collector_url), collector_before_raw=before_raw,
                    evaluation=evaluation, open_alerts=sum(a.state == "open" for a in alerts),
                    session_stats=session.stats(), exporter_stats=exporter.stats())
    finally:
        infer_channel.close()
        agent.stop(grace=0)
        agent_metrics.close()
        if raw is not None:
            raw.close()
        channel.close()
        collector.stop(grace=0)
        collector_metrics.close()


@pytest.mark.parametrize("name, kind", sorted(AGENT_FAMILIES.items()))
def test_every_agent_family_is_there_with_its_type(world, name, kind):
    assert world.agent[name].type == kind
    assert world.agent[name].documentation


@pytest.mark.parametrize("name, kind", sorted(COLLECTOR_FAMILIES.items()))
def test_every_collector_family_is_there_with_its_type(world, name, kind):
    assert world.collector[name].type == kind
    assert world.collector[name].documentation


def test_agent_requests_failures_and_latency_match_the_requests_made(world):
    m = world.agent
    assert value(m, "outrider_agent_requests_total", model="m", version="1") == GOOD + NOT_FOUND + INVALID
    failures = {s.labels["reason"]: s.value for s in samples(m, "outrider_agent_request_failures_total")}
    assert failures == {"NOT_FOUND": NOT_FOUND, "INVALID_ARGUMENT": INVALID}
    assert_histogram(m, "outrider_agent_inference_latency_seconds", LATENCY_BUCKETS, GOOD + NOT_FOUND + INVALID,
                     model="m", version="1")
    assert value(m, "outrider_agent_model_info", model="m", version="1") == 1


def test_agent_monitoring_counters_match_the_rows_and_windows(world):
    m, windows = world.agent, ROWS * GOOD // 100
    assert value(m, "outrider_agent_rows_captured_total") == ROWS * GOOD  # refused requests never reach the model
    assert value(m, "outrider_agent_rows_summarized_total") == ROWS * GOOD
    assert value(m, "outrider_agent_rows_dropped_total") == value(m, "outrider_agent_rows_skipped_total") == 0
    assert value(m, "outrider_agent_windows_sent_total") == windows
    assert value(m, "outrider_agent_windows_acked_total") == windows
    for name in ("windows_rejected_total", "stream_retries_total", "spool_write_errors_total", "spool_windows",
                 "spool_bytes", "windows_in_flight", "spool_dropped_windows_total", "spool_dropped_rows_total",
                 "window_sink_errors_total"):
        assert value(m, f"outrider_agent_{name}") == 0, name
    assert value(m, "outrider_agent_collector_connected") == 1


def test_collector_counts_windows_by_result_and_auth_failures(world):
    m, agent_windows = world.collector, world.exporter_stats["windows_acked"]
    assert value(m, "outrider_collector_windows_total", result="stored") == agent_windows + 1
    assert value(m, "outrider_collector_windows_total", result="duplicate") == 1
    assert value(m, "outrider_collector_windows_total", result="rejected") == 1
    assert value(m, "outrider_collector_auth_failures_total") == 1
    assert value(m, "outrider_collector_write_queue_depth") == 0
    assert value(m, "outrider_collector_rollup_buckets_skipped_total") == 0
    assert value(m, "outrider_collector_rows_total", model="m", version="1") == ROWS * GOOD
    assert value(m, "outrider_collector_rows_total", model="credit", version="1") == 10  # the raw stream's window
    assert value(m, "outrider_collector_dropped_rows_total", model="m", version="1") == 0
    # the first evaluation came after every window: none was merged at ingest, each is read by an evaluation
    assert value(m, "outrider_collector_span_cache_windows_total", merged="at_ingest") == 0
    assert value(m, "outrider_collector_span_cache_windows_total", merged="by_evaluation") == agent_windows + 1


def test_ack_latency_counts_each_committed_batch(world):
    before = value(world.collector_before_raw, "outrider_collector_ack_latency_seconds_count")
    assert 1 <= before <= world.exporter_stats["windows_acked"]  # the agent batches its windows
    # our stream: two committed batches (stored, duplicate); a rejected-only batch commits nothing
    assert_histogram(world.collector, "outrider_collector_ack_latency_seconds", ACK_BUCKETS, int(before) + 2)


def test_connected_agents_and_what_they_serve(world):
    m = world.collector
    assert value(m, "outrider_collector_agents_connected") == 2
    info = {(s.labels["model"], s.labels["version"], s.labels["managed"]): s.value
            for s in samples(m, "outrider_collector_agent_info")}
    assert info == {("m", "1", "false"): 1, ("credit", "1", "false"): 1}
    assert {s.labels["agent_id"] for s in samples(m, "outrider_collector_agent_info")} == {"edge-1"}


def test_drift_gauges_are_the_latest_evaluation(world):
    m, evaluation = world.collector, world.evaluation
    assert evaluation.evaluated and any(c.name == "X[3]" and c.drifted for c in evaluation.columns)
    detected = {s.labels["feature"]: s.value for s in samples(m, "outrider_collector_drift_detected")
                if s.labels["model"] == "m" and s.labels["version"] == "1"}
    assert detected == {c.name: float(c.drifted) for c in evaluation.columns}
    assert detected["X[3]"] == 1
    fields = {"psi": "psi", "ks": "ks_d", "wasserstein": "wasserstein", "chi2": "chi2", "js": "js",
              "missing_diff": "missing_diff", "missing_effect": "missing_effect"}
    statistics = samples(m, "outrider_collector_drift_statistic")
    assert {s.labels["method"] for s in statistics} >= {"psi", "ks", "wasserstein", "chi2", "js", "missing_diff"}
    by_name = {c.name: c for c in evaluation.columns}
    for s in statistics:
        assert s.value == pytest.approx(getattr(by_name[s.labels["feature"]], fields[s.labels["method"]]))
    assert value(m, "outrider_collector_drift_statistic", feature="X[3]", method="wasserstein") > 1
    for s in samples(m, "outrider_collector_drift_p_value"):
        assert s.value == pytest.approx(by_name[s.labels["feature"]].p_adjusted)
    assert value(m, "outrider_collector_drift_evaluation_timestamp_seconds", model="m", version="1") == \
        pytest.approx(evaluation.evaluated_unix_nano / 1e9)


def methods(families: dict, feature: str) -> set[str]:
    return {s.labels["method"] for s in samples(families, "outrider_collector_drift_statistic")
            if s.labels["feature"] == feature}


def test_what_the_drift_engine_decides_with_is_exported(world):
    m, by_name = world.collector, {c.name: c for c in world.evaluation.columns}
    # a discrete column: judged as numeric and by its frequencies, all five statistics out
    discrete, missing, plain = by_name[f"X[{DISCRETE}]"], by_name[f"X[{MISSING}]"], by_name["X[0]"]
    assert discrete.method == "discrete" and methods(m, discrete.name) >= {"psi", "ks", "wasserstein", "chi2", "js"}
    assert methods(m, plain.name) & {"chi2", "js"} == set()  # a continuous one: no frequencies
    # the missing rate of every compared column, and its test's own p-value
    assert value(m, "outrider_collector_drift_statistic", feature=missing.name, method="missing_diff") == \
        pytest.approx(0.2, abs=0.01)
    assert value(m, "outrider_collector_drift_statistic", feature=plain.name, method="missing_diff") == 0
    assert value(m, "outrider_collector_drift_test_p_value", feature=missing.name, test="missing_rate") == \
        pytest.approx(missing.missing_p) and missing.missing_p < 1e-6
    if missing.missing_effect:  # Cohen's h, once collector.monitoring.drift fills it
        assert value(m, "outrider_collector_drift_statistic", feature=missing.name, method="missing_effect") == \
            pytest.approx(missing.missing_effect)
    else:  # unset beside a change: not exported as an effect of 0
        assert "missing_effect" not in methods(m, missing.name)
    tests = {(s.labels["feature"], s.labels["test"]): s.value for s in samples(m, "outrider_collector_drift_test_p_value")
             if s.labels["model"] == "m"}
    assert tests[(discrete.name, "chi2")] == pytest.approx(discrete.chi2_p)
    assert tests[(plain.name, "ks")] == pytest.approx(plain.ks_p)
    assert (plain.name, "missing_rate") not in tests  # nothing missing on either side: no test
    assert not any(feature == "gone" for feature, _ in tests)
    # the reference column the traffic lacks: counted, and no statistic of it
    assert world.evaluation.not_compared == 1 and by_name["gone"].reason.startswith("not compared")
    assert value(m, "outrider_collector_drift_not_compared", model="m", version="1") == 1
    assert methods(m, "gone") == set()


def test_open_alerts_by_model_and_state(world):
    m = world.collector
    assert world.open_alerts >= 1  # consecutive=1: the first drifted evaluation opens the alert
    assert value(m, "outrider_collector_open_alerts", model="m", state="open") == world.open_alerts
    assert value(m, "outrider_collector_open_alerts", model="m", state="acknowledged") == 0


# --- the CLI flags ---------------------------------------------------------------------------


def start(args: list[str], env: dict[str, str], ready: str) -> tuple[subprocess.Popen, list[str]]:
    """Start ``outrider ARGS``; the lines it printed up to the one matching ``ready``."""
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(ready, line):
            return proc, lines
    raise AssertionError(f"{args[:2]} exited with {proc.wait()} before it was ready: {lines}")


def metrics_url(lines: list[str]) -> str:
    return next(m[1] for line in lines if (m := re.search(r"metrics on (http://\S+/metrics)", line)))


def test_cli_flags_start_the_endpoints(lr_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env.update(PYTHONPATH=str(ROOT), OUTRIDER_AGENT_METRICS="127.0.0.1:0")  # the agent's from its environment
    procs = []
    try:
        collector, lines = start(["collector", "serve", "--db", str(tmp_path / "c.db"), "--listen", "127.0.0.1:0",
                                  "--metrics", "127.0.0.1:0"], env, r"collector listening on")
        procs.append(collector)
        address = re.search(r"collector listening on (\S+)", lines[-1])[1]
        collector_metrics = metrics_url(lines)
        agent, lines = start(["agent", "serve", "--model", str(lr_model), "--model-name", "m", "--listen",
                              "127.0.0.1:0", "--collector", address, "--spool-dir", str(tmp_path / "spool"),
                              "--summarizer", "thread"], env, r"serving m version 1 on")
        procs.append(agent)
        agent_families = scrape(metrics_url(lines))
        assert set(AGENT_FAMILIES) - set(agent_families) <= {"outrider_agent_requests",  # no request yet
                                                            "outrider_agent_request_failures",
                                                            "outrider_agent_inference_latency_seconds"}
        assert value(agent_families, "outrider_agent_model_info", model="m", version="1") == 1
        wait_until(lambda: value(scrape(collector_metrics), "outrider_collector_agents_connected") == 1,
                   timeout=60, what="the agent to connect")
        assert {"outrider_collector_windows", "outrider_collector_ack_latency_seconds"} <= set(scrape(collector_metrics))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            assert proc.wait(60) == 0


def test_cli_refuses_a_metrics_port_in_use_with_one_line(lr_model, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
        result = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "serve", "--model", str(lr_model),
                                 "--listen", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}"], cwd=ROOT,
                                env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cannot serve metrics on" in result.stderr and "--metrics" in result.stderr
