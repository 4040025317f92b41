"""``outrider demo``: the whole story on loopback, with real processes and the real CLI.

A collector (with its web page) and two agents started with only the model's
name; a model built locally (scikit-learn -> ONNX) is registered with its
reference data, passes the evaluation gate, is promoted by one person and
approved by another; the agents fetch it and serve traffic; the traffic
drifts, the drift alert opens, a retraining request appears with its
evidence; a retrained version is registered, shadowed, promoted; then a bad
version is promoted and rolled back; finally the audit trail is verified.
Every step prints the command an operator would type. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

MODEL = "demo-classifier"
SHIFT_SIGMA = 1.5  # how far feature X[0] moves when the world drifts
ROOT = Path(__file__).resolve().parents[1]
TOKENS = {"agents": "demo-agent-token-0001", "alice": "demo-alice-token-0001",
          "bob": "demo-bob-token-00001", "viewer": "demo-viewer-token-01"}
AUTH_FILE = f"""# the demo's identities: agents, an operator, an approver, a read-only viewer
[[agent]]
name = "demo-agents"
token = "{TOKENS['agents']}"
agent_ids = ["demo-agent-*"]   # the agent ids this token may speak for
models = ["{MODEL}"]           # and the models it may send windows for

[[operator]]
name = "alice"
role = "operator"
token = "{TOKENS['alice']}"

[[operator]]
name = "bob"
role = "approver"
token = "{TOKENS['bob']}"

[[operator]]
name = "viewer"
role = "viewer"
token = "{TOKENS['viewer']}"
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="the whole story on loopback: register, approve, serve, drift, retrain, "
                                           "shadow, promote, roll back, audit", description=__doc__)
    p.add_argument("--http", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="where the collector's web page listens (default: %(default)s; port 0 picks a free one)")
    p.add_argument("--no-wait", action="store_true",
                   help="exit at the end instead of keeping the collector, its web page and the agents up "
                        "until Ctrl-C")
    p.add_argument("--fast", action="store_true", help="shorter waits and windows, and exit at the end "
                                                       "(as the tests use)")
    p.set_defaults(func=run)


def free_or_any(listen: str) -> str:
    """``listen`` when it can be bound now, else the same host with port 0 (a free one), said aloud:
    a second demo, or anything else on 8080, must not stop the first step."""
    import socket

    host, _, port = listen.rpartition(":")
    with socket.socket() as probe:
        try:
            probe.bind((host, int(port)))
            return listen
        except OSError:
            print(f"  ({listen} is in use; the web page takes a free port instead)", flush=True)
            return f"{host}:0"


