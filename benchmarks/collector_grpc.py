"""Collector ingest end to end: agent streams over gRPC into a collector process on ONE core.

    python benchmarks/collector_grpc.py [--windows 20000] [--streams 4] [--batch 32] [--inflight 4] [--json]

The collector is a real ``outrider collector serve`` subprocess pinned to CPU 0
(``sched_setaffinity``); this process, pinned to CPU 1, plays ``--streams``
agents, each on its own bidirectional stream: Hello, then WindowBatches of
``--batch`` windows with at most ``--inflight`` batches unacknowledged (as the
exporter does). Every window is validated (its 21 sketches deserialised),
stored in SQLite (WAL, synchronous=NORMAL) and acked only after COMMIT.

Each window: 20 numeric features summarising 1,000 rows plus a latency
sketch (the same realistic window as benchmarks/ingest.py). Reported:
windows/s and MB/s of serialised windows from first send to last ack, and
the ack latency per batch (send to ack) at p50 / p99. The store-only figure
of benchmarks/ingest.py, run by the same command before this one, is the
baseline that says what gRPC and validation cost on top.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import grpc  # noqa: E402

from ingest import realistic_window  # noqa: E402
from protos import collector_pb2 as pb  # noqa: E402
from protos import collector_pb2_grpc as pb_grpc  # noqa: E402


def start_collector(db: Path | str, *extra: str) -> tuple[subprocess.Popen, str]:
    """A ``collector serve`` process on ``db`` (a SQLite path or a PostgreSQL URL), with ``extra`` flags."""
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "collector", "serve", "--db", str(db),
                             "--listen", "127.0.0.1:0", *extra], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in proc.stdout:  # type: ignore[union-attr]
        match = re.search(r"collector listening on (\S+)", line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
            return proc, match.group(1)
    raise RuntimeError("collector exited before it was ready")


_RESULTS_LOCK = threading.Lock()


def agent_stream(address: str, agent: int, windows: int, batch: int, inflight: int,
                 latencies: list[float], results: dict[str, int] | None = None) -> None:
    """One agent's stream; ``results`` (if given) counts the acks by result name (STORED, DUPLICATE,
    REJECTED), shared by the streams (a dict's += under the GIL is not atomic: one lock)."""
    template = realistic_window()
    template.agent_id, template.run_id = f"bench-{agent}", f"run-{agent}"
    hello = pb.Hello(agent_id=template.agent_id, run_id=template.run_id, host="bench", model_name="fraud",
                     model_version="3")
    outbox: queue.Queue = queue.Queue()
    sent_at: dict[int, float] = {}
    credit = threading.Semaphore(inflight)

    def requests():
        yield pb.AgentMessage(hello=hello)
        for start in range(0, windows, batch):
            credit.acquire()
            msg = pb.AgentMessage()
            for seq in range(start, min(windows, start + batch)):
                template.seq = seq
                msg.windows.windows.append(template)
            sent_at[start] = time.perf_counter()
            yield msg
        outbox.get()  # keep the stream open until every ack arrived

    acked = 0
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        for reply in pb_grpc.AgentServiceStub(channel).Stream(requests()):
            for ack in reply.acks.acks:
                acked += 1
                if results is not None:
                    with _RESULTS_LOCK:
                        name = pb.WindowAck.Result.Name(ack.result)
                        results[name] = results.get(name, 0) + 1
                if ack.seq % batch == 0:
                    latencies.append(time.perf_counter() - sent_at[ack.seq])
                if (ack.seq + 1) % batch == 0 or ack.seq == windows - 1:
                    credit.release()
            if acked >= windows:
                outbox.put(None)
                break


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20_000, help="in total, over all streams")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = len(realistic_window().SerializeToString())
    with tempfile.TemporaryDirectory(prefix="outrider-ingest-") as tmp:
        proc, address = start_collector(Path(tmp) / "bench.db")
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(proc.pid, {cpus[0]})
        if len(cpus) > 1:
            os.sched_setaffinity(0, set(cpus[1:]))
        latencies: list[float] = []
        per_stream = args.windows // args.streams
        threads = [threading.Thread(target=agent_stream, args=(address, i, per_stream, args.batch, args.inflight,
                                                                latencies)) for i in range(args.streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    total = per_stream * args.streams
    result = {"windows": total, "window_bytes": size, "seconds": round(elapsed, 2),
              "windows_per_s": round(total / elapsed), "mb_per_s": round(total * size / elapsed / 2**20, 1),
              "ack_p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 1),
              "ack_p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 1),
              "collector_cpus": 1, "streams": args.streams, "batch": args.batch, "inflight": args.inflight}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{total:,} windows of {size:,} B over {args.streams} streams into a collector on one core: "
              f"{result['windows_per_s']:,} windows/s, {result['mb_per_s']} MB/s, "
              f"ack p50 {result['ack_p50_ms']} ms, p99 {result['ack_p99_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
