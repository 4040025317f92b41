"""Throughput of `agent serve --processes N` against one process, under the same clients.

    python benchmarks/processes.py [--processes 1,2] [--clients 4] [--threads 4] [--seconds 15] [--rounds 2]
                                   [--batch 1] [--model lr|forest] [--client python|cpp] [--json]

Per round and variant a real ``outrider agent serve`` (monitored: summary helper per process, no
collector) serves the model; ``--clients`` client processes with ``--threads`` threads each (every
thread on its own connection: the kernel spreads connections, not requests, over the processes
sharing the port) call ModelInfer back to back for ``--seconds``. Reported per variant (median of
rounds, variants alternating): requests/s, p50 and p99 latency seen by the clients, and the CPU of
the agent's processes (supervisor, serving processes, helpers) per request, and the clients' own CPU
per request (each client process over its timed part). ``--client python`` (the default): Python
processes on grpcio; ``--client cpp``: ``benchmarks/loadgen.py``'s compiled client (built on demand),
the same processes x connections, for a small share of the CPU. The clients run on the same 2 cores
and take their share: the figures are ratios between variants under the same load, not the
machine's ceiling.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import examples  # noqa: E402
from benchmarks import loadgen  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")

CLIENT = r"""
import sys, threading, time
import grpc
import numpy as np
from protos import open_inference_pb2 as pb, open_inference_pb2_grpc as pb_grpc
address, threads, seconds, batch, width = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
request_id = sys.argv[6] if len(sys.argv) > 6 else ""  # every request under one id (proxy.py), or none
x = np.random.default_rng(0).standard_normal((batch, width)).astype("<f4").tobytes()
request = pb.ModelInferRequest(model_name="bench", id=request_id)
request.inputs.add(name="X", datatype="FP32", shape=[batch, width])
request.raw_input_contents.append(x)
latencies, failed = [], [0]
start = threading.Barrier(threads + 1)
def run():
    # its own connection: gRPC would otherwise share one between channels to the same target
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as err:  # the warm-up call: the server cannot take these requests; stop every thread
            print(f"the first request to {address} failed: {err.code().name} {err.details()}", file=sys.stderr)
            start.abort()
            return
        mine = []
        try:
            start.wait()
        except threading.BrokenBarrierError:
            return
        end = time.monotonic() + seconds
        while (t0 := time.monotonic()) < end:
            try:
                stub.ModelInfer(request, timeout=30)
                mine.append(time.monotonic() - t0)
            except grpc.RpcError:  # counted, not timed
                failed[0] += 1
        latencies.extend(mine)
workers = [threading.Thread(target=run) for _ in range(threads)]
for w in workers: w.start()
try:
    start.wait()
except threading.BrokenBarrierError:
    sys.exit(1)
cpu0 = time.process_time()  # this process's CPU, every thread, over the timed part
for w in workers: w.join()
print(failed[0], time.process_time() - cpu0)
print(" ".join(f"{v:.6f}" for v in latencies))
"""


def parse_client(outputs: list[str]) -> tuple[list[float], int]:
    """The sorted latencies and the failed calls of ``CLIENT`` processes (and ``benchmarks.rest``'s REST
    client): each prints its failed calls (``CLIENT``: and its CPU seconds), then its latencies."""
    latencies = sorted(float(v) for out in outputs for v in out.split("\n", 1)[1].split())
    return latencies, sum(int(out.split("\n", 1)[0].split()[0]) for out in outputs)


def client_cpu(outputs: list[str]) -> float | None:
    """The CPU seconds ``CLIENT`` processes spent over their timed part, summed (None: a client that does
    not say, such as the REST one)."""
    firsts = [out.split("\n", 1)[0].split() for out in outputs]
    return sum(float(first[1]) for first in firsts) if all(len(first) > 1 for first in firsts) else None


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and all its descendants (live ones)."""
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except FileNotFoundError:
            continue
    return total


