"""Feature names end to end (issue 11): a reference CSV whose header names the features, through the real CLI
(``outrider profile`` -> ``attach`` for a static agent given ``--feature-names``; ``models register --reference``
-> promotion -> a managed agent given the names with the version), real collector and agent processes, and
traffic shifted on two named columns: the names are on both sides and drift flags those two columns only.
Also the agent's side of naming, quickly: ``agent serve --feature-names`` and ``MonitoredSession(feature_names=)``.
"""
from __future__ import annotations

import csv
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
from agent.errors import InvalidArgument
from agent.session import MonitoredSession
from faults_support import exit_code, reap, start  # noqa: F401  (reap: kills what a failed test left running)
from protos import open_inference_pb2 as pb
from protos import open_inference_pb2_grpc as pb_grpc
from test_delivery import wait_until

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["age", "income", "tenure", "balance", "products", "visits", "complaints", "discount", "region_score",
         "web_minutes", "calls", "emails", "late_payments", "credit_score", "household", "devices", "plan_age",
         "upgrades", "referrals", "support_tickets"]
SHIFTED = ("visits", "web_minutes")  # columns 5 and 9, which the model does not use: its predictions stay put
TOKENS = {"agents": "names-agents-token-0001", "alice": "names-alice-token-00001", "bob": "names-bob-token-0000001"}
AUTH = (f'[[agent]]\nname = "agents"\ntoken = "{TOKENS["agents"]}"\nagent_ids = ["*"]\n'
        f'[[operator]]\nname = "alice"\nrole = "operator"\ntoken = "{TOKENS["alice"]}"\n'
        f'[[operator]]\nname = "bob"\nrole = "approver"\ntoken = "{TOKENS["bob"]}"\n')


def cli(*args: str, address: str = "127.0.0.1:1", who: str = "alice") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env.update(OUTRIDER_COLLECTOR=address, OUTRIDER_TOKEN=TOKENS[who], PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          encoding="utf-8", timeout=120)


def ok(*args: str, **kw: str) -> str:
    result = cli(*args, **kw)
    assert result.returncode == 0, f"outrider {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def churn_model() -> bytes:
    """A classifier of 20 features that uses only the first three (trained where the others are 0, so their
    weights are exactly 0): a shift of the others is drift in the inputs and none in the predictions."""
    from sklearn.linear_model import LogisticRegression
    from skl2onnx import to_onnx

    x, y = examples.tabular_data(2000, seed=0)
    x[:, 3:] = 0.0
    model = LogisticRegression(max_iter=500).fit(x, y)
    return to_onnx(model, x[:1], options={id(model): {"zipmap": False}}, target_opset=17).SerializeToString()


def write_reference(path: Path, rows: int = 5000) -> None:
    x, y = examples.tabular_data(rows, seed=1)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*NAMES, "churned"])
        writer.writerows([*(f"{v:.9g}" for v in row), int(label)] for row, label in zip(x.tolist(), y))


def infer(stub: pb_grpc.GRPCInferenceServiceStub, model: str, x: np.ndarray) -> None:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    stub.ModelInfer(request, timeout=30)


class Traffic:
    """Requests to each agent until stopped, shifted by one sigma on the SHIFTED columns."""

    def __init__(self, targets: dict[str, str]) -> None:
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(model, address, i), daemon=True)
                        for i, (model, address) in enumerate(targets.items())]
        for thread in self.threads:
            thread.start()

    def _run(self, model: str, address: str, seed: int) -> None:
        shifted = [NAMES.index(c) for c in SHIFTED]
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not self.stop.is_set():
                x, _ = examples.tabular_data(50, seed=int(rng.integers(1 << 30)))
                x[:, shifted] += 1.0
                try:
                    infer(stub, model, x)
                except grpc.RpcError as exc:  # e.g. the managed agent before its version arrived
                    self.errors.append(f"{model}: {exc.code().name}")
                self.stop.wait(0.02)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def latest(model: str, address: str) -> dict:
    (evaluation,) = json.loads(ok("drift", model, "--json", address=address))["latest"]
    return evaluation


def compared(evaluation: dict) -> dict[str, dict]:
    """The columns the evaluation compared: with current rows and a test result (a column it could not
    compare has a NaN p, null in JSON, and a reason)."""
    return {c["name"]: c for c in evaluation.get("columns", []) if c["rows"] and c["p_adjusted"] is not None}


def open_alerts(model: str, address: str) -> set[str]:
    return {a["column"] for a in json.loads(ok("alerts", "--model", model, "--json", address=address))["alerts"]}


