"""``outrider demo``: a collector and two agents on loopback, real traffic, the collector's view.

Builds a classifier locally (scikit-learn -> ONNX), starts ``outrider collector
serve`` and two ``outrider agent serve --collector ...`` processes, sends Open
Inference Protocol traffic to both (feature X[0] drifts half way), prints each
window as the collector stores it, then stops the agents (their last windows
are flushed and delivered) and shows ``outrider status``. Nothing is
downloaded; everything listens on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from protos import summary_pb2

SHIFT_SIGMA = 1.5  # how far feature X[0] moves in the second half of the demo
MODEL = "demo-classifier"
ROOT = Path(__file__).resolve().parents[1]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="a collector and two agents on loopback: traffic, drift, the collector's view",
                              description=__doc__)
    p.add_argument("--seconds", type=float, default=20.0, help="how long to send traffic (default: %(default)s)")
    p.add_argument("--window-seconds", type=float, default=2.0, help="window length (default: %(default)s)")
    p.add_argument("--fast", action="store_true", help="a short run (5 s, 0.5 s windows), as the tests use")
    p.set_defaults(func=run)


class WindowTable:
    """Prints one line per stored window: volume, latency, a few features, the predictions."""

    COLUMNS = ("agent", "seq", "rows", "calls", "dropped", "lat p50 µs", "lat p99 µs",
               "X[0] mean", "X[0] p90", "X[1] mean", "label=1 %", "P(1) mean")

    def __init__(self, agents: list[str], out=sys.stdout) -> None:
        self.agents, self.out = agents, out
        self.count = 0

    def header(self) -> None:
        print("  ".join(f"{c:>10}" for c in self.COLUMNS), file=self.out, flush=True)

    def export(self, window: summary_pb2.WindowSummary) -> None:
        from agent import sketches

        if not window.rows:
            return  # an agent's first window can be empty: it started before the traffic
        cols = {c.name: sketches.from_proto(c) for c in window.columns}
        lat = sketches.NumericSketch.from_proto(window.latency).quantiles([0.5, 0.99])
        labels = dict(cols["label"].frequent_items())
        share = 100.0 * labels.get("1", 0) / max(1, cols["label"].count)
        x0 = cols["X[0]"]
        cells = (self.agents.index(window.agent_id) + 1, window.seq, window.rows, window.calls, window.dropped_rows,
                 lat[0], lat[1], x0.mean, x0.quantiles([0.9])[0] if x0.finite_count else float("nan"),
                 cols["X[1]"].mean, share, cols["probabilities[1]"].mean)
        print("  ".join(f"{c:>10}" if isinstance(c, int) else f"{c:>10.2f}" for c in cells),
              file=self.out, flush=True)
        self.count += 1


def outrider(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def start(args: list[str], pattern: str) -> tuple[subprocess.Popen, str]:
    """Start an ``outrider`` process; wait for the line that gives its address."""
    print("  $ outrider " + " ".join(args), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(outrider(*args), stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # type: ignore[union-attr]
        match = re.search(pattern, line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
            return proc, match.group(1)
    raise SystemExit(f"outrider {args[0]} exited with code {proc.wait()} before it was ready")


def send_traffic(addresses: list[str], seconds: float, stop: threading.Event) -> int:
    """One OIP client alternating between agents: batches of 1-32 rows; X[0] shifts after half the time."""
    import grpc

    from protos import open_inference_pb2 as pb
    from protos import open_inference_pb2_grpc as pb_grpc

    rng = np.random.default_rng(42)
    channels = [grpc.insecure_channel(a) for a in addresses]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
    sent, calls, start = 0, 0, time.monotonic()
    try:
        while not stop.is_set() and (elapsed := time.monotonic() - start) < seconds:
            n = int(rng.integers(1, 33))
            x = rng.standard_normal((n, 20)).astype(np.float32)
            if elapsed > seconds / 2:
                x[:, 0] += SHIFT_SIGMA
            request = pb.ModelInferRequest(model_name=MODEL, id=f"demo-{calls}")
            request.inputs.add(name="X", datatype="FP32", shape=[n, 20])
            request.raw_input_contents.append(x.astype("<f4").tobytes())
            stubs[calls % len(stubs)].ModelInfer(request, timeout=10)
            sent, calls = sent + n, calls + 1
            time.sleep(0.002)
    finally:
        for c in channels:
            c.close()
    return sent


class CollectorView:
    """Polls the collector's OpsService for new windows and prints them as they are stored."""

    def __init__(self, address: str, table: WindowTable) -> None:
        import grpc

        from protos import collector_pb2_grpc

        self.channel = grpc.insecure_channel(address)
        self.ops = collector_pb2_grpc.OpsServiceStub(self.channel)
        self.table = table
        self.seen: set[tuple[str, str, int]] = set()

    def poll(self) -> None:
        from protos import collector_pb2

        reply = self.ops.ListWindows(collector_pb2.ListWindowsRequest(
            model_name=MODEL, limit=10_000, include_summaries=True), timeout=10)
        for info in sorted(reply.windows, key=lambda w: (w.end_unix_nano, w.agent_id)):
            key = (info.agent_id, info.run_id, info.seq)
            if info.level == "raw" and key not in self.seen:
                self.seen.add(key)
                self.table.export(info.summary)

    def stored_rows(self) -> tuple[int, int, int]:
        from protos import collector_pb2

        models = self.ops.Status(collector_pb2.StatusRequest(), timeout=10).models
        m = [m for m in models if m.model_name == MODEL]
        return sum(x.rows for x in m), sum(x.dropped_rows for x in m), sum(x.errors for x in m)


