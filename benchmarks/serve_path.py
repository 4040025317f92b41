"""What `agent serve` does per ModelInfer call in Python, against the floor, in process and in CPU time.

    PYTHONPATH=. .venv/bin/python benchmarks/serve_path.py [--calls 20000] [--rounds 7] [--batch 1] [--json]

The serving path's cost per call in the serving process, without sockets, threads or clients: each
configuration is a real grpc server built the way it is served (``agent.server.serve`` with a session opened
as ``agent serve`` opens it, and ``benchmarks/_floor_server.py``'s servicer on a plain ``grpc.server``), bound
to 127.0.0.1:0 and never called over the network. A "call" is what the server does in Python for a
unary request once its bytes have arrived, done here by hand: for the floor with grpcio's own objects (find
the method's handler the way ``grpc._server._find_method_handler`` does, decode the body with the handler's
deserializer, call its behavior with a stand-in servicer context, encode the reply with its serializer); for
the agent, whose port is a ``grpc.aio`` server, the same with its ModelInfer handler (``agent_call``), whose
coroutine ends without waiting. grpcio's C core, the completion-queue thread and the hand-offs between threads
are left out: the floor's synchronous server hands every call to a worker thread and back, the agent's
asyncio server does not, and ``serving.py`` measures that end to end. The request: the 20-feature logistic regression of
``agent.examples.logistic_regression()``, ``--batch`` float32 rows as raw input contents, no outputs named,
no request id; every call answers OK.

Timing: ``time.process_time`` (CPU of this process, so another process's load moves it little) over
``--calls`` back-to-back calls, ``--rounds`` rounds with the configurations' order rotating each round;
µs per call, the median of the rounds and their minimum. The monitored session's summary helper is a
process of its own (``--summarizer auto`` on x86-64), so its CPU is not in these figures; the ring copy
on the request path is.

Configurations: ``floor`` (no checks, no interceptors), ``agent`` with ``--no-monitoring``, without and
with ``--metrics`` (the Prometheus request count and latency histogram), and ``agent`` monitored with
``--metrics`` (what ``serving.py``'s ``agent`` variant runs). Layers, each timed alone on the same
request: ``session.run`` of each configuration's session (the model, plus the ring copy when monitored),
the body's decode + the reply's encode (protobuf), and the agent's own steps where this checkout has
them. "around the model" is a configuration's call minus its ``session.run``: the Python a served
call adds to the model, which is what issue 12's ≥ 0.95x of the floor is lost in. Figures only.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: a checkout named there is the one measured

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from grpc import _server as grpc_server  # noqa: E402

from agent import MonitoredSession, examples, handlers, tensors  # noqa: E402
from agent.metrics import AgentMetrics  # noqa: E402
from agent.runtime import RuntimeOptions  # noqa: E402
from agent.server import serve  # noqa: E402
from protos import open_inference_pb2 as pb  # noqa: E402
from protos import open_inference_pb2_grpc as pb_grpc  # noqa: E402

NAME = "bench"
WIDTH = 20
INFER = "/inference.GRPCInferenceService/ModelInfer"


class Context:
    """What a unary behavior asks of grpcio's servicer context on an OK call."""

    def code(self) -> None:
        return None  # grpcio's _Context.code() before any abort or set_code

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def invocation_metadata(self) -> tuple:
        return ()

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def is_active(self) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"the benchmark's request was refused: {code.name} {details}")


def grpc_call(server: grpc.Server, method: str = INFER) -> Callable[[bytes], bytes]:
    """One unary call through ``server``'s handler for ``method`` as grpcio's server makes it (see the
    docstring), bytes in, bytes out."""
    state = server._state  # grpcio's private server state: the registered handlers and the interceptors
    registered = grpc_server._RegisteredMethod(method, state.registered_method_handlers.get(method))
    if registered.handler(None) is None:
        registered = grpc_server._GenericMethod(state.generic_handlers)
    details = grpc_server._HandlerCallDetails(method, ())
    pipeline = state.interceptor_pipeline
    context = Context()

    def call(body: bytes) -> bytes:
        if pipeline is not None:
            handler = pipeline.execute(registered.handler, details)
        else:
            handler = registered.handler(details)
        request = handler.request_deserializer(body)
        return handler.response_serializer(handler.unary_unary(request, context))

    return call