@pytest.mark.slow
def test_a_named_csv_reference_lines_up_with_static_and_managed_agents(tmp_path: Path):
    model = tmp_path / "churn.onnx"
    model.write_bytes(churn_model())
    write_reference(tmp_path / "train.csv")
    (tmp_path / "names.txt").write_text(",".join(NAMES) + "\n")
    (tmp_path / "tokens.toml").write_text(AUTH)
    collector, address = start(["collector", "serve", "--db", str(tmp_path / "c.db"), "--listen", "127.0.0.1:0",
                                "--auth-file", str(tmp_path / "tokens.toml"), "--drift-interval", "1"],
                               r"collector listening on (\S+)")
    agent_flags = ["--collector", address, "--token", TOKENS["agents"], "--listen", "127.0.0.1:0",
                   "--window-seconds", "0.5"]
    traffic = None
    procs = [collector]
    try:
        # static: the profile takes its names from the header; the agent is given the same names
        made = ok("profile", "--model", str(model), "--data", str(tmp_path / "train.csv"), "--label", "churned",
                  "--out", str(tmp_path / "train.pb"))
        assert f"columns of input X: {', '.join(NAMES)}" in made
        static, static_address = start(["agent", "serve", "--model", str(model), "--model-name", "static",
                                        "--model-version", "1", "--feature-names", f"@{tmp_path / 'names.txt'}",
                                        "--agent-id", "s1", "--spool-dir", str(tmp_path / "s1"), *agent_flags],
                                       r"serving static version 1 on (\S+)")
        procs.append(static)
        with grpc.insecure_channel(static_address) as channel:  # a first window: attach checks against it
            infer(pb_grpc.GRPCInferenceServiceStub(channel), "static", examples.tabular_data(20)[0])
        wait_until(lambda: json.loads(ok("windows", "--model", "static", "--json", address=address))["windows"],
                   timeout=60, what="the static agent's first window")
        attached = cli("attach", "static", "1", str(tmp_path / "train.pb"), address=address)
        assert attached.returncode == 0 and not attached.stderr, attached.stderr  # checked, and it fits

        # managed: registered with the reference, its names go to the agent with the version
        registered = json.loads(ok("models", "register", "managed", "--file", str(model), "--reference",
                                   str(tmp_path / "train.csv"), "--label", "churned", "--json", address=address))
        assert registered["feature_names"] == {"X": NAMES} and registered["gate_passed"]
        assert f"columns of X: {', '.join(NAMES)}" in ok("models", "show", "managed", "1", address=address)
        request = json.loads(ok("models", "promote", "managed", "1", "--reason", "first", "--json", address=address))
        ok("approve", str(request["id"]), address=address, who="bob")
        managed, managed_address = start(["agent", "serve", "--model-name", "managed", "--agent-id", "m1",
                                          "--spool-dir", str(tmp_path / "m1"), *agent_flags],
                                         r"serving managed \(managed by .*\) on (\S+)")
        procs.append(managed)
        for name in ("static", "managed"):
            ok("drift-config", name, "--set", '{"span_seconds": 2, "consecutive": 2}', address=address)

        traffic = Traffic({"static": static_address, "managed": managed_address})
        for name in ("static", "managed"):  # the names on both sides: every reference column meets its traffic
            wait_until(lambda: compared(latest(name, address)), timeout=120, what=f"an evaluation of {name}")
            columns = {c["name"] for c in latest(name, address)["columns"]}
            assert set(NAMES) <= set(compared(latest(name, address))), (name, columns)
            assert not [c for c in columns if c.startswith("X[")], (name, columns)  # no unnamed traffic columns
        wait_until(lambda: all(set(SHIFTED) <= open_alerts(name, address) for name in ("static", "managed")),
                   timeout=240, what="drift alerts on the shifted named columns")
        for name in ("static", "managed"):  # those two only, in the alerts and in the evaluation
            assert open_alerts(name, address) == set(SHIFTED), name
            drifted = {c["name"] for c in latest(name, address)["columns"] if c.get("drifted")}
            assert drifted == set(SHIFTED), (name, drifted)
        traffic.close()
        assert not [e for e in traffic.errors if e.startswith("static")], traffic.errors
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            assert exit_code(proc) == 0
    finally:
        if traffic is not None:
            traffic.close()


# ------------------------------------------------------------------ the agent's side, quickly


def agent_serve(lr_model: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "agent.cli", "agent", "serve", "--listen", "127.0.0.1:0", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("names, words", [
    ("a,b,c", "3 feature names given for input 'X', which has 20 columns"),
    ('{"Y": ["a"]}', "the model's inputs are ['X']"),
    ("a,,b", "name 2 is empty"),
    ("@no-such-file.txt", "cannot read no-such-file.txt"),
    ('{"X": [1, 2]}', "name 1 is int"),
    (",".join(["label"] + [f"f{i}" for i in range(19)]), "[label] would be used twice"),
])
def test_serve_refuses_names_that_do_not_fit_with_one_line(lr_model: Path, names: str, words: str):
    result = agent_serve(lr_model, "--model", str(lr_model), "--feature-names", names)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "--feature-names" in lines[0], result.stderr


def test_a_managed_agent_takes_its_names_from_the_registry(lr_model: Path):
    result = agent_serve(lr_model, "--model-name", "churn", "--collector", "127.0.0.1:1", "--feature-names", "a")
    assert result.returncode == 2 and "drop --feature-names" in result.stderr, result.stderr


def test_the_library_checks_names_where_they_are_given(lr_model: Path):
    names = [f"f{i}" for i in range(20)]
    with MonitoredSession(str(lr_model), feature_names={"X": names}, summarizer="thread", window_seconds=None) as sess:
        sess.run(None, {"X": np.zeros((2, 20), np.float32)})
    assert [c.name for c in sess.sink.windows[0].columns][:20] == names
    with pytest.raises(InvalidArgument, match="3 feature names given for input 'X', which has 20 columns"):
        MonitoredSession(str(lr_model), feature_names=["a", "b", "c"], summarizer="thread")
    with pytest.raises(InvalidArgument, match="repeats"):
        MonitoredSession(str(lr_model), feature_names=["a"] * 20, summarizer="thread")