def one(model: Path, processes: int, args: argparse.Namespace, width: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "serve", "--model", str(model),
                             "--model-name", "bench", "--listen", "127.0.0.1:0", "--processes", str(processes),
                             "--summarizer", "process"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        address = None
        for line in proc.stdout:  # type: ignore[union-attr]
            match = re.search(r"serving bench version \S+ on (\S+)", line)
            if match:
                address = match.group(1)
                break
        if address is None:
            raise RuntimeError("agent serve exited before it was ready")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
        time.sleep(2.0)
        if args.client == "cpp":
            request = loadgen.infer_request("bench", args.batch, width)
            with loadgen.Load(address, request, processes=args.clients, connections=args.threads,
                              seconds=args.seconds) as load:  # every connection warmed up
                c0 = tree_cpu(proc.pid)
                load.go()
                result = load.wait()
                c1 = tree_cpu(proc.pid)
            latencies, failed, clients_cpu = result.latencies.tolist(), result.failed, result.client_cpu_s
        else:
            clients = [subprocess.Popen([sys.executable, "-c", CLIENT, address, str(args.threads),
                                         str(args.seconds), str(args.batch), str(width)], cwd=ROOT,
                                        stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)}) for _ in range(args.clients)]
            time.sleep(1.0)  # clients connect and warm up; their barrier starts the timed part
            c0 = tree_cpu(proc.pid)
            outputs = [c.communicate(timeout=args.seconds + 120)[0] for c in clients]
            c1 = tree_cpu(proc.pid)
            if any(c.returncode for c in clients):
                raise RuntimeError("a client failed (its first request: see above)")
            latencies, failed = parse_client(outputs)
            clients_cpu = client_cpu(outputs)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    n = len(latencies)
    return {"processes": processes, "client": args.client, "requests": n, "failed": failed,
            "requests_per_s": n / args.seconds, "p50_ms": latencies[n // 2] * 1e3,
            "p99_ms": latencies[int(n * 0.99)] * 1e3, "agent_cpu_us_per_request": (c1 - c0) / n * 1e6,
            "client_cpu_us_per_request": clients_cpu / n * 1e6, "load_average": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--model", choices=["lr", "forest"], default="lr")
    parser.add_argument("--client", choices=["python", "cpp"], default="python",
                        help="python: grpcio client processes; cpp: the compiled loadgen (benchmarks/loadgen.py)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if why := loadgen.unbuildable(args.client):
        print(why, file=sys.stderr)
        return 2
    variants = [int(p) for p in args.processes.split(",")]
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="outrider-processes-") as tmp:
        model = Path(tmp) / "bench.onnx"
        model.write_bytes(examples.logistic_regression() if args.model == "lr" else examples.random_forest())
        for r in range(args.rounds):
            for p in (variants if r % 2 == 0 else variants[::-1]):
                results.append(one(model, p, args, 20))
                if not args.json:
                    print(json.dumps(results[-1]), flush=True)
    summary = {}
    for p in variants:
        mine = [r for r in results if r["processes"] == p]
        summary[p] = {k: statistics.median(r[k] for r in mine)
                      for k in ("requests_per_s", "p50_ms", "p99_ms", "agent_cpu_us_per_request",
                                "client_cpu_us_per_request")}
        summary[p]["failed"] = sum(r["failed"] for r in mine)  # over every round
    if args.json:
        print(json.dumps({"rounds": results, "summary": summary}, indent=2))
        return 0
    print(f"\n{args.model}, batch {args.batch}, {args.clients} {args.client} client processes x {args.threads} "
          f"connections, {args.seconds:.0f} s, {args.rounds} rounds (medians)")
    print(f"{'processes':>9} {'requests/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'agent CPU µs/req':>17} {'vs first':>8} "
          f"{'failed':>6} {'client CPU µs/req':>17}")
    first = summary[variants[0]]["requests_per_s"]
    for p, s in summary.items():
        print(f"{p:>9} {s['requests_per_s']:11.0f} {s['p50_ms']:7.2f} {s['p99_ms']:7.2f} "
              f"{s['agent_cpu_us_per_request']:17.1f} {s['requests_per_s'] / first:8.2f} {s['failed']:6d} "
              f"{s['client_cpu_us_per_request']:17.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
