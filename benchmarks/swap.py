"""Request latency while a managed agent swaps model versions under load.

    .venv/bin/python -m benchmarks.swap [--swaps 10] [--interval 4] [--steady 10] [--threads 4] [--json]

A real managed agent (``RolloutController`` + ``serve_switch``, default summarizer) serves OIP on
loopback; a minimal collector in this process acks its windows and pushes ``serve`` commands
alternating version 1 (20-feature logistic regression) and 2 (5-tree random forest, same schema).
Client threads in a *separate process* (not sharing the agent's GIL) send 4-row requests back to
back, each timed on the system-wide monotonic clock. A request is in a swap window when it overlaps
[command sent - 1 s, ModelState received + 1 s]; all others after the warm-up are steady state.
Reported: p50/p99/max of both, the window/steady ratios, failed requests (any failure is a bug).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import queue
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import examples  # noqa: E402
from agent.rollout import RolloutController  # noqa: E402
from agent.server import serve_switch  # noqa: E402
from protos import collector_pb2 as cpb  # noqa: E402
from protos import collector_pb2_grpc  # noqa: E402
from protos import open_inference_pb2 as pb  # noqa: E402
from protos import open_inference_pb2_grpc as pb_grpc  # noqa: E402

NAME = "bench"
WINDOW_NS = 1_000_000_000  # ±1 s around each swap
WARMUP_S = 1.0


class Collector(collector_pb2_grpc.AgentServiceServicer):
    """Just enough collector for one managed agent: acks windows, pushes commands, serves files."""

    def __init__(self, files: dict[int, bytes]) -> None:
        self.files = files
        self.cond = threading.Condition()
        self.states: dict[str, cpb.ModelState] = {}
        self.outboxes: list[queue.SimpleQueue] = []
        self.ids = 0

    def Stream(self, request_iterator, context):  # noqa: N802 (gRPC's name)
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(request_iterator, outbox), daemon=True).start()
        while context.is_active():
            try:
                message = outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if message is None:
                return
            yield message

    def _read(self, request_iterator, outbox: queue.SimpleQueue) -> None:
        try:
            for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "windows":
                    outbox.put(cpb.CollectorMessage(acks=cpb.Acks(acks=[
                        cpb.WindowAck(run_id=w.run_id, seq=w.seq, result=cpb.WindowAck.STORED)
                        for w in message.windows.windows])))
                with self.cond:
                    if kind == "hello":
                        self.outboxes.append(outbox)
                    elif kind == "model_state":
                        self.states[message.model_state.command_id] = message.model_state
                    self.cond.notify_all()
        except grpc.RpcError:  # the stream ended
            pass
        finally:
            with self.cond:
                if outbox in self.outboxes:
                    self.outboxes.remove(outbox)
            outbox.put(None)

    def FetchArtifact(self, request, context):  # noqa: N802 (files of a few KB: one chunk)
        data = self.files[request.version]
        yield cpb.ArtifactChunk(data=data, total_size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def serve(self, version: int, timeout: float = 60.0) -> cpb.ModelState:
        """Push ``serve VERSION`` and wait for the agent's answer."""
        data = self.files[version]
        with self.cond:
            self.ids += 1
            command_id = f"bench-{self.ids}"
            if not self.cond.wait_for(lambda: self.outboxes, timeout):
                raise RuntimeError("the agent never opened its stream")
            for outbox in self.outboxes:
                outbox.put(cpb.CollectorMessage(command=cpb.Command(id=command_id, kind="serve", args={
                    "version": str(version), "sha256": hashlib.sha256(data).hexdigest(), "size": str(len(data))})))
            if not self.cond.wait_for(lambda: command_id in self.states, timeout):
                raise RuntimeError(f"no answer to serve {version}")
            return self.states[command_id]