def run(args: argparse.Namespace) -> int:
    from agent import examples

    seconds, window = (5.0, 0.5) if args.fast else (args.seconds, args.window_seconds)
    print("outrider demo: training a 20-feature logistic regression locally (scikit-learn -> ONNX)", flush=True)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="outrider-demo-") as tmp:
        model = Path(tmp) / f"{MODEL}.onnx"
        model.write_bytes(examples.logistic_regression())
        print("starting a collector and two agents:", flush=True)
        try:
            collector, collector_addr = start(["collector", "serve", "--db", str(Path(tmp) / "demo.db"),
                                               "--listen", "127.0.0.1:0"], r"collector listening on (\S+)")
            procs.append(collector)
            agent_ids = ["demo-agent-1", "demo-agent-2"]
            addresses = []
            for agent_id in agent_ids:
                proc, address = start(
                    ["agent", "serve", "--model", str(model), "--model-name", MODEL, "--model-version", "1",
                     "--listen", "127.0.0.1:0", "--window-seconds", str(window), "--collector", collector_addr,
                     "--agent-id", agent_id, "--spool-dir", str(Path(tmp) / f"spool-{agent_id}")],
                    rf"serving {MODEL} version 1 on (\S+)")
                procs.append(proc)
                addresses.append(address)
            print(f"\nsending {seconds:.0f} s of traffic to both agents; X[0] shifts by {SHIFT_SIGMA} sigma half way."
                  f"\nwindows as the collector stores them:\n", flush=True)
            table = WindowTable(agent_ids)
            table.header()
            view = CollectorView(collector_addr, table)
            stop = threading.Event()
            result: list[int] = []
            sender = threading.Thread(target=lambda: result.append(send_traffic(addresses, seconds, stop)))
            sender.start()
            while sender.is_alive():
                sender.join(0.5)
                view.poll()
            for proc in procs[1:]:  # SIGTERM: each agent flushes its open window and delivers it
                proc.send_signal(signal.SIGTERM)
            for proc in procs[1:]:
                proc.wait(60)
            view.poll()
            print(f"\n  $ outrider status --collector {collector_addr}", flush=True)
            subprocess.run(outrider("status", "--collector", collector_addr), check=False)
            stored, dropped, errors = view.stored_rows()
            view.channel.close()
        except KeyboardInterrupt:
            stop.set()
            return 130
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    sent = result[0] if result else -1
    print(f"\nrows sent: {sent}; stored by the collector: {stored}; dropped: {dropped}; "
          f"errors: {errors}; windows: {table.count}")
    return 0