def agent_call(running: Any, metrics: Any) -> Callable[[bytes], bytes]:
    """One unary call through ``agent serve``'s ModelInfer handler as its asyncio server makes it: the handler
    ``agent.server.serve_switch`` registers, built the same way (``agent.handlers.model_infer`` on the generated
    one), the body decoded, the coroutine run to its end -- an OK call never waits, so it ends on the first
    step, as it does on the server's event loop -- and the reply encoded."""
    servicer = running.servicer
    generated = handlers.method_handlers(pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer)
    handler = handlers.model_infer(generated["inference.GRPCInferenceService"]["ModelInfer"], INFER, servicer.infer,
                                   servicer.switch, running.guard, metrics, "InferenceServicer.ModelInfer")
    context = Context()

    def call(body: bytes) -> bytes:
        coroutine = handler.unary_unary(handler.request_deserializer(body), context)
        try:
            coroutine.send(None)
        except StopIteration as done:
            return handler.response_serializer(done.value)
        coroutine.close()
        raise RuntimeError("the ModelInfer handler waited: the benchmark's call is not an OK call on the loop")

    return call


def floor_server(model_path: str) -> tuple[grpc.Server, Any]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _floor_server import Floor

    floor = Floor(model_path, NAME)
    server = grpc.server(_pool())
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(floor, server)
    server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, floor.session


def _pool() -> Any:
    from concurrent import futures

    return futures.ThreadPoolExecutor(max_workers=1)


def agent_server(model_path: str, monitoring: bool, with_metrics: bool) -> tuple[Any, Any, Any]:
    """``agent serve --model M [--no-monitoring] [--metrics ...]`` as serve_cli builds it (no /metrics port)."""
    session = MonitoredSession(model_path, model_name=NAME, model_version="1", window_seconds=10.0,
                               summarizer="auto", monitoring=monitoring, **RuntimeOptions().session_kwargs())
    metrics = AgentMetrics() if with_metrics else None
    running = serve(session, NAME, "1", "127.0.0.1:0", metrics=metrics)
    return running, session, metrics


