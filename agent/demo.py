"""``outrider demo``: build a model, serve it over the Open Inference Protocol, send
traffic (which drifts half way), and print each window summary as it closes.

Everything is local: the model is trained here with scikit-learn and converted
with skl2onnx; the server listens on loopback; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from protos import summary_pb2

SHIFT_SIGMA = 1.5  # how far feature X[0] moves in the second half of the demo


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="serve a locally built model, send traffic, print live window summaries",
                              description=__doc__)
    p.add_argument("--seconds", type=float, default=20.0, help="how long to send traffic (default: %(default)s)")
    p.add_argument("--window-seconds", type=float, default=2.0, help="window length (default: %(default)s)")
    p.add_argument("--fast", action="store_true", help="a short run (4 s, 0.5 s windows), as the tests use")
    p.set_defaults(func=run)


class WindowTable:
    """Prints one line per closed window: volume, latency, a few features, the predictions."""

    COLUMNS = ("seq", "rows", "calls", "dropped", "lat p50 µs", "lat p99 µs",
               "X[0] mean", "X[0] p90", "X[1] mean", "label=1 %", "P(1) mean")

    def __init__(self, out=sys.stdout) -> None:
        self.out = out
        self.count = 0

    def header(self) -> None:
        print("  ".join(f"{c:>10}" for c in self.COLUMNS), file=self.out, flush=True)

    def export(self, window: summary_pb2.WindowSummary) -> None:
        from agent import sketches

        cols = {c.name: sketches.from_proto(c) for c in window.columns}
        lat = sketches.NumericSketch.from_proto(window.latency).quantiles([0.5, 0.99])
        labels = dict(cols["label"].frequent_items())
        share = 100.0 * labels.get("1", 0) / max(1, cols["label"].count)
        x0 = cols["X[0]"]
        cells = (window.seq, window.rows, window.calls, window.dropped_rows, lat[0], lat[1],
                 x0.mean, x0.quantiles([0.9])[0] if x0.finite_count else float("nan"),
                 cols["X[1]"].mean, share, cols["probabilities[1]"].mean)
        print("  ".join(f"{c:>10}" if isinstance(c, int) else f"{c:>10.2f}" for c in cells),
              file=self.out, flush=True)
        self.count += 1


def send_traffic(address: str, model_name: str, seconds: float, stop: threading.Event) -> int:
    """One OIP client: batches of 1-32 rows; X[0] shifts by SHIFT_SIGMA after half the time."""
    import grpc

    from protos import open_inference_pb2 as pb
    from protos import open_inference_pb2_grpc as pb_grpc

    rng = np.random.default_rng(42)
    sent = 0
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        start = time.monotonic()
        while not stop.is_set() and (elapsed := time.monotonic() - start) < seconds:
            n = int(rng.integers(1, 33))
            x = rng.standard_normal((n, 20)).astype(np.float32)
            if elapsed > seconds / 2:
                x[:, 0] += SHIFT_SIGMA
            request = pb.ModelInferRequest(model_name=model_name, id=f"demo-{sent}")
            request.inputs.add(name="X", datatype="FP32", shape=[n, 20])
            request.raw_input_contents.append(x.astype("<f4").tobytes())
            stub.ModelInfer(request, timeout=10)
            sent += n
            time.sleep(0.002)
    return sent


def run(args: argparse.Namespace) -> int:
    from agent import MonitoredSession, examples
    from agent.server import serve

    seconds, window = (4.0, 0.5) if args.fast else (args.seconds, args.window_seconds)
    print("outrider demo: training a 20-feature logistic regression locally (scikit-learn -> ONNX)", flush=True)
    with tempfile.TemporaryDirectory(prefix="outrider-demo-") as tmp:
        path = Path(tmp) / "demo-classifier.onnx"
        path.write_bytes(examples.logistic_regression())
        table = WindowTable()
        session = MonitoredSession(path, model_name="demo-classifier", model_version="1",
                                   window_seconds=window, sink=table, summarizer="auto")
        server = serve(session, "demo-classifier", "1", "127.0.0.1:0")
        print(f"serving demo-classifier v1 over the Open Inference Protocol on {server.address}; "
              f"sending {seconds:.0f} s of traffic, X[0] shifts by {SHIFT_SIGMA} sigma half way\n", flush=True)
        table.header()
        stop = threading.Event()
        try:
            sent = send_traffic(server.address, "demo-classifier", seconds, stop)
        except KeyboardInterrupt:
            stop.set()
            sent = -1
        finally:
            server.stop(grace=2.0)  # closes the session: the last partial window is flushed
        stats = session.stats()
    print(f"\nrows sent: {sent}; summarised: {stats['rows_summarised']}; dropped: {stats['dropped_rows']}; "
          f"errors: {stats['errors']}; windows: {table.count}")
    return 0
