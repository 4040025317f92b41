"""Whole-agent CPU: idle, and per single-row request at a steady rate (serving process + its helper processes).

    python benchmarks/agent_cpu.py [--rate 1500] [--batch 1] [--seconds 20] [--rounds 2] [--baseline DIR] [--json]

Starts a real collector and, per round, a real ``outrider agent serve`` (logistic regression, 20
features, summary helper process, 10-s windows) streaming to it; then measures from /proc the CPU
(user + system) of the agent's serving process and of its helper, separately:

- idle: ``--seconds`` with no traffic, after a 3-s settle;
- load: a client in another process (not counted) sends ModelInfer calls of ``--batch`` rows (default
  1) paced at ``--rate`` per second for ``--seconds``; CPU per request = (server + helper CPU) / requests.

With ``--unmonitored``, rounds of this checkout's ``agent serve --no-monitoring`` (plain onnxruntime
behind the same server, no collector) join the rotation: the whole cost of monitoring is the ratio.
Rows dropped are read back from the collector's database after the agent stopped (every window is
delivered at SIGTERM). With ``--baseline DIR`` (another checkout of Outrider, e.g. a ``git worktree``
of an older commit, with the compiled ``agent/_capture*.so`` copied in), rounds alternate between that
checkout and this one in the same run and the ratios are printed. The collector's CPU is not the
agent's cost and is left out; the load average is printed with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import examples  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")

CLIENT = r"""
import sys, time
import grpc
import numpy as np
from protos import open_inference_pb2 as pb, open_inference_pb2_grpc as pb_grpc
address, rate, seconds, batch = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
x = np.random.default_rng(0).standard_normal((batch, 20)).astype("<f4").tobytes()
request = pb.ModelInferRequest(model_name="cpu")
request.inputs.add(name="X", datatype="FP32", shape=[batch, 20])
request.raw_input_contents.append(x)
sent = 0
with grpc.insecure_channel(address) as channel:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    stub.ModelInfer(request, timeout=10)
    t0 = time.monotonic()
    while (now := time.monotonic() - t0) < seconds:
        ahead = sent / rate - now
        if ahead > 0:
            time.sleep(ahead)
        stub.ModelInfer(request, timeout=10)
        sent += 1