def request_body(batch: int) -> tuple[bytes, dict[str, np.ndarray]]:
    x = np.random.default_rng(batch).standard_normal((batch, WIDTH)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=NAME)
    request.inputs.add(name="X", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString(), {"X": x}


def cpu_per_call(fn: Callable[[], Any], calls: int) -> float:
    """µs of this process's CPU per call of ``fn``, over ``calls`` calls."""
    clock = time.process_time
    repeat = itertools.repeat(None, calls)
    t0 = clock()
    for _ in repeat:
        fn()
    return (clock() - t0) / calls * 1e6


def agent_layers(running: Any, body: bytes) -> dict[str, Callable[[], Any]]:
    """The agent's own steps that this checkout has, each alone on the decoded request."""
    request = pb.ModelInferRequest.FromString(body)
    servicer = running.servicer
    switch = servicer.switch
    plane = switch.current.plane
    layers: dict[str, Callable[[], Any]] = {}

    def decode_and_plane() -> Any:  # input pairing and checks, session.run, outputs as arrays
        inputs = tensors.wire_inputs(request.inputs, request.raw_input_contents)
        return plane.infer(request.model_name, request.model_version, inputs, [], request.id)

    layers["tensors.wire_inputs + DataPlane.infer"] = decode_and_plane
    if hasattr(plane, "infer_raw"):  # the one-raw-input shortcut, where this checkout has it
        tensor, raw = request.inputs[0], request.raw_input_contents[0]
        layers["DataPlane.infer_raw"] = lambda: plane.infer_raw(request.model_name, request.model_version,
                                                                tensor, raw, (), request.id)

    def switch_pair() -> None:
        switch.release(switch.acquire(NAME))

    layers["ModelSwitch acquire + release"] = switch_pair
    context = Context()
    layers["servicer.ModelInfer (as registered on the servicer)"] = lambda: servicer.ModelInfer(request, context)
    return layers


def run(calls: int, rounds: int, batch: int) -> dict[str, Any]:
    body, feed = request_body(batch)
    reply_body: bytes | None = None
    opened: list[Callable[[], None]] = []
    configs: dict[str, Callable[[], Any]] = {}
    runs: dict[str, Callable[[], Any]] = {}
    layers: dict[str, Callable[[], Any]] = {}
    with tempfile.TemporaryDirectory(prefix="outrider-serve-path-") as tmp:
        path = str(Path(tmp) / "lr.onnx")
        Path(path).write_bytes(examples.logistic_regression(WIDTH))
        try:
            server, floor_session = floor_server(path)
            opened.append(lambda: server.stop(0))
            configs["floor"] = lambda call=grpc_call(server): call(body)
            runs["floor"] = lambda s=floor_session: s.run(None, feed)
            for label, monitoring, with_metrics in (("agent --no-monitoring", False, False),
                                                    ("agent --no-monitoring --metrics", False, True),
                                                    ("agent --metrics (monitored)", True, True)):
                running, session, metrics = agent_server(path, monitoring, with_metrics)
                opened.append(lambda r=running: r.stop(0))
                if metrics is not None:
                    opened.append(metrics.close)
                call = agent_call(running, metrics)
                reply_body = call(body)
                configs[label] = lambda call=call: call(body)
                runs[label] = lambda s=session: s.run(None, feed)
                if label == "agent --metrics (monitored)":
                    layers.update(agent_layers(running, body))
            protobuf = lambda: pb.ModelInferResponse.FromString(reply_body).SerializeToString() and \
                pb.ModelInferRequest.FromString(body)  # noqa: E731
            layers["protobuf: request decode + reply encode"] = protobuf

            timed = {**{f"call: {k}": v for k, v in configs.items()},
                     **{f"session.run: {k}": v for k, v in runs.items()}, **layers}
            for fn in timed.values():  # warm up: caches, the ring, first-call paths
                cpu_per_call(fn, max(100, calls // 20))
            samples: dict[str, list[float]] = {k: [] for k in timed}
            names = list(timed)
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    samples[name].append(cpu_per_call(timed[name], calls))
        finally:
            for close in reversed(opened):
                close()
    median = {k: statistics.median(v) for k, v in samples.items()}
    minimum = {k: min(v) for k, v in samples.items()}
    around = {k: median[f"call: {k}"] - median[f"session.run: {k}"] for k in configs}
    return {"conditions": {"calls_per_round": calls, "rounds": rounds, "batch": batch,
                           "python": sys.version.split()[0], "grpcio": grpc.__version__},
            "median_us": median, "min_us": minimum, "around_the_model_us": around,
            "floor_ratio_around": {k: around[k] / around["floor"] for k in configs}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per configuration per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.calls, args.rounds, args.batch)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    c = result["conditions"]
    print(f"µs of CPU per call, {c['rounds']} rounds x {c['calls_per_round']} calls, batch {c['batch']}, "
          f"Python {c['python']}, grpcio {c['grpcio']} (median of rounds, min)")
    for name, value in result["median_us"].items():
        print(f"  {name:<58} {value:8.2f}  {result['min_us'][name]:8.2f}")
    print("around the model (call - session.run, medians):")
    for name, value in result["around_the_model_us"].items():
        print(f"  {name:<58} {value:8.2f}  ({result['floor_ratio_around'][name]:.2f}x the floor's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
