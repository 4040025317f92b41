"""The same agent over gRPC, REST with JSON tensors and REST with binary tensors, under the same clients.

    python benchmarks/rest.py [--protocols grpc,json,binary] [--clients 2] [--threads 4] [--seconds 10]
                              [--rounds 2] [--batch 1] [--model lr|forest] [--json]

Per round and protocol a real ``outrider agent serve --http-listen`` (monitored, summary helper, no
collector, one serving process) serves the model; ``--clients`` client processes with ``--threads``
threads each, every thread on its own kept-alive connection, call infer back to back for ``--seconds``:
``grpc`` is ModelInfer with raw_input_contents, ``json`` is POST /v2/models/bench/infer with JSON
``data`` and JSON outputs, ``binary`` the same with the binary tensor extension both ways (what
``tritonclient.http`` sends by default). The REST clients are plain ``http.client`` (no client library
in the way). Reported per protocol (median of rounds, protocols alternating): requests/s, p50 and p99
latency seen by the clients, the agent's CPU per request (all its processes). The clients run on the
same cores and take their share: the figures compare protocols under the same load, not the machine's
ceiling.
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
from benchmarks.processes import CLIENT as GRPC_CLIENT  # noqa: E402
from benchmarks.processes import parse_client  # noqa: E402
from benchmarks.processes import tree_cpu  # noqa: E402

PROTOCOLS = ("grpc", "json", "binary")

REST_CLIENT = r"""
import http.client, json, sys, threading, time
import numpy as np
url, threads, seconds, batch, width, mode = (sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]),
                                              int(sys.argv[5]), sys.argv[6])
host, port = url.split("//", 1)[1].rsplit(":", 1)
x = np.random.default_rng(0).standard_normal((batch, width)).astype("<f4")
if mode == "json":
    body = json.dumps({"inputs": [{"name": "X", "shape": [batch, width], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    headers = {"Content-Type": "application/json"}
else:
    head = json.dumps({"inputs": [{"name": "X", "shape": [batch, width], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    body = head + x.tobytes()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
latencies, failed = [], [0]
start = threading.Barrier(threads + 1)
def call(conn):
    conn.request("POST", "/v2/models/bench/infer", body=body, headers=headers)
    reply = conn.getresponse()
    text = reply.read()
    return reply.status, text
def run():
    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # kept alive: one connection per thread
    try:
        status, text = call(conn)
        if status != 200:
            raise RuntimeError(f"HTTP {status} {text[:300]!r}")
    except Exception as exc:  # the warm-up call: the server cannot take these requests; stop every thread
        print(f"the first request to {url} failed: {exc}", file=sys.stderr)
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
            status, _ = call(conn)
        except OSError:  # counted, and a new connection
            status = 0
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
        if status == 200:
            mine.append(time.monotonic() - t0)
        else:
            failed[0] += 1
    latencies.extend(mine)
    conn.close()
workers = [threading.Thread(target=run) for _ in range(threads)]
for w in workers: w.start()
try:
    start.wait()
except threading.BrokenBarrierError:
    sys.exit(1)
for w in workers: w.join()
print(failed[0])
print(" ".join(f"{v:.6f}" for v in latencies))
"""


def one(model: Path, protocol: str, *, clients: int, threads: int, seconds: float, batch: int,
        width: int = 20) -> dict:
    """One agent, ``clients`` x ``threads`` callers of ``protocol`` for ``seconds``: the figures."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "serve", "--model", str(model),
                             "--model-name", "bench", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                             "--summarizer", "process"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        address = url = None
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("rest on "):
                url = line.split()[-1]
            match = re.search(r"serving bench version \S+ on (\S+)", line)
            if match:
                address = match.group(1)
                break
        if address is None or url is None:
            raise RuntimeError("agent serve exited before it was ready")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
        time.sleep(2.0)
        if protocol == "grpc":
            command = ["-c", GRPC_CLIENT, address, str(threads), str(seconds), str(batch), str(width)]
        else:
            command = ["-c", REST_CLIENT, url, str(threads), str(seconds), str(batch), str(width), protocol]
        callers = [subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
                   for _ in range(clients)]
        time.sleep(1.0)  # clients connect and warm up; their barrier starts the timed part
        c0 = tree_cpu(proc.pid)
        outputs = [c.communicate(timeout=seconds + 120)[0] for c in callers]
        c1 = tree_cpu(proc.pid)
        if any(c.returncode for c in callers):
            raise RuntimeError(f"a {protocol} client failed")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    latencies, failed = parse_client(outputs)  # both clients print their failed calls, then their latencies
    n = len(latencies)
    return {"protocol": protocol, "requests": n, "failed": failed, "requests_per_s": n / seconds,
            "p50_ms": latencies[n // 2] * 1e3, "p99_ms": latencies[int(n * 0.99)] * 1e3,
            "agent_cpu_us_per_request": (c1 - c0) / n * 1e6, "load_average": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--model", choices=["lr", "forest"], default="lr")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    variants = args.protocols.split(",")
    unknown = set(variants) - set(PROTOCOLS)
    if unknown:
        parser.error(f"unknown protocol(s) {sorted(unknown)}; choose from {', '.join(PROTOCOLS)}")
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="outrider-rest-") as tmp:
        model = Path(tmp) / "bench.onnx"
        model.write_bytes(examples.logistic_regression() if args.model == "lr" else examples.random_forest())
        for r in range(args.rounds):
            for protocol in (variants if r % 2 == 0 else variants[::-1]):
                results.append(one(model, protocol, clients=args.clients, threads=args.threads,
                                   seconds=args.seconds, batch=args.batch))
                if not args.json:
                    print(json.dumps(results[-1]), flush=True)
    summary = {}
    for protocol in variants:
        mine = [r for r in results if r["protocol"] == protocol]
        summary[protocol] = {k: statistics.median(r[k] for r in mine)
                             for k in ("requests_per_s", "p50_ms", "p99_ms", "agent_cpu_us_per_request")}
        summary[protocol]["failed"] = sum(r["failed"] for r in mine)  # over every round
    if args.json:
        print(json.dumps({"rounds": results, "summary": summary}, indent=2))
        return 0
    print(f"\n{args.model}, batch {args.batch}, {args.clients} client processes x {args.threads} connections, "
          f"{args.seconds:.0f} s, {args.rounds} rounds (medians)")
    print(f"{'protocol':>8} {'requests/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'agent CPU µs/req':>17} {'vs first':>8} {'failed':>6}")
    first = summary[variants[0]]["requests_per_s"]
    for protocol, s in summary.items():
        print(f"{protocol:>8} {s['requests_per_s']:11.0f} {s['p50_ms']:7.2f} {s['p99_ms']:7.2f} "
              f"{s['agent_cpu_us_per_request']:17.1f} {s['requests_per_s'] / first:8.2f} {s['failed']:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
