"""A Triton Python-backend model that runs one ONNX file with onnxruntime: the model ``triton_env`` serves.

Copied by ``triton_env.write_version`` into each version folder as ``model.py``, beside that version's
``model.onnx``; it runs in Triton's Python-backend stub, on the Triton venv's Python and packages, not
the project's. The session has ``agent serve``'s default options (one intra-op and one inter-op thread,
no spinning pool, all graph optimisations), as ``_mlserver_runtime`` has, so the servers run the same
kernels the same way. The inputs and outputs are ``config.pbtxt``'s (written from the ONNX file):
Triton checks every request's names, datatypes and shapes against them before ``execute`` runs.
"""
from __future__ import annotations

import os

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        # model_repository is the model's folder; each version folder holds its own model.onnx
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._inputs = [a.name for a in self._session.get_inputs()]
        self._outputs = [a.name for a in self._session.get_outputs()]

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self._inputs}
            try:
                results = self._session.run(None, feed)
            except Exception as exc:  # onnxruntime's own failure, as this request's error (the others go on)
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            # every output: the Python backend drops those a request did not ask for (a reply of a subset)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, value) for name, value in zip(self._outputs, results)]))
        return responses
