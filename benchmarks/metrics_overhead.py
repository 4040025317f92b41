"""What the Prometheus request metrics (agent.metrics) add to a ModelInfer call.

    .venv/bin/python -m benchmarks.metrics_overhead [--calls 20000] [--json]

End to end: four OIP servers in this process on loopback, serving the same
20-feature logistic regression (each its own ``InferenceSession``), the 2nd and
4th with ``metrics=AgentMetrics()`` (their ModelInfer handler counts and times every
call), the 1st and 3rd without; the difference between those two is the
noise floor. One client thread calls them in turn (the order rotates, so none
always goes first) with 1-row requests and times each call with
``perf_counter_ns``: p50/p99 of each side (pooled over its two servers), added
µs and ratios.

In process: the metrics' own work per call without gRPC around it, as the
agent's ModelInfer handler does it (agent.handlers: two clock reads, the
served version's ``Recorder`` looked up and ``record``), against calling the
same handler directly, alternating, in µs. (Before issue 12 this timed the
request interceptor, which since then only counts the calls a token check refuses.)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import examples  # noqa: E402
from agent.metrics import AgentMetrics  # noqa: E402
from agent.server import serve  # noqa: E402
from protos import open_inference_pb2 as pb  # noqa: E402
from protos import open_inference_pb2_grpc as pb_grpc  # noqa: E402

NAME = "bench"


def _pair(t_a: np.ndarray, t_b: np.ndarray) -> dict:
    """Stats of baseline ``t_a`` and ``t_b`` (ns) in µs."""
    a50, a99 = np.percentile(t_a, [50, 99]) / 1e3
    b50, b99 = np.percentile(t_b, [50, 99]) / 1e3
    return {"without_p50_us": round(a50, 2), "with_p50_us": round(b50, 2), "added_p50_us": round(b50 - a50, 2),
            "without_p99_us": round(a99, 2), "with_p99_us": round(b99, 2), "added_p99_us": round(b99 - a99, 2),
            "ratio_p50": round(b50 / a50, 4), "ratio_p99": round(b99 / a99, 4)}


def _rotate(calls: int, *fns) -> list[np.ndarray]:
    """``calls`` rounds calling each of ``fns`` once, the order rotating (none always first); ns each."""
    clock = time.perf_counter_ns
    times = [np.empty(calls, np.int64) for _ in fns]
    n = len(fns)
    for i in range(calls):
        for k in range(n):
            j = (i + k) % n
            t0 = clock()
            fns[j]()
            times[j][i] = clock() - t0
    return times


def end_to_end(model: bytes, calls: int, warmup: int = 2000) -> dict:
    """Servers without, with, without, with metrics: each side pooled over two servers, so a server's
    place in the rotation cannot pass for the metrics; the two without give the noise floor."""
    metrics = [AgentMetrics(), AgentMetrics()]
    servers = [serve(ort.InferenceSession(model, providers=["CPUExecutionProvider"]), NAME, "1", "127.0.0.1:0",
                     workers=4, metrics=m) for m in (None, metrics[0], None, metrics[1])]
    channels = [grpc.insecure_channel(s.address) for s in servers]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
    x = np.random.default_rng(1).standard_normal((1, 20)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=NAME)
    request.inputs.add(name="X", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    fns = [lambda s=s: s.ModelInfer(request, timeout=10) for s in stubs]
    try:
        _rotate(warmup, *fns)  # warm up channels, threads and caches
        plain_a, measured_a, plain_b, measured_b = _rotate(calls, *fns)
        counted = sum(m.requests.labels(NAME, "1")._value.get() for m in metrics)
    finally:
        for channel in channels:
            channel.close()
        for server in servers:
            server.stop(grace=1)
    control = _pair(plain_a, plain_b)
    return {**_pair(np.concatenate([plain_a, plain_b]), np.concatenate([measured_a, measured_b])),
            "control_added_p50_us": control["added_p50_us"], "control_added_p99_us": control["added_p99_us"],
            "calls": calls, "warmup_calls": warmup, "counted_by_metrics": int(counted)}


def in_process(calls: int) -> dict:
    served = SimpleNamespace(model_name=NAME, model_version="1")
    metrics = AgentMetrics(lambda: served)
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    context = SimpleNamespace(code=lambda: None)  # what a servicer context says of an OK call
    clock = time.perf_counter
    last = (served, metrics.recorder(served))  # agent.handlers keeps the served version's, checked by identity

    def plain() -> None:
        handler.unary_unary(None, context)

    def measured() -> None:
        started = clock()
        handler.unary_unary(None, context)
        cached = last
        recorder = cached[1] if cached[0] is served else metrics.recorder(served)
        recorder.record(clock() - started, None)

    _rotate(calls // 10, plain, measured)
    return {**_pair(*_rotate(calls, plain, measured)), "calls": calls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="alternating calls per side")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {"end_to_end": end_to_end(examples.logistic_regression(), args.calls),
               "in_process": in_process(args.calls * 5)}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'':12} {'without p50':>11} {'with p50':>9} {'added p50':>9} {'without p99':>11} {'with p99':>9} "
          f"{'added p99':>9} {'ratio p50':>9} {'ratio p99':>9}")
    for label, r in (("over gRPC", results["end_to_end"]), ("in process", results["in_process"])):
        print(f"{label:12} {r['without_p50_us']:>11.2f} {r['with_p50_us']:>9.2f} {r['added_p50_us']:>9.2f} "
              f"{r['without_p99_us']:>11.2f} {r['with_p99_us']:>9.2f} {r['added_p99_us']:>9.2f} "
              f"{r['ratio_p50']:>9.3f} {r['ratio_p99']:>9.3f}")
    e = results["end_to_end"]
    print(f"(µs; over gRPC: {e['calls']} calls per server after {e['warmup_calls']} to warm up, 1 row; "
          f"the metrics counted {e['counted_by_metrics']}; the two servers without metrics differ by "
          f"{e['control_added_p50_us']} at p50, {e['control_added_p99_us']} at p99)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