def _client(address: str, threads: int, batch: int, pause: float, stop, conn) -> None:
    """Child process: ``threads`` loops of ModelInfer until ``stop``; sends back per-request records."""
    x = np.random.default_rng(1).standard_normal((batch, 20)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=NAME)
    request.inputs.add(name="X", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    records: list[list] = [[] for _ in range(threads)]
    errors: list[str] = []

    def loop(out: list) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                t0 = time.monotonic_ns()
                try:
                    version = int(stub.ModelInfer(request, timeout=30).model_version)
                except grpc.RpcError as exc:
                    version = 0
                    errors.append(f"{exc.code().name}: {exc.details()}")
                out.append((t0, time.monotonic_ns(), version))
                if pause:
                    time.sleep(pause)

    workers = [threading.Thread(target=loop, args=(r,)) for r in records]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    conn.send((np.array([row for r in records for row in r], dtype=np.int64).reshape(-1, 3), errors))
    conn.close()


def _stats(latency_ns: np.ndarray) -> dict:
    if not len(latency_ns):
        return {"requests": 0}
    p50, p99 = np.percentile(latency_ns, [50, 99]) / 1e3
    return {"requests": int(len(latency_ns)), "p50_us": round(p50, 1), "p99_us": round(p99, 1),
            "max_us": round(latency_ns.max() / 1e3, 1)}


def run(swaps: int = 10, interval: float = 4.0, steady: float = 10.0, threads: int = 4, batch: int = 4,
        summarizer: str = "auto", pause: float = 0.0) -> dict:
    files = {1: examples.logistic_regression(), 2: examples.random_forest(n_trees=5)}
    collector = Collector(files)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    collector_pb2_grpc.add_AgentServiceServicer_to_server(collector, grpc_server)
    target = f"127.0.0.1:{grpc_server.add_insecure_port('127.0.0.1:0')}"
    grpc_server.start()
    ctx = mp.get_context("spawn")  # no fork under gRPC's threads
    with tempfile.TemporaryDirectory() as spool:
        ctrl = RolloutController(NAME, target, agent_id="bench", spool_dir=spool,
                                 session_options={"summarizer": summarizer})
        agent = serve_switch(ctrl.switch, "127.0.0.1:0", owner=ctrl)
        stop, (mine, theirs), child = ctx.Event(), ctx.Pipe(), None
        try:
            if not (first := collector.serve(1)).ok:
                raise RuntimeError(f"serve 1 failed: {first.error}")
            child = ctx.Process(target=_client, args=(agent.address, threads, batch, pause, stop, theirs),
                                daemon=True)
            child.start()
            begin = time.monotonic_ns()
            time.sleep(WARMUP_S + steady)
            windows, load_ms, refused = [], [], []
            for k in range(swaps):
                version = 2 if k % 2 == 0 else 1
                sent = time.monotonic_ns()
                state = collector.serve(version)
                answered = time.monotonic_ns()
                if not state.ok or state.model_version != str(version):
                    refused.append(state.error or f"still serving {state.model_version}")
                windows.append((sent - WINDOW_NS, answered + WINDOW_NS))
                load_ms.append((answered - sent) / 1e6)
                time.sleep(max(0.0, interval - (answered - sent) / 1e9))
            stop.set()
            records, errors = mine.recv()
            child.join(30)
        finally:
            stop.set()
            if child is not None and child.is_alive():
                child.terminate()
            agent.stop(grace=5)
            grpc_server.stop(0).wait()
    return {"swaps": swaps, "threads": threads, "batch": batch, "summarizer": summarizer, "pause_s": pause,
            "refused_swaps": refused, "errors": sorted(set(errors))[:5],
            "swap_ms_p50": round(float(np.median(load_ms)), 1) if load_ms else None,
            "swap_ms_max": round(max(load_ms), 1) if load_ms else None,
            **_analyse(records, begin + int(WARMUP_S * 1e9), windows)}


def _analyse(records: np.ndarray, after: int, windows: list[tuple[int, int]]) -> dict:
    """Steady vs swap-window latency of the requests that started ``after`` (failures: of all)."""
    t0, t1, version = records[records[:, 0] >= after].T
    latency = t1 - t0
    in_window = np.zeros(len(t0), bool)
    for start, end in windows:
        in_window |= (t0 < end) & (t1 > start)
    steady, swapping = _stats(latency[~in_window]), _stats(latency[in_window])
    both = steady["requests"] and swapping["requests"]
    # The max grows with the sample: each window's max against the max of steady stretches as long (medians).
    span = int(np.median([end - start for start, end in windows])) if windows else 0
    chunk_max = [latency[~in_window & (t0 >= a) & (t0 < a + span)].max(initial=0)
                 for a in range(int(t0.min()), int(t0.max()) - span, span)] if span and len(t0) else []
    window_max = [latency[(t0 < end) & (t1 > start)].max(initial=0) for start, end in windows]
    chunk_max = [m for m in chunk_max if m]
    steady["median_max_per_window_us"] = round(float(np.median(chunk_max)) / 1e3, 1) if chunk_max else None
    swapping["median_max_per_window_us"] = round(float(np.median(window_max)) / 1e3, 1) if window_max else None
    return {"steady": steady, "swap_windows": swapping,
            "ratio_p99": round(swapping["p99_us"] / steady["p99_us"], 3) if both else None,
            "ratio_max": round(swapping["max_us"] / steady["max_us"], 3) if both else None,
            "failed_requests": int(np.count_nonzero(records[:, 2] == 0)),
            "served_by_version": {str(v): int(np.count_nonzero(version == v)) for v in (1, 2)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--interval", type=float, default=4.0, help="seconds from one swap to the next")
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of load before the first swap")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--summarizer", default="auto", choices=["auto", "process", "thread"])
    parser.add_argument("--pause", type=float, default=0.0, help="seconds each client waits between requests")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = run(args.swaps, args.interval, args.steady, args.threads, args.batch, args.summarizer, args.pause)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['swaps']} swaps, {r['threads']} client threads, batch {r['batch']}, summarizer {r['summarizer']}, "
          f"pause {r['pause_s']} s; swap (command -> ModelState) p50 {r['swap_ms_p50']} ms, max {r['swap_ms_max']} ms")
    print(f"{'':13} {'requests':>8} {'p50 us':>9} {'p99 us':>9} {'max us':>9} {'median max per window us':>24}")
    for label, s in (("steady", r["steady"]), ("swap windows", r["swap_windows"])):
        print(f"{label:13} {s['requests']:>8} " + " ".join(f"{s.get(k) or 0:>9.1f}" for k in (
            "p50_us", "p99_us", "max_us")) + f" {s.get('median_max_per_window_us') or 0:>24.1f}")
    print(f"ratio p99 {r['ratio_p99']}, ratio max {r['ratio_max']}; failed requests {r['failed_requests']} "
          f"{r['errors']}; refused swaps {r['refused_swaps']}; served by version {r['served_by_version']}")
    return 0 if r["failed_requests"] == 0 and not r["refused_swaps"] else 1


if __name__ == "__main__":
    sys.exit(main())
