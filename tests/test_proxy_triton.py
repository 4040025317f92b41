"""``outrider agent proxy`` in front of a real NVIDIA Triton: the twin of ``test_proxy_mlserver.py``.

Triton is the ``tritonserver`` binary of the ``nvidia-pytriton`` 0.7.0 wheel (Triton 2.51) in a venv of its own
(``benchmarks/triton_env.py``; created here when missing, as on a fresh CI machine), started once for the module,
CPU only. Its model "m" is a Python-backend model running the scikit-learn ONNX file with onnxruntime
(``benchmarks/_triton_model.py``). The proxy runs as the real CLI process with all four fronts (``--listen``,
``--relay-listen``, ``--http-listen``, ``--http-relay-listen``) and ``--metrics``, which is where its counts are
read. Clients are ``tritonclient.grpc`` and raw byte calls; replies through the proxy are compared with Triton's
own answers to the same requests; windows go to a real collector (SQLite file) and its drift engine.

Where Triton differs from MLServer (and the checks below with it): Triton checks datatypes and shapes itself
(INVALID_ARGUMENT, before the model runs); its Python backend answers only the outputs a request asks for, so
such a call passes through as ``partial_outputs`` instead of being summarised; a REST body it cannot parse is
its HTTP 500; and under ``--managed`` a version that fails to load fails the whole load while the other versions
go on serving, and stays in its repository index after its folder is removed.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent import examples
from agent.profile import build_profile
from agent.proxy_grpc import REQUEST_ID_HEADER
from benchmarks import triton_env
from collector.api.server import serve_collector
from protos import agent_pb2, agent_pb2_grpc
from protos import collector_pb2 as cpb
from protos import collector_pb2_grpc as cpb_grpc
from protos import open_inference_pb2 as pb
from test_approvals import call as ops_call
from test_delivery import reap, start, wait_until  # noqa: F401  (reap: kills what a failed test left running)
from test_proxy import HANG_GUARD, Raw, free_address, infer_request, labelled_by_id
from test_proxy_managed import AGENT, READY, Traffic, answered, make_production, register
from test_proxy_mlserver import triton_infer
from test_proxy_rest import call, infer_body
from test_rollout_collector import AGENT_TOKEN, agent_state, running_collector

pytestmark = pytest.mark.slow  # Triton takes seconds to start (and its venv seconds to install on a fresh machine)


def unavailable(reason: str) -> None:
    """On CI (CI=true) a Triton that cannot be set up or started fails the test; elsewhere it is skipped."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def triton_venv() -> Path:
    """Triton's venv, created when missing (under its lock: one pip at a time across workers)."""
    if triton_env.missing() is not None:
        started = time.monotonic()
        if triton_env.setup() == 0:
            print(f"Triton venv ready after {time.monotonic() - started:.0f} s (created here, or by another worker)")
    reason = triton_env.missing()
    if reason is not None:
        unavailable(reason)
    return triton_env.venv_path()


def start_triton(folder: Path, model: bytes | Path | None, venv: Path,
                 versions: dict[str, bytes | Path] | None = None) -> triton_env.Triton:
    try:
        return triton_env.start(folder, model, "m", venv=venv, versions=versions)
    except RuntimeError as exc:
        unavailable(str(exc))
        raise  # not reached


