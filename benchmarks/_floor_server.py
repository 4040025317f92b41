"""The floor for benchmarks/serving.py: a plain grpcio server that only runs onnxruntime.

    python benchmarks/_floor_server.py MODEL.onnx NAME [--listen 127.0.0.1:0] [--workers 8] [--processes 1]

What any competent server of one ONNX model over the Open Inference Protocol must do and nothing
more: our generated OIP protos, ``np.frombuffer`` on the raw input bytes, one ``session.run`` with
``agent serve``'s default session options (agent.runtime), raw little-endian outputs in the reply.
No checks beyond what onnxruntime makes, no monitoring, no metrics, no interceptors: what
``agent serve`` is compared with. Prints ``listening on HOST:PORT`` once it serves; SIGTERM stops it.

``--processes N``: the floor of ``agent serve --processes N``, N such servers on one port with
SO_REUSEPORT (the kernel spreads connections over them): this process serves and starts N - 1 copies
of itself on the port it got, so the whole floor is one process tree, as the agent's is.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.runtime import RuntimeOptions  # noqa: E402
from protos import open_inference_pb2 as pb  # noqa: E402
from protos import open_inference_pb2_grpc as pb_grpc  # noqa: E402

DTYPES = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "BOOL": "?", "UINT8": "u1"}
DATATYPE = {np.dtype(v).newbyteorder("=").str: k for k, v in DTYPES.items()}


class Floor(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, path: str, name: str) -> None:
        options = RuntimeOptions()
        self.session = ort.InferenceSession(path, options.session_options(), providers=options.usable_providers())
        self.name = name
        self.outputs = [o.name for o in self.session.get_outputs()]

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == self.name)

    def ModelInfer(self, request, context):
        feed = {tensor.name: np.frombuffer(raw, DTYPES[tensor.datatype]).reshape(tensor.shape)
                for tensor, raw in zip(request.inputs, request.raw_input_contents)}
        try:
            results = self.session.run(None, feed)
        except Exception as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        reply = pb.ModelInferResponse(model_name=self.name, id=request.id)
        for name, value in zip(self.outputs, results):
            reply.outputs.add(name=name, datatype=DATATYPE[value.dtype.str], shape=value.shape)
            reply.raw_output_contents.append(value.tobytes())
        return reply


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("name")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--reuse-port", action="store_true", help="(set for the copies --processes starts)")
    args = parser.parse_args()
    shared = args.processes > 1 or args.reuse_port
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers),
                         options=[("grpc.so_reuseport", int(shared))])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Floor(args.model, args.name), server)
    host = args.listen.rsplit(":", 1)[0]
    port = server.add_insecure_port(args.listen)
    server.start()
    copies = []
    for _ in range(args.processes - 1):
        copy = subprocess.Popen([sys.executable, __file__, args.model, args.name, "--listen", f"{host}:{port}",
                                 "--workers", str(args.workers), "--reuse-port"], stdout=subprocess.PIPE, text=True)
        copies.append(copy)
        if not copy.stdout.readline().startswith("listening on"):  # type: ignore[union-attr]
            for started in copies:  # none left serving behind a floor that did not start
                started.kill()
            raise SystemExit(f"a copy of the floor server did not serve on {host}:{port}")
    print(f"listening on {host}:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    for copy in copies:
        copy.terminate()
    server.stop(2).wait()
    for copy in copies:
        copy.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