def outrider(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["PYTHONIOENCODING"] = "utf-8"
    # The servers' event log would drown the story; warnings and errors still show.
    env["OUTRIDER_AGENT_LOG_LEVEL"] = env["OUTRIDER_COLLECTOR_LOG_LEVEL"] = "warning"
    return {**env, **extra}


def start(args: list[str], patterns: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    """Start an ``outrider`` process; wait for the lines that give its addresses (in any order)."""
    print("  $ outrider " + " ".join(args), flush=True)
    proc = subprocess.Popen(outrider(*args), stdout=subprocess.PIPE, text=True, env=env)
    found: dict[int, str] = {}
    for line in proc.stdout:  # type: ignore[union-attr]
        for i, pattern in enumerate(patterns):
            match = re.search(pattern, line)
            if match and i not in found:
                found[i] = match.group(1)
        if len(found) == len(patterns):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
            return proc, [found[i] for i in range(len(patterns))]
    raise SystemExit(f"outrider {' '.join(args[:2])} exited with code {proc.wait()} before it was ready")


class Traffic:
    """Clients of both agents, all the time: OIP requests, and the true label of each row a little later
    through the agents' FeedbackService. ``shift`` moves X[0]; failed requests are counted, never hidden."""

    def __init__(self, addresses: list[str], seed: int = 42) -> None:
        import grpc

        from protos import agent_pb2_grpc
        from protos import open_inference_pb2_grpc as pb_grpc

        self.channels = [grpc.insecure_channel(a) for a in addresses]
        self.infer = [pb_grpc.GRPCInferenceServiceStub(c) for c in self.channels]
        self.feedback = [agent_pb2_grpc.FeedbackServiceStub(c) for c in self.channels]
        self.rng = np.random.default_rng(seed)
        self.shift = 0.0
        self.sent = self.failed = self.calls = 0
        self.versions: dict[str, int] = {}  # model version that answered -> requests
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import grpc

        from protos import agent_pb2
        from protos import open_inference_pb2 as pb

        while not self._stop.is_set():
            n = int(self.rng.integers(1, 33))
            x = self.rng.standard_normal((n, 20)).astype(np.float32)
            x[:, 0] += self.shift
            y = (x[:, 0] + 0.5 * x[:, 1] - 0.25 * x[:, 2] + 0.3 * self.rng.standard_normal(n) > 0).astype(int)
            k = self.calls % len(self.infer)
            rid = f"demo-{self.calls}"
            request = pb.ModelInferRequest(model_name=MODEL, id=rid)
            request.inputs.add(name="X", datatype="FP32", shape=[n, 20])
            request.raw_input_contents.append(x.astype("<f4").tobytes())
            self.calls += 1
            try:
                reply = self.infer[k].ModelInfer(request, timeout=10)
                self.versions[reply.model_version] = self.versions.get(reply.model_version, 0) + 1
                self.sent += n
                labels = [agent_pb2.Label(request_id=rid, row=j, class_label=str(y[j])) for j in range(n)]
                self.feedback[k].Feedback(agent_pb2.FeedbackRequest(labels=labels), timeout=10)
            except grpc.RpcError as exc:
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append(f"{exc.code().name}: {exc.details()}")
            time.sleep(0.003)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        for c in self.channels:
            c.close()


class Story:
    """The operators' side: the CLI as alice (operator) and bob (approver), and waits on the collector."""

    def __init__(self, tmp: Path, collector: str, fast: bool) -> None:
        import grpc

        from protos import collector_pb2_grpc

        self.tmp, self.collector, self.fast = tmp, collector, fast
        self.channel = grpc.insecure_channel(collector)
        self.ops = collector_pb2_grpc.OpsServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {TOKENS['alice']}"),)
        self.step_number = 0

    def step(self, title: str) -> None:
        self.step_number += 1
        print(f"\n── {self.step_number}. {title}", flush=True)

    def cli(self, who: str, *args: str, check: bool = True) -> str:
        """Run ``outrider ARGS`` as ``who``; print the command and its output, indented."""
        shown = " ".join(a if " " not in a else repr(a) for a in args)
        print(f"  [{who}] $ outrider {shown}", flush=True)
        result = subprocess.run(outrider(*args), env=_env(OUTRIDER_COLLECTOR=self.collector,
                                                          OUTRIDER_TOKEN=TOKENS[who]),
                                capture_output=True, encoding="utf-8", timeout=300)
        for line in (result.stdout + result.stderr).rstrip().splitlines():
            print(f"      {line}", flush=True)
        if check and result.returncode != 0:
            raise SystemExit(f"demo: 'outrider {shown}' failed with exit code {result.returncode}")
        return result.stdout

    def wait(self, what: str, check: Callable[[], object], timeout: float = 180.0) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.5)
        raise SystemExit(f"demo: gave up waiting for {what} after {timeout:.0f} s")

    # --- what the collector knows, through the OpsService ------------------------------------------
    def agents_serving(self, version: str) -> bool:
        from protos import collector_pb2

        agents = [a for a in self.ops.Status(collector_pb2.StatusRequest(), metadata=self.metadata,
                                             timeout=10).agents if a.connected and a.model_name == MODEL]
        return len(agents) == 2 and all(a.model_version == version for a in agents)

    def open_alerts(self) -> list:
        from protos import collector_pb2

        return list(self.ops.ListAlerts(collector_pb2.ListAlertsRequest(), metadata=self.metadata,
                                        timeout=10).alerts)

    def retraining(self) -> list:
        from protos import collector_pb2

        return list(self.ops.ListRetraining(collector_pb2.ListRetrainingRequest(model_name=MODEL),
                                            metadata=self.metadata, timeout=10).requests)

    def pending(self, kind: str = "promote") -> list:
        from protos import collector_pb2

        return [a for a in self.ops.ListApprovals(collector_pb2.ListApprovalsRequest(model_name=MODEL),
                                                  metadata=self.metadata, timeout=10).approvals
                if (a.kind or "promote") == kind]

    def promote(self, version: int, reason: str) -> None:
        self.cli("alice", "models", "promote", MODEL, str(version), "--reason", reason)
        approval = self.pending()[-1]
        print("      alice cannot approve her own request; bob (approver) does:", flush=True)
        self.cli("bob", "approve", str(approval.id))

    def close(self) -> None:
        self.channel.close()


def train(tmp: Path, name: str, shift: float, seed: int, flip: bool = False,
          honest_holdout: bool = True) -> tuple[Path, Path, Path]:
    """A logistic regression on data whose X[0] is moved by ``shift`` (the label follows the same rule as
    the demo's traffic); its reference and holdout files. ``flip`` is a pipeline bug that swaps the labels
    it trains on; with ``honest_holdout=False`` the bug reaches the holdout too, so the gate cannot see it."""
    from sklearn.linear_model import LogisticRegression

    from agent import examples

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6_000, 20)).astype(np.float32)
    x[:, 0] += shift
    y = (x[:, 0] + 0.5 * x[:, 1] - 0.25 * x[:, 2] + 0.3 * rng.standard_normal(len(x)) > 0).astype(np.int64)
    seen_y = 1 - y if flip else y  # the labels the pipeline believes
    model = LogisticRegression(max_iter=500).fit(x[:4000], seen_y[:4000])
    path = tmp / f"{name}.onnx"
    path.write_bytes(examples._to_onnx(model, x[:1], zipmap=False))
    reference, holdout = tmp / f"{name}-reference.npz", tmp / f"{name}-holdout.npz"
    np.savez(reference, X=x[:4000], label=seen_y[:4000])
    np.savez(holdout, X=x[4000:], label=(y if honest_holdout else seen_y)[4000:])
    return path, reference, holdout