@pytest.fixture(scope="module")
def triton(triton_venv: Path, lr_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = start_triton(tmp_path_factory.mktemp("triton"), lr_model, triton_venv)
    yield server
    server.stop()


@dataclass
class Proxy:
    """A running ``outrider agent proxy`` process and its fronts."""

    process: Any
    address: str      # --listen
    relay: str        # --relay-listen
    rest_port: int    # --http-listen
    rest_relay: int   # --http-relay-listen
    metrics: str      # --metrics URL

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(HANG_GUARD) == 0  # the last window flushed and delivered


def start_proxy(triton: Any, *flags: str) -> Proxy:
    metrics = free_address()  # the ready line does not say where --metrics is: a free port chosen here
    process, line = start(["agent", "proxy", "--upstream", triton.grpc_address, "--upstream-http",
                           triton.http_address, "--model-name", "m", "--listen", "127.0.0.1:0",
                           "--relay-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                           "--http-relay-listen", "127.0.0.1:0", "--metrics", metrics, *flags],
                          r"(proxying .*\(m: monitoring version 1\).*)")

    def found(pattern: str) -> str:
        return re.search(pattern, line).group(1)

    return Proxy(process, found(r"proxying \S+ on (\S+) "), found(r"; relay on ([^;\s]+)"),
                 int(found(r"; REST [\d.]+:\d+ on (\S+)").rsplit(":", 1)[1]),
                 int(found(r"; REST relay on ([^;\s]+)").rsplit(":", 1)[1]), f"http://{metrics}/metrics")


@pytest.fixture
def proxy(triton: Any) -> Iterator[Proxy]:
    running = start_proxy(triton)
    yield running
    running.stop()


def counts(proxy: Proxy) -> dict[str, Any]:
    """The proxy's own counts, from its /metrics: summarised calls, unmonitored ones by reason (non-zero),
    capture failures, and forwarded calls by (method, code)."""
    from prometheus_client.parser import text_string_to_metric_families

    page = urllib.request.urlopen(proxy.metrics, timeout=HANG_GUARD).read().decode()
    found: dict[str, Any] = {"captured": 0, "unmonitored": {}, "capture_failures": 0, "calls": {}}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == "outrider_proxy_captured_calls_total":
                found["captured"] = sample.value
            elif sample.name == "outrider_proxy_capture_failures_total":
                found["capture_failures"] = sample.value
            elif sample.name == "outrider_proxy_unmonitored_calls_total" and sample.value:
                found["unmonitored"][sample.labels["reason"]] = sample.value
            elif sample.name == "outrider_proxy_calls_total":
                found["calls"][sample.labels["method"], sample.labels["code"]] = sample.value
    return found


def settled(proxy: Proxy, expected: dict[str, Any]) -> None:
    """Wait until the proxy's counts are ``expected`` (the relays count off the request path), then check them."""
    seen: list[dict[str, Any]] = []

    def reached() -> bool:
        seen[:] = [counts(proxy)]
        return seen[0] == expected

    try:
        wait_until(reached, timeout=HANG_GUARD, what="the proxy's counts")
    except AssertionError:
        pass
    assert seen[0] == expected


@pytest.mark.parametrize("via", ["listen", "relay"])
def test_replies_and_errors_through_the_proxy_are_tritons_own(triton: Any, proxy: Proxy, via: str):
    address = proxy.relay if via == "relay" else proxy.address
    x = examples.tabular_data(7, seed=3)[0]
    calls = [(x, "t-1", (), "FP32"), (x, "t-2", ("label",), "FP32"), (x, "t-3", (), "FP64")]
    direct = triton_infer(triton.grpc_address, calls)
    assert [code for code, _ in direct] == ["OK", "OK", "StatusCode.INVALID_ARGUMENT"], direct
    assert "inference input 'X' data-type is 'FP64', but model 'm' expects 'FP32'" in direct[2][1]  # Triton's check
    assert triton_infer(address, calls) == direct
    asked = pb.ModelInferResponse.FromString(bytes.fromhex(direct[1][1]))
    assert [o.name for o in asked.outputs] == ["label"]  # Triton answers only the outputs asked for

    direct, through = Raw(triton.grpc_address), Raw(address)
    cases = [
        ("ModelInfer", infer_request(x, "typed", typed=True)),
        ("ModelInfer", infer_request(x, "nope", model="nope")),            # Triton: unknown model
        ("ModelInfer", infer_request(x.astype(np.float64)[:, :3], "bad")),  # Triton: wrong datatype
        ("ModelMetadata", pb.ModelMetadataRequest(name="m")),
        ("ModelReady", pb.ModelReadyRequest(name="m")),
        ("ServerMetadata", pb.ServerMetadataRequest()),
        ("ServerLive", pb.ServerLiveRequest()),
        ("ServerReady", pb.ServerReadyRequest()),
        ("RepositoryIndex", pb.RepositoryIndexRequest()),                  # Triton's repository extension
    ]
    for method, request in cases:
        assert through.call(method, request)[:2] == direct.call(method, request)[:2], method
    assert direct.call("ModelInfer", infer_request(x, "nope", model="nope"))[:2] == \
        ("NOT_FOUND", "Request for unknown model: 'nope' is not found")
    # t-1 and typed summarised; t-2's reply lacks probabilities (partial); t-3 and "bad" are Triton's refusals
    settled(proxy, {"captured": 2, "unmonitored": {"partial_outputs": 1, "other_model": 1}, "capture_failures": 0,
                    "calls": {**{("ModelInfer", "OK"): 3, ("ModelInfer", "INVALID_ARGUMENT"): 2,
                                 ("ModelInfer", "NOT_FOUND"): 1},
                              **{(method, "OK"): 1 for method, _ in cases[3:]}}})


def test_a_request_without_an_id_is_labelled_by_the_proxys_id(triton: Any, proxy: Proxy):
    x, y = examples.tabular_data(5, seed=4)
    direct = Raw(triton.grpc_address).call("ModelInfer", infer_request(x))
    code, reply, initial, _ = Raw(proxy.address).call("ModelInfer", infer_request(x))
    assert code == "OK" and reply == direct[1]  # the proxy's id is not added to Triton's reply
    assert pb.ModelInferResponse.FromString(reply).id == ""
    assigned = dict(initial)[REQUEST_ID_HEADER]
    settled(proxy, {"captured": 1, "unmonitored": {}, "capture_failures": 0, "calls": {("ModelInfer", "OK"): 1}})
    assert labelled_by_id(proxy.address, assigned, y) == (len(y), 1)


@pytest.mark.parametrize("via", ["listen", "relay"])
def test_windows_at_the_collector_hold_every_row_and_the_drift_is_found(tmp_path: Path, lr_model: Path,
                                                                        triton: Any, via: str):
    collector = serve_collector(tmp_path / "c.db", "127.0.0.1:0", drift_interval=0, rollup_interval=3600)
    ops = cpb_grpc.OpsServiceStub(grpc.insecure_channel(collector.address))
    try:
        x_ref, y_ref = examples.tabular_data(5000, seed=1)
        np.savez(tmp_path / "ref.npz", X=x_ref, label=y_ref)
        ops.AttachProfile(cpb.AttachProfileRequest(model_name="m", model_version="1",
                                                   profile=build_profile(lr_model, tmp_path / "ref.npz")),
                          timeout=HANG_GUARD)
        running = start_proxy(triton, "--collector", collector.address, "--agent-id", "proxy-tr",
                              "--window-seconds", "0.5", "--summarizer", "thread",
                              "--spool-dir", str(tmp_path / "spool"))
        try:
            x = examples.tabular_data(2000, seed=7)[0]
            x[:, 3] += 1.0  # one feature moves by a standard deviation
            batches, start_row = [], 0
            while start_row < len(x):
                batch = 1 + (len(batches) * 37) % 64
                batches.append((x[start_row:start_row + batch], f"r{len(batches)}", (), "FP32"))
                start_row += batch
            replies = triton_infer(running.relay if via == "relay" else running.address, batches)
            assert [code for code, _ in replies] == ["OK"] * len(batches)
            sent, calls = len(x), len(batches)
            settled(running, {"captured": calls, "unmonitored": {}, "capture_failures": 0,
                              "calls": {("ModelInfer", "OK"): calls}})
        finally:
            running.stop()  # the last window flushed and delivered

        def stored() -> list[cpb.WindowInfo]:
            return list(ops.ListWindows(cpb.ListWindowsRequest(model_name="m", limit=10_000),
                                        timeout=HANG_GUARD).windows)

        wait_until(lambda: sum(w.rows for w in stored()) >= sent, timeout=HANG_GUARD, what="every row stored")
        windows = stored()
        assert sum(w.rows for w in windows) == sent and sum(w.calls for w in windows) == calls
        assert {w.agent_id for w in windows} == {"proxy-tr"} and {w.model_version for w in windows} == {"1"}
        report = ops.EvaluateDrift(cpb.DriftRequest(model_name="m"), timeout=HANG_GUARD).latest[0]
        drifted = {c.name for c in report.columns if c.drifted}
        assert "X[3]" in drifted and not drifted & {f"X[{j}]" for j in range(20) if j != 3}
    finally:
        collector.stop(grace=0)


@pytest.mark.parametrize("via", ["listen", "relay"])
def test_rest_replies_and_errors_through_the_proxy_are_tritons_own(triton: Any, proxy: Proxy, via: str):
    """The REST front (or the REST relay) before Triton's own REST port: status and body bytes as Triton gives
    them, the monitored model's calls summarised (JSON and binary tensors both ways)."""
    direct_port = int(triton.http_address.rsplit(":", 1)[1])
    port = proxy.rest_relay if via == "relay" else proxy.rest_port
    x = examples.tabular_data(6, seed=5)[0]
    cases = [("POST", "/v2/models/m/infer", *infer_body(x, "j-1")),
             ("POST", "/v2/models/m/infer", *infer_body(x[:2], "j-2", outputs=("label",))),
             ("POST", "/v2/models/m/infer", *infer_body(x, "j-3", binary=True, binary_outputs=True)),
             ("POST", "/v2/models/nope/infer", *infer_body(x, "j-4")),        # Triton: unknown model
             ("POST", "/v2/models/m/infer", b'{"inputs": "not a list"}', {"Content-Type": "application/json"}),
             ("GET", "/v2/models/m", None, {}),
             ("GET", "/v2/models/m/ready", None, {}),
             ("GET", "/v2/health/ready", None, {})]
    for method, path, body, headers in cases:
        status, _, reply = call(port, method, path, body, headers)
        direct_status, _, direct_reply = call(direct_port, method, path, body, headers)
        assert (status, reply) == (direct_status, direct_reply), (path, body[:60] if body else None)
    unknown, malformed = (call(direct_port, *case[:2], case[2], case[3]) for case in cases[3:5])
    assert (unknown[0], unknown[2]) == (404, b'{"error":"Request for unknown model: \'nope\' is not found"}')
    # Triton answers a body it cannot parse with 500 (MLServer: 422)
    assert (malformed[0], malformed[2]) == (500, b'{"error":"Unable to parse \'inputs\': attempt to access JSON '
                                                 b'non-array as array"}')
    # j-1 and j-3 summarised; j-2's reply lacks probabilities; the malformed body is Triton's refusal
    settled(proxy, {"captured": 2, "unmonitored": {"partial_outputs": 1, "other_model": 1}, "capture_failures": 0,
                    "calls": {("ModelInfer", "200"): 3, ("ModelInfer", "404"): 1, ("ModelInfer", "500"): 1,
                              ("ModelMetadata", "200"): 1, ("ModelReady", "200"): 1, ("ServerReady", "200"): 1}})


def test_the_overhead_benchmark_runs_with_triton_as_the_upstream(triton_venv: Path):
    from benchmarks import proxy as bench

    (row,) = bench.run([2], [3], seconds=0.5, rounds=1, upstream_kind="triton")
    assert row["upstream"] == "triton" and row["direct"]["failed"] == 0 and row["proxy"]["failed"] == 0
    assert row["direct"]["rps"] > 0 and row["proxy"]["rps"] > 0
    assert row["direct"]["upstream_cpu_ms_per_1k"] > 0 and row["proxy"]["proxy_cpu_ms_per_1k"] > 0


def test_promotion_rollback_and_a_failed_load_through_triton(tmp_path: Path, triton_venv: Path):
    """``--managed`` (test_proxy_managed.py's scenario with MLServer): versions 1 (logistic regression) and 2
    (a small forest) of "m" in Triton's repository, numbered folders under version_policy all; promotions and
    a rollback load through RepositoryModelLoad, unversioned calls are pinned (Triton's own default is 2)."""
    models = {"1": examples.logistic_regression(), "2": examples.random_forest(n_trees=5)}
    triton = start_triton(tmp_path / "triton", None, triton_venv, models)
    try:
        with running_collector(tmp_path) as (_, ops, address, _):
            for data in models.values():
                register(ops, data)
            first = make_production(ops, 1)
            proxy, line = start(["agent", "proxy", "--upstream", triton.grpc_address, "--upstream-http",
                                 triton.http_address, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                                 "--model-name", "m", "--managed", "--collector", address, "--token", AGENT_TOKEN,
                                 "--agent-id", AGENT, "--spool-dir", str(tmp_path / "spool"),
                                 "--window-seconds", "0.5", "--summarizer", "thread",
                                 "--upstream-load-timeout-seconds", "60"], READY)
            grpc_address, rest_url = re.search(r"on (\S+) \(m: .*REST \S+ on (\S+)", line).groups()
            traffic = Traffic(grpc_address, int(rest_url.rsplit(":", 1)[1]))
            try:
                assert answered(ops, first) == ("ok", "")
                state = agent_state(ops, AGENT)
                assert state.managed and (state.model_version, state.desired_version, state.model_error) == \
                    ("1", "1", "")
                direct = Raw(triton.grpc_address).call("ModelInfer", infer_request(np.zeros((1, 20), np.float32)))
                assert pb.ModelInferResponse.FromString(direct[1]).model_version == "2"  # Triton's own default
                assert traffic.send() == {"1"}  # pinned to the registry's production version

                served_by_1 = traffic.last_id
                promoted = make_production(ops, 2)
                assert answered(ops, promoted) == ("ok", "")
                assert traffic.send() == {"2"}
                labels = [agent_pb2.Label(request_id=served_by_1, row=j, class_label="1") for j in range(7)]
                with grpc.insecure_channel(grpc_address) as channel:
                    joined = agent_pb2_grpc.FeedbackServiceStub(channel).Feedback(
                        agent_pb2.FeedbackRequest(labels=labels), timeout=HANG_GUARD)
                assert (joined.matched, joined.unmatched) == (7, 0)

                back = ops_call(ops, "alice", "Rollback", cpb.RollbackRequest(model_name="m", reason="p99 doubled")).id
                assert answered(ops, back) == ("ok", "")
                assert traffic.send() == {"1"}

                # version 3: in the registry, and in Triton's repository as a file onnxruntime cannot load. Triton
                # refuses the whole load (INVALID_ARGUMENT) and goes on serving versions 1 and 2.
                register(ops, examples.random_forest(n_trees=3))
                triton_env.write_version(triton.repository, "m", "3", b"not an onnx model")
                state, error = answered(ops, make_production(ops, 3))
                assert state == "failed" and f"upstream {triton.grpc_address} could not load model 'm': " \
                    "INVALID_ARGUMENT load failed for model 'm': version 3 is at UNAVAILABLE state" in error, error
                assert "INVALID_PROTOBUF" in error, error  # onnxruntime's, via Triton
                shown = agent_state(ops, AGENT)
                assert (shown.model_version, shown.desired_version) == ("1", "3") and shown.model_error == error
                assert traffic.send() == {"1"}  # the version before goes on, served and monitored

                # version 4: in the registry, not in Triton's repository (a load of "m" succeeds without it). Unlike
                # MLServer, Triton's index still lists version 3 (UNAVAILABLE) after its folder is gone.
                shutil.rmtree(triton.repository / "m" / "3")
                register(ops, examples.random_forest(n_trees=4))
                state, error = answered(ops, make_production(ops, 4))
                assert state == "failed" and "lists no version '4' of it (it lists: 1, 2, 3 (UNAVAILABLE))" in error, error
                assert traffic.send() == {"1"}
            finally:
                proxy.send_signal(signal.SIGTERM)
                assert proxy.wait(HANG_GUARD) == 0  # the last window flushed and delivered

            def stored() -> Counter[str]:
                windows = ops_call(ops, "dave", "ListWindows",
                                   cpb.ListWindowsRequest(model_name="m", limit=10_000)).windows
                assert {w.agent_id for w in windows} <= {AGENT}
                rows: Counter[str] = Counter()
                for w in windows:
                    rows[w.model_version] += w.rows
                return rows

            wait_until(lambda: stored() == traffic.rows, timeout=HANG_GUARD, what=f"rows {dict(traffic.rows)} stored")
            assert set(traffic.rows) == {"1", "2"}
    finally:
        triton.stop()
