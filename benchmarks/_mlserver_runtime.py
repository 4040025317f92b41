"""A small onnxruntime runtime for MLServer 1.7 (it ships none for ONNX): the one benchmarks/serving.py serves.

Imported by MLServer from the model folder (``mlserver_env.write_model_folder`` copies it there); it
runs in MLServer's venv, not the project's. The session has ``agent serve``'s default options (one
intra-op and one inter-op thread, no spinning pool, all graph optimisations), so the two servers run
the same kernels the same way. Tensors go through MLServer's own ``NumpyCodec``, as a user would write it.
"""
from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session = ort.InferenceSession(await get_model_uri(self._settings), options,
                                             providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        results = self._session.run(None, feed)
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(name, value)
                                          for name, value in zip(self._outputs, results)])
