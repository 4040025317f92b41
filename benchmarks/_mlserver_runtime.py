"""A small onnxruntime runtime for MLServer 1.7 (it ships none for ONNX): the one benchmarks/serving.py serves.

Imported by MLServer from the model folder (``mlserver_env.write_model_folder`` copies it there); it
runs in MLServer's venv, not the project's. The session has ``agent serve``'s default options (one
intra-op and one inter-op thread, no spinning pool, all graph optimisations), so the two servers run
the same kernels the same way. Tensors go through MLServer's own ``NumpyCodec``, as a user would write it.
The model's metadata (inputs and outputs) is read from the ONNX file at load, as MLServer allows: what
``outrider agent proxy`` reads its schema from.
"""
from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor
from mlserver.utils import get_model_uri

# onnxruntime's type strings -> OIP datatypes (the tensor types a scikit-learn ONNX model uses, and more).
ONNX_TO_OIP = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
               "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(int16)": "INT16", "tensor(int8)": "INT8",
               "tensor(uint64)": "UINT64", "tensor(uint32)": "UINT32", "tensor(uint16)": "UINT16",
               "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL", "tensor(string)": "BYTES"}


def _metadata(args: list) -> list[MetadataTensor]:
    return [MetadataTensor(name=a.name, datatype=ONNX_TO_OIP.get(a.type, "BYTES"),
                           shape=[d if isinstance(d, int) else -1 for d in a.shape]) for a in args]


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
        if not self.inputs:  # model-settings.json may state them; otherwise the ONNX file does
            self.inputs = _metadata(self._session.get_inputs())
        if not self.outputs:
            self.outputs = _metadata(self._session.get_outputs())
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        results = self._session.run(None, feed)
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(name, value)
                                          for name, value in zip(self._outputs, results)])
