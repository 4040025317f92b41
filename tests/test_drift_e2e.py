"""Drift end to end, as an operator runs it: real collector and agent processes, the CLI,
a reference profile, traffic that drifts, labels that reveal a worse model, alerts, the webhook."""
from __future__ import annotations

import http.server
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

from agent import examples
from collector.monitoring.webhook import SIGNATURE_HEADER, verify
from protos import agent_pb2, agent_pb2_grpc
from protos import open_inference_pb2 as pb
from protos import open_inference_pb2_grpc as pb_grpc
from test_delivery import start, wait_until  # real processes, as the delivery tests start them

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def cli(*args: str, address: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env.update(OUTRIDER_COLLECTOR=address, PYTHONIOENCODING="utf-8", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          encoding="utf-8", timeout=120)


class Hook:
    """The operator's webhook receiver on loopback."""

    def __init__(self) -> None:
        self.bodies: list[tuple[bytes, str]] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.bodies.append((body, self.headers.get(SIGNATURE_HEADER, "")))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/outrider"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def infer(stub, x: np.ndarray, request_id: str) -> np.ndarray:
    request = pb.ModelInferRequest(model_name="m", id=request_id)
    request.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    reply = stub.ModelInfer(request, timeout=30)
    return np.frombuffer(reply.raw_output_contents[0], "<i8")


def test_drift_and_a_performance_drop_open_alerts_that_reach_the_webhook(tmp_path: Path):
    model = tmp_path / "m.onnx"
    model.write_bytes(examples.logistic_regression())
    x_ref, y_ref = examples.tabular_data(n=20_000, seed=1)
    np.savez(tmp_path / "ref.npz", X=x_ref, label=y_ref)
    hook = Hook()
    collector, address = start(["collector", "serve", "--db", str(tmp_path / "c.db"), "--listen", "127.0.0.1:0",
                                "--drift-interval", "1", "--webhook-url", hook.url, "--webhook-secret", "s3cret"],
                               r"collector listening on (\S+)")
    agent, agent_address = start(["agent", "serve", "--model", str(model), "--model-name", "m", "--model-version", "1",
                                  "--listen", "127.0.0.1:0", "--window-seconds", "0.5", "--collector", address,
                                  "--agent-id", "a1", "--spool-dir", str(tmp_path / "spool")],
                                 r"serving m version 1 on (\S+)")
    try:
        made = cli("profile", "--model", str(model), "--data", str(tmp_path / "ref.npz"),
                   "--out", str(tmp_path / "ref.pb"), address=address)
        assert made.returncode == 0, made.stderr
        attached = cli("attach", "m", "1", str(tmp_path / "ref.pb"), address=address)
        assert attached.returncode == 0, attached.stderr
        assert cli("drift-config", "m", "--set", '{"span_seconds": 2, "consecutive": 2}',
                   address=address).returncode == 0

        channel = grpc.insecure_channel(agent_address)
        infer_stub = pb_grpc.GRPCInferenceServiceStub(channel)
        feedback = agent_pb2_grpc.FeedbackServiceStub(channel)
        rng = np.random.default_rng(2)
        stop = threading.Event()

        def traffic() -> None:
            """X[3] drifts by 1 sigma; and the world changed: the true label is now the opposite."""
            n = 0
            while not stop.is_set():
                x, y = examples.tabular_data(n=50, seed=int(rng.integers(1 << 30)))
                x[:, 3] += 1.0
                for i in range(0, 50, 10):
                    rid = f"r{n}"
                    infer(infer_stub, x[i:i + 10], rid)
                    labels = [agent_pb2.Label(request_id=rid, row=j, class_label=str(1 - int(y[i + j])))
                              for j in range(10)]
                    feedback.Feedback(agent_pb2.FeedbackRequest(labels=labels), timeout=30)
                    n += 1

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()

        def open_alerts() -> set[str]:
            result = cli("alerts", "--json", address=address)
            return {a["column"] for a in json.loads(result.stdout or "{}").get("alerts", [])}

        wait_until(lambda: {"X[3]", "performance"} <= open_alerts(), timeout=180, what="the alerts to open")
        # Asked while the traffic still flows: once it stops, the 2-s span empties and the newest windows
        # hold no rows, which a loaded machine reaches before these commands run.
        def drift_rows() -> dict[str, str]:
            shown = cli("drift", "m", address=address)
            assert shown.returncode == 0, shown.stderr
            return {line.split()[0]: line for line in shown.stdout.splitlines() if line.split()}

        # the newest evaluation, which may be one whose 2-s span had too few rows to compare on a loaded machine
        shown: list[dict[str, str]] = []

        def columns_shown() -> bool:
            shown[:] = [drift_rows()]
            return "X[3]" in shown[0]

        wait_until(columns_shown, what="an evaluation with columns")
        rows = shown[0]
        assert "DRIFT" in rows["X[3]"] and "DRIFT" not in rows["X[0]"]
        assert "realised performance: accuracy" in cli("drift", "m", address=address).stdout
        per_window = cli("windows", "--model", "m", "--performance", "--limit", "1000", address=address)
        header, *lines = per_window.stdout.splitlines()
        assert "ACCURACY" in header and any(float(line.split()[-2]) < 0.5 for line in lines if line.split()[-2] != "-")
        stop.set()
        sender.join(30)
        channel.close()
        assert open_alerts() & {f"X[{j}]" for j in range(20) if j != 3} == set()  # only the shifted feature

        wait_until(lambda: len(hook.bodies) >= 2, what="the webhook")
        events = []
        for body, signature in hook.bodies:
            assert verify("s3cret", body, signature)
            events.append(json.loads(body))
        assert {e["alert"]["column"] for e in events if e["event"] == "alert.opened"} >= {"X[3]", "performance"}
    finally:
        for proc in (agent, collector):
            proc.send_signal(signal.SIGTERM)
        for proc in (agent, collector):
            assert proc.wait(60) == 0
        hook.server.shutdown()
        hook.server.server_close()
