"""Soak: memory of agent and collector, and the database size, under continuous load.

    python benchmarks/soak.py [--seconds 120] [--json]

Starts a real collector (short retention so rollups reach their horizon within
the run: raw windows 10 s, minute buckets 30 s, hour buckets 60 s, day buckets
90 s, rollups every 2 s) and a real agent with 0.2 s windows, then sends OIP
traffic from this process for ``--seconds``. Every few seconds it samples the
resident memory (VmRSS) of both processes and the database's size (main file +
WAL). Reported: the samples, and first-half vs second-half maxima, which should
match once the retention horizon is reached (memory and disk flat).
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import examples  # noqa: E402


def start(args: list[str], pattern: str) -> tuple[subprocess.Popen, str]:
    """Start an ``outrider`` subprocess and wait for the line that gives its address."""
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in proc.stdout:  # type: ignore[union-attr]
        match = re.search(pattern, line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
            return proc, match.group(1)
    raise RuntimeError(f"{args[0]} exited before it was ready")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mb(pid: int) -> float:
    """The agent's RSS plus its summary helper process's."""
    total = rss_mb(pid)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        total += rss_mb(int(child))
    return total


def traffic(address: str, stop: threading.Event, counter: list[int]) -> None:
    import grpc

    from protos import open_inference_pb2 as pb
    from protos import open_inference_pb2_grpc as pb_grpc

    rng = np.random.default_rng(0)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not stop.is_set():
            n = int(rng.integers(1, 65))
            x = rng.standard_normal((n, 20)).astype("<f4")
            request = pb.ModelInferRequest(model_name="soak")
            request.inputs.add(name="X", datatype="FP32", shape=[n, 20])
            request.raw_input_contents.append(x.tobytes())
            stub.ModelInfer(request, timeout=10)
            counter[0] += n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="outrider-soak-") as tmp:
        db = Path(tmp) / "soak.db"
        model = Path(tmp) / "soak.onnx"
        model.write_bytes(examples.logistic_regression())
        collector, collector_addr = start(
            ["collector", "serve", "--db", str(db), "--listen", "127.0.0.1:0", "--raw-retention", "10",
             "--minute-retention", "30", "--hour-retention", "60", "--day-retention", "90",
             "--rollup-interval", "2"], r"collector listening on (\S+)")
        agent, agent_addr = start(
            ["agent", "serve", "--model", str(model), "--model-name", "soak", "--listen", "127.0.0.1:0",
             "--window-seconds", "0.2", "--collector", collector_addr, "--spool-dir", str(Path(tmp) / "spool")],
            r"serving soak version \S+ on (\S+)")
        stop, counter = threading.Event(), [0]
        sender = threading.Thread(target=traffic, args=(agent_addr, stop, counter), daemon=True)
        sender.start()
        samples = []
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < args.seconds:
                time.sleep(min(5.0, args.seconds / 20))
                elapsed = time.monotonic() - t0
                db_bytes = sum(p.stat().st_size for p in Path(tmp).glob("soak.db*"))
                samples.append({"t": round(elapsed, 1), "rows": counter[0],
                                "agent_rss_mb": round(tree_rss_mb(agent.pid), 1),
                                "collector_rss_mb": round(rss_mb(collector.pid), 1),
                                "db_mb": round(db_bytes / 2**20, 2)})
                if not args.json:
                    print(samples[-1], flush=True)
        finally:
            stop.set()
            sender.join(10)
            for proc in (agent, collector):
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    half = len(samples) // 2
    summary = {key: {"first_half_max": max(s[key] for s in samples[:half]),
                     "second_half_max": max(s[key] for s in samples[half:])}
               for key in ("agent_rss_mb", "collector_rss_mb", "db_mb")}
    if args.json:
        print(json.dumps({"samples": samples, "summary": summary}, indent=2))
    else:
        print(f"rows served: {counter[0]:,} in {args.seconds:.0f} s")
        for key, v in summary.items():
            print(f"{key:18} first half max {v['first_half_max']:>8}   second half max {v['second_half_max']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