def run(args: argparse.Namespace) -> int:
    window = "0.5" if args.fast else "1"
    procs: list[subprocess.Popen] = []
    traffic: Traffic | None = None
    with tempfile.TemporaryDirectory(prefix="outrider-demo-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "tokens.toml").write_text(AUTH_FILE)
        env = _env()
        try:
            print("outrider demo: a collector, two agents and two people (alice, operator; bob, approver), "
                  "all on 127.0.0.1\n", flush=True)
            (collector, web), = [start(
                ["collector", "serve", "--db", str(tmp / "outrider.db"), "--listen", "127.0.0.1:0",
                 "--auth-file", str(tmp / "tokens.toml"), "--http", free_or_any(args.http), "--drift-interval", "1",
                 "--retrain-after-evaluations", "2", "--rollup-interval", "5"],
                [r"collector listening on (\S+)", r"web page on (\S+)"], env)]
            procs.append(collector)
            address, url = web
            story = Story(tmp, address, args.fast)
            print(f"\n  web page: {url}  (log in with the viewer token {TOKENS['viewer']})", flush=True)

            story.step("build a model and register it with its reference data and a labelled holdout")
            v1, ref1, hold1 = train(tmp, "v1", 0.0, seed=1)
            story.cli("alice", "models", "register", MODEL, "--file", str(v1), "--reference", str(ref1),
                      "--holdout", str(hold1))
            story.cli("alice", "drift-config", MODEL, "--set", '{"span_seconds": 4, "consecutive": 2}')

            story.step("promote it: alice requests, bob approves (two people, both in the audit trail)")
            story.promote(1, "first release")

            story.step("two agents start with only the model's name; they fetch the production version")
            addresses = []
            for agent_id in ("demo-agent-1", "demo-agent-2"):
                proc, (agent_address,) = start(
                    ["agent", "serve", "--model-name", MODEL, "--listen", "127.0.0.1:0", "--window-seconds", window,
                     "--collector", address, "--token", TOKENS["agents"], "--agent-id", agent_id,
                     "--spool-dir", str(tmp / f"spool-{agent_id}")], [r"serving .* on (\S+)\s*$"], env)
                procs.append(proc)
                addresses.append(agent_address)
            story.wait("both agents to serve version 1", lambda: story.agents_serving("1"))
            traffic = Traffic(addresses)
            story.cli("viewer", "status")

            story.step(f"traffic drifts: X[0] moves by {SHIFT_SIGMA} sigma")
            time.sleep(3 if args.fast else 8)
            traffic.shift = SHIFT_SIGMA
            alerts = story.wait("the drift alert", lambda: [a for a in story.open_alerts() if a.column == "X[0]"])
            print(f"      alert opened on {alerts[0].column} (see {url}models/{MODEL})", flush=True)
            story.cli("viewer", "drift", MODEL)

            story.step("the drift lasts: the collector opens a retraining request with the evidence")
            request = story.wait("the retraining request", story.retraining)[0]
            story.cli("viewer", "retrain", "show", str(request.id))
            story.cli("alice", "retrain", "accept", str(request.id), "--reason", "training pipeline picked it up")

            story.step("the pipeline trains version 2 on recent data; it is registered, gated, shadowed")
            v2, ref2, hold2 = train(tmp, "v2", SHIFT_SIGMA, seed=2)
            story.cli("alice", "models", "register", MODEL, "--file", str(v2), "--reference", str(ref2),
                      "--holdout", str(hold2))
            story.cli("alice", "models", "stage", MODEL, "2", "staging", "--reason", "retrained on drifted data")
            story.cli("alice", "shadow", "start", MODEL, "2", "--share", "0.5", "--reason", "compare before promoting")
            time.sleep(3 if args.fast else 8)
            story.cli("viewer", "shadow", "report", MODEL)
            print(f"      (plots: {url}models/{MODEL})", flush=True)
            story.cli("alice", "shadow", "stop", MODEL, "--reason", "seen enough")

            story.step("promote version 2; the agents swap between requests, none fails")
            story.promote(2, "retrained after drift")
            story.wait("both agents to serve version 2", lambda: story.agents_serving("2"))
            story.cli("alice", "retrain", "complete", str(request.id), "--version", "2")

            story.step("version 3 was trained with flipped labels: the gate fails it, it cannot be promoted")
            v3, ref3, hold3 = train(tmp, "v3", SHIFT_SIGMA, seed=3, flip=True)
            story.cli("alice", "models", "register", MODEL, "--file", str(v3), "--reference", str(ref3),
                      "--holdout", str(hold3), check=False)
            story.cli("alice", "models", "promote", MODEL, "3", "--reason", "try it", check=False)

            story.step("version 4 has the same bug, but it reached its holdout too: the gate passes it, "
                       "and it is promoted")
            v4, ref4, hold4 = train(tmp, "v4", SHIFT_SIGMA, seed=4, flip=True, honest_holdout=False)
            story.cli("alice", "models", "register", MODEL, "--file", str(v4), "--reference", str(ref4),
                      "--holdout", str(hold4))
            story.promote(4, "small improvement")
            story.wait("both agents to serve version 4", lambda: story.agents_serving("4"))

            story.step("the labels coming back show it: realised accuracy collapses, and version 4 is rolled back")
            story.wait("the performance alert on version 4",
                       lambda: [a for a in story.open_alerts() if a.column == "performance" and a.model_version == "4"])
            requested = story.wait("a rollback request from the collector's policy",
                                   lambda: story.pending("rollback"), timeout=20 if args.fast else 60)
            story.cli("viewer", "approvals", "list")
            story.cli("bob", "approve", str(requested[0].id))
            story.wait("both agents back on version 2", lambda: story.agents_serving("2"))
            story.cli("viewer", "rollouts", MODEL)
            print(f"      (and on {url}approvals)", flush=True)

            story.step("the audit trail: every change above, who made it, hash-chained")
            story.cli("viewer", "audit", "--model", MODEL, "--limit", "8")
            print(f"      (all of it: {url}audit)", flush=True)
            story.cli("viewer", "audit", "verify")
            traffic.stop()
            print(f"\nrequests: {traffic.calls}; rows: {traffic.sent}; failed: {traffic.failed}; "
                  f"answered by version: {json.dumps(dict(sorted(traffic.versions.items())))}", flush=True)
            for error in traffic.errors:
                print(f"  failed request: {error}", flush=True)
            if not (args.fast or args.no_wait):
                print(f"\neverything keeps running so you can look around: {url} (viewer token "
                      f"{TOKENS['viewer']}); the CLI works too, e.g.\n  OUTRIDER_COLLECTOR={address} "
                      f"OUTRIDER_TOKEN={TOKENS['viewer']} .venv/bin/outrider status\nCtrl-C to stop.", flush=True)
                while collector.poll() is None:  # not wait(): Ctrl-C must reach us from whichever thread got it
                    time.sleep(0.2)
            story.close()
        except KeyboardInterrupt:
            return 130
        finally:
            if traffic is not None:
                traffic.stop()
            # agents first: each flushes its last window to the collector, which then stops
            for group in (procs[1:], procs[:1]):
                for proc in group:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                for proc in group:
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    return 0
