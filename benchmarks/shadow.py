"""What a shadow version costs the requests of the version it shadows.

    .venv/bin/python -m benchmarks.shadow [--mode both|in-process|oip] [--rounds 10] [--bare] [--json]

Production is served as a managed agent serves it: a ``MonitoredSession``
(helper process summarizer; ``--bare``: a plain ``InferenceSession``) behind a
``DataPlane``. The shadow is what ``RolloutController`` builds: a plain
``InferenceSession`` of the same 20-feature logistic regression in a
``ShadowRunner`` whose ``offer`` is the infer call's tap. Configurations:

- no shadow (the baseline),
- share 0.1, default queue (64),
- share 1.0, default queue (full, and requests skipped, when they come faster than the shadow runs),
- share 1.0, a queue longer than a block: every request is queued.

``in-process``: each request is one ``DataPlane.infer`` on decoded wire tensors,
back to back on one thread (the harshest case: ~60,000 requests/s offered).
``oip``: the real OIP server (``serve_switch``, the shadow set on its
``ModelSwitch`` as the controller does) and one client thread in a separate
process sending requests back to back, each timed end to end.

Blocks of calls of each configuration take turns (the order rotates each round)
and the shadow is flushed, untimed, after each block, so the baseline never runs
beside a busy shadow thread. Reported: p50/p99, added µs and ratios against the
baseline, the spread of the per-round p50 ratio, the share of requests queued / skipped;
and the shadow thread's own work per queued request, timed with nothing else running.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import MonitoredSession, examples  # noqa: E402
from agent.dataplane import DataPlane  # noqa: E402
from agent.switch import LoadedVersion, ModelSwitch  # noqa: E402
from agent.server import serve_switch  # noqa: E402
from agent.shadow import DEFAULT_QUEUE, ShadowRunner  # noqa: E402
from agent.sinks import InMemorySink  # noqa: E402
from agent.tensors import WireTensor  # noqa: E402
from protos import open_inference_pb2 as pb  # noqa: E402
from protos import open_inference_pb2_grpc as pb_grpc  # noqa: E402

CPU = ["CPUExecutionProvider"]
NAME = "bench"
Block = Callable[[ShadowRunner | None, int], np.ndarray]  # runs n timed requests with that shadow


def _production(model: bytes, bare: bool):
    if bare:
        return ort.InferenceSession(model, providers=CPU)
    return MonitoredSession(model, providers=CPU, sink=InMemorySink(), window_seconds=None, window_rows=10_000,
                            summarizer="process")


def _rotate(model: bytes, block: int, rounds: int, batch: int, run_block: Block) -> list[dict]:
    """Blocks of each configuration in turns; per-configuration figures against the baseline."""
    shadow = ort.InferenceSession(model, providers=CPU)  # as the controller loads it
    configs: list[tuple[str, ShadowRunner | None]] = [
        ("no shadow", None),
        ("share 0.1", ShadowRunner(shadow, "2", share=0.1)),
        (f"share 1.0, queue {DEFAULT_QUEUE}", ShadowRunner(shadow, "2", share=1.0)),
        ("share 1.0, queue never full", ShadowRunner(shadow, "2", share=1.0, queue_size=block + 1)),
    ]
    times: dict[str, list[np.ndarray]] = {name: [] for name, _ in configs}
    counts = {name: [0, 0] for name, _ in configs}  # queued (run), skipped
    for r in range(-1, rounds):  # round -1 warms everything up and is not kept
        for k in range(len(configs)):
            name, runner = configs[(k + max(r, 0)) % len(configs)]
            t = run_block(runner, block)
            if runner is not None:
                runner.flush(120)
                summary = runner.take()
                if summary is not None and r >= 0:
                    counts[name][0] += summary.calls
                    counts[name][1] += summary.skipped
            if r >= 0:
                times[name].append(t)
    for _, runner in configs:
        if runner is not None:
            runner.stop()
    base = np.concatenate(times["no shadow"])
    b50, b99 = np.percentile(base, [50, 99]) / 1e3
    results = []
    for name, _ in configs:
        every = np.concatenate(times[name])
        m50, m99 = np.percentile(every, [50, 99]) / 1e3
        per_round = [np.median(t) / np.median(b) for t, b in zip(times[name], times["no shadow"])]
        results.append({
            "batch": batch, "config": name, "p50_us": round(m50, 2), "p99_us": round(m99, 2),
            "added_p50_us": round(m50 - b50, 2), "added_p99_us": round(m99 - b99, 2),
            "ratio_p50": round(m50 / b50, 3), "ratio_p99": round(m99 / b99, 3),
            "ratio_p50_rounds": [round(float(min(per_round)), 3), round(float(max(per_round)), 3)],
            "queued_share": round(counts[name][0] / every.size, 3),
            "skipped_share": round(counts[name][1] / every.size, 3)})
    return results


def in_process(model: bytes, batch: int, block: int, rounds: int, bare: bool = False) -> list[dict]:
    production = _production(model, bare)
    plane = DataPlane(production, NAME, "1")
    x = examples.tabular_data(n=batch * 64, seed=1)[0]
    inputs = [[WireTensor("X", "FP32", (batch, 20), x[i:i + batch].tobytes())] for i in range(0, len(x), batch)]
    clock = time.perf_counter_ns

    def run_block(runner: ShadowRunner | None, n: int) -> np.ndarray:
        tap = runner.offer if runner is not None else None
        t = np.empty(n, np.int64)
        for i in range(n):
            inp = inputs[i % len(inputs)]
            t0 = clock()
            plane.infer(NAME, "", inp, (), "", tap)
            t[i] = clock() - t0
        return t

    try:
        run_block(None, 2000)
        return _rotate(model, block, rounds, batch, run_block)
    finally:
        getattr(production, "close", lambda: None)()


def shadow_alone(model: bytes, batch: int, n: int = 5000) -> float:
    """µs of the shadow thread's work per queued request (its model call, comparison and sketches),
    with nothing else running: ``n`` offers, then the wait until all are done."""
    session = ort.InferenceSession(model, providers=CPU)
    x = examples.tabular_data(n=batch, seed=1)[0]
    names, outputs = [o.name for o in session.get_outputs()], session.run(None, {"X": x})
    runner = ShadowRunner(session, "2", share=1.0, queue_size=n + 1)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        runner.offer({"X": x}, names, outputs)
    runner.flush(120)
    elapsed = time.perf_counter_ns() - t0
    runner.stop()
    return round(elapsed / n / 1e3, 1)


def _client(address: str, batch: int, conn) -> None:
    """Child process: for each n received, n timed ModelInfer calls back to back; sends the times."""
    x = examples.tabular_data(n=batch * 64, seed=1)[0]
    requests = []
    for i in range(0, len(x), batch):
        request = pb.ModelInferRequest(model_name=NAME)
        request.inputs.add(name="X", datatype="FP32", shape=[batch, 20])
        request.raw_input_contents.append(x[i:i + batch].tobytes())
        requests.append(request)
    clock = time.perf_counter_ns
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while n := conn.recv():
            t = np.empty(n, np.int64)
            for i in range(n):
                t0 = clock()
                stub.ModelInfer(requests[i % len(requests)], timeout=30)
                t[i] = clock() - t0
            conn.send(t)


def oip(model: bytes, batch: int, block: int, rounds: int, bare: bool = False) -> list[dict]:
    production = _production(model, bare)
    switch = ModelSwitch(NAME)
    switch.swap(LoadedVersion(DataPlane(production, NAME, "1"), production, "1"))
    server = serve_switch(switch, "127.0.0.1:0", owner=production)
    ctx = mp.get_context("spawn")  # no fork under gRPC's threads
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_client, args=(server.address, batch, theirs), daemon=True)
    child.start()

    def run_block(runner: ShadowRunner | None, n: int) -> np.ndarray:
        switch.shadow = runner  # what the controller's shadow command does; read once per request
        mine.send(n)
        return mine.recv()

    try:
        run_block(None, 1000)
        return _rotate(model, block, rounds, batch, run_block)
    finally:
        mine.send(0)
        child.join(30)
        server.stop(grace=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="both", choices=["both", "in-process", "oip"])
    parser.add_argument("--block", type=int, default=2000, help="calls per configuration per round, in process")
    parser.add_argument("--oip-block", type=int, default=500, help="the same over OIP")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--bare", action="store_true", help="production without monitoring")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = examples.logistic_regression()
    results: dict = {"shadow_alone_us": {b: shadow_alone(model, b) for b in (1, 64)}}
    for mode, run, block in (("in-process", in_process, args.block), ("oip", oip, args.oip_block)):
        if args.mode in ("both", mode):
            results[mode] = [row for b in (1, 64) for row in run(model, b, block, args.rounds, args.bare)]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'bare' if args.bare else 'monitored'} production; {args.rounds} rounds; µs")
    print(f"{'mode':10} {'batch':>5} {'configuration':28} {'p50':>8} {'p99':>8} {'+p50':>7} {'+p99':>7} "
          f"{'r p50':>6} {'r p99':>6} {'r p50 rounds':>13} {'queued':>6} {'skipped':>7}")
    for mode in ("in-process", "oip"):
        for r in results.get(mode, []):
            lo, hi = r["ratio_p50_rounds"]
            print(f"{mode:10} {r['batch']:>5} {r['config']:28} {r['p50_us']:>8.2f} {r['p99_us']:>8.2f} "
                  f"{r['added_p50_us']:>7.2f} {r['added_p99_us']:>7.2f} {r['ratio_p50']:>6.3f} {r['ratio_p99']:>6.3f} "
                  f"{f'{lo:.3f}-{hi:.3f}':>13} {r['queued_share']:>6.3f} {r['skipped_share']:>7.3f}")
    print("shadow thread alone, µs per queued request: " +
          ", ".join(f"batch {b}: {us}" for b, us in results["shadow_alone_us"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