print(sent)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def children_cpu_seconds(pid: int) -> float:
    """CPU of the agent's child processes: the summary helper and multiprocessing's resource
    tracker (it watches the shared-memory ring); every process the agent starts is its cost."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sum(cpu_seconds(int(child)) for child in children)


def start(root: Path, args: list[str], pattern: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], cwd=root, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(root)})
    for line in proc.stdout:  # type: ignore[union-attr]
        match = re.search(pattern, line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
            return proc, match.group(1)
    raise RuntimeError(f"{args[:2]} exited before it was ready")


def one_round(root: Path, label: str, tmp: Path, model: Path, collector: str | None, args: argparse.Namespace,
              n: int) -> dict:
    agent_id = f"{label}-{n}"
    where = (["--collector", collector, "--agent-id", agent_id, "--summarizer", "process",
              "--spool-dir", str(tmp / agent_id)] if collector else ["--no-monitoring"])
    agent, address = start(root, ["agent", "serve", "--model", str(model), "--model-name", "cpu",
                                  "--listen", "127.0.0.1:0", *where], r"serving cpu version \S+ on (\S+)")
    try:
        time.sleep(3.0)
        helpers = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
        assert bool(helpers) == bool(collector), f"{label}: helper processes {helpers}"
        s0, h0, t0 = cpu_seconds(agent.pid), children_cpu_seconds(agent.pid), time.monotonic()
        time.sleep(args.seconds)
        s1, h1, t1 = cpu_seconds(agent.pid), children_cpu_seconds(agent.pid), time.monotonic()
        idle = {"server_cores": (s1 - s0) / (t1 - t0), "helper_cores": (h1 - h0) / (t1 - t0)}
        client = subprocess.Popen([sys.executable, "-c", CLIENT, address, str(args.rate), str(args.seconds),
                                   str(args.batch)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        time.sleep(1.0)  # past the client's start-up
        s0, h0 = cpu_seconds(agent.pid), children_cpu_seconds(agent.pid)
        out, _ = client.communicate(timeout=args.seconds + 60)
        s1, h1 = cpu_seconds(agent.pid), children_cpu_seconds(agent.pid)
        # The client's first second is not in the CPU figures: scale its count to the measured span.
        requests = int(out.strip()) * (args.seconds - 1.0) / args.seconds
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
    load = {"server_us": (s1 - s0) / requests * 1e6, "helper_us": (h1 - h0) / requests * 1e6,
            "requests": round(requests)}
    load["agent_us"] = load["server_us"] + load["helper_us"]
    return {"checkout": label, "idle": idle, "load": load, "agent_id": agent_id}


def rows_of(db: Path, agent_id: str) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        rows, dropped = conn.execute("SELECT coalesce(sum(rows), 0), coalesce(sum(dropped_rows), 0) FROM windows "
                                     "WHERE agent_id = ?", (agent_id,)).fetchone()
    return int(rows), int(dropped)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1500.0, help="requests a second (default 1500)")
    parser.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase (default 20)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per checkout (default 2)")
    parser.add_argument("--baseline", type=Path, help="another checkout to measure in alternate rounds")
    parser.add_argument("--unmonitored", action="store_true",
                        help="also rounds of this checkout's 'agent serve --no-monitoring' (no collector)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    checkouts = [("this", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    if args.unmonitored:
        checkouts.append(("unmonitored", ROOT))
    results = []
    with tempfile.TemporaryDirectory(prefix="outrider-cpu-") as tmp_name:
        tmp = Path(tmp_name)
        model = tmp / "cpu.onnx"
        model.write_bytes(examples.logistic_regression())
        db = tmp / "cpu.db"
        collector, address = start(ROOT, ["collector", "serve", "--db", str(db), "--listen", "127.0.0.1:0"],
                                   r"collector listening on (\S+)")
        try:
            for n in range(args.rounds):
                for label, root in (checkouts if n % 2 == 0 else checkouts[::-1]):
                    result = one_round(root, label, tmp, model, None if label == "unmonitored" else address,
                                       args, n)
                    result["load_average"] = os.getloadavg()[0]
                    results.append(result)
                    if not args.json:
                        print(json.dumps(result), flush=True)
            time.sleep(2.0)
            for result in results:
                result["rows"], result["rows_dropped"] = rows_of(db, result["agent_id"])
        finally:
            collector.send_signal(signal.SIGTERM)
            collector.wait(60)
    summary = {}
    for label, _ in checkouts:
        mine = [r for r in results if r["checkout"] == label]
        summary[label] = {
            "idle_cores": sum(r["idle"]["server_cores"] + r["idle"]["helper_cores"] for r in mine) / len(mine),
            "idle_helper_cores": sum(r["idle"]["helper_cores"] for r in mine) / len(mine),
            "agent_us_per_request": sum(r["load"]["agent_us"] for r in mine) / len(mine),
            "helper_us_per_request": sum(r["load"]["helper_us"] for r in mine) / len(mine),
            "rows_dropped": sum(r["rows_dropped"] for r in mine), "rows": sum(r["rows"] for r in mine)}
    if args.json:
        print(json.dumps({"rounds": results, "summary": summary}, indent=2))
        return 0
    print(f"\n{args.rate:.0f} requests/s of {args.batch} row(s) for {args.seconds:.0f} s, "
          f"{args.rounds} rounds per checkout")
    print(f"{'checkout':10} {'idle cores':>11} {'(helper)':>9} {'µs/request':>11} {'(helper)':>9} {'dropped':>8}")
    for label, s in summary.items():
        print(f"{label:10} {s['idle_cores']:11.4f} {s['idle_helper_cores']:9.4f} {s['agent_us_per_request']:11.1f} "
              f"{s['helper_us_per_request']:9.1f} {s['rows_dropped']:>8}")
    this = summary["this"]
    for other in ("baseline", "unmonitored"):
        if other in summary:
            base = summary[other]
            print(f"this / {other}: idle {this['idle_cores'] / base['idle_cores']:.2f}, per request "
                  f"{this['agent_us_per_request'] / base['agent_us_per_request']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
