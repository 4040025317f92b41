"""Child process for test_conformance_triton: talks to a server with tritonclient.grpc only.

tritonclient registers its own ``inference`` protos in protobuf's global pool,
which clash with ours, so it must never be imported in the test process.
Usage: python triton_probe.py '<json case>'; prints one JSON object.
"""
import json
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def as_array(spec: dict) -> np.ndarray:
    if spec["datatype"] == "BYTES":
        return np.array(spec["data"], dtype=object)
    return np.array(spec["data"], dtype=spec["dtype"])


def infer(client, model: str, specs: list, outputs: list, request_id: str):
    inputs = []
    for spec in specs:
        array = as_array(spec)
        tensor = triton.InferInput(spec["name"], list(array.shape), spec["datatype"])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    asked = [triton.InferRequestedOutput(name) for name in outputs]
    return client.infer(model, inputs, request_id=request_id, outputs=asked)


def main() -> None:
    case = json.loads(sys.argv[1])
    client = triton.InferenceServerClient(case["url"])
    model = case["model"]
    result = {
        "live": client.is_server_live(),
        "server_ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "other_model_ready": client.is_model_ready("no-such-model"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "metadata": client.get_model_metadata(model, as_json=True),
    }
    reply = infer(client, model, case["inputs"], case["outputs"], "triton-1")
    result["id"] = reply.get_response().id
    result["outputs"] = {
        name: {"datatype": reply.get_output(name).datatype, "data": reply.as_numpy(name).tolist()}
        for name in case["outputs"]
    }
    try:  # a bad request: FP64 where the model takes FP32
        bad = [dict(spec, datatype="FP64", dtype="float64") if spec["datatype"] == "FP32" else spec
               for spec in case["inputs"]]
        infer(client, model, bad, case["outputs"], "triton-bad")
        result["bad"] = None
    except InferenceServerException as exc:
        result["bad"] = {"status": exc.status(), "message": exc.message()}
    # ... and the server still answers
    result["after_bad_ready"] = client.is_model_ready(model)
    client.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
