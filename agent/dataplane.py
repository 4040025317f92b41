"""The inference data plane: one ONNX model behind the Open Inference Protocol.

Plain Python, no gRPC: the servicer converts messages with ``agent.tensors``
and calls this; errors are ``agent.errors`` exceptions that the servicer's
one decorator maps to status codes.

ZipMap outputs: scikit-learn classifiers converted by skl2onnx with default
options output probabilities as a sequence of maps (one ``{class: p}`` dict
per row). OIP has no map type, so such an output is served as an FP32 tensor
``[N, n_classes]`` whose columns follow the dict order, which is the model's
class-label order. Its metadata shape is ``[-1, -1]``: the class count is not
visible through the session interface, so a request with no rows gets
``[0, k]`` with the k of the last request that had rows (``[0, 0]`` before any).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from agent import capture, tensors
from agent.errors import FailedPrecondition, InvalidArgument, NotFound, OutriderError
from agent.tensors import TensorSpec, WireTensor

log = logging.getLogger(__name__)

PLATFORM = "onnx_onnxv1"  # the platform name Triton and KServe use for ONNX models
MAX_LABELS_PER_CALL = 10_000  # keeps one feedback call short for the worker thread serving it

# One ground-truth label: (request id, class label (str) or target (float) or None when unset, row).
Label = tuple[str, str | float | None, int]
# Sees each request's feed and all of the model's outputs (names, values) after the call: a shadow's ``offer``.
Tap = Callable[[Mapping[str, np.ndarray], Sequence[str], Sequence[Any]], None]


class InferenceSessionLike(Protocol):
    """The part of ``onnxruntime.InferenceSession`` the data plane uses.

    A session that also has ``feedback(request_id, value, row)`` and
    ``label_kind`` (``MonitoredSession``) gets request ids passed to
    ``run(..., request_id=...)`` and serves the Feedback RPC.
    """

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any]) -> list[Any]: ...
    def get_inputs(self) -> list[Any]: ...
    def get_outputs(self) -> list[Any]: ...


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class DataPlane:
    """Serves one model version; every request is checked before it reaches the session."""

    def __init__(self, session: InferenceSessionLike, model_name: str, model_version: str) -> None:
        self.session = session
        self.model_name = model_name
        self.model_version = model_version
        self.inputs = [_input_spec(arg) for arg in session.get_inputs()]
        specs = [_output_spec(arg) for arg in session.get_outputs()]
        self.outputs = [spec for spec, _ in specs]
        # ZipMap output -> its class count, learnt from the first answer with rows (0 until then)
        self._zipmap = {spec.name: 0 for spec, is_zipmap in specs if is_zipmap}
        self._input_by_name = {spec.name: spec for spec in self.inputs}
        self._output_names = [spec.name for spec in self.outputs]
        self._feedback = getattr(session, "feedback", None)  # only sessions with it take request ids
        # A one-input model's shortcut for the usual request (``infer_raw``); None: always the general path.
        self._decode_one = tensors.raw_decoder(self.inputs[0]) if len(self.inputs) == 1 else None
        self._one_name = self.inputs[0].name if len(self.inputs) == 1 else ""

    @property
    def joins_labels(self) -> bool:
        """Whether the session keeps predictions by request id for ``feedback``."""
        return self._feedback is not None

    def ready(self, name: str, version: str = "") -> bool:
        """True for the loaded model; False for any other name or version, as Triton answers."""
        return name == self.model_name and version in ("", self.model_version)

    def metadata(self, name: str, version: str = "") -> ModelMetadata:
        self._require(name, version)
        return ModelMetadata(self.model_name, [self.model_version], PLATFORM,
                             list(self.inputs), list(self.outputs))

    def infer(self, name: str, version: str, inputs: Sequence[WireTensor],
              output_names: Sequence[str] = (), request_id: str = "",
              tap: Tap | None = None) -> list[tuple[str, np.ndarray]]:
        """Run the model on decoded ``inputs``; returns (output name, array) in the order asked.

        A non-empty ``request_id`` (the OIP request ``id``) keeps the prediction
        for ``feedback`` when the session can join labels. ``tap`` (which must
        not raise or block) is given the feed and every output after the call."""
        self._require(name, version)
        return self._run(self._feed(inputs), output_names, request_id, tap)

    def infer_raw(self, name: str, version: str, tensor: Any, raw: bytes,
                  output_names: Sequence[str] = (), request_id: str = "",
                  tap: Tap | None = None) -> list[tuple[str, np.ndarray]]:
        """``infer`` for a request of one input sent raw, what nearly every client sends: ``tensor`` (an
        ``InferInputTensor``: name, datatype, shape) with ``raw`` its bytes. The same checks, errors and
        answers as ``infer([WireTensor(...)])``; a one-input model checks the usual case in fewer steps."""
        self._require(name, version)
        decode = self._decode_one
        array = decode(tensor, raw) if decode is not None else None
        if array is not None:
            feed = {self._one_name: array}
        else:  # anything unusual or wrong: the general checks, which say what is wrong
            feed = self._feed([WireTensor(tensor.name, tensor.datatype, tuple(tensor.shape), raw)])
        return self._run(feed, output_names, request_id, tap)

    def _run(self, feed: dict[str, np.ndarray], output_names: Sequence[str], request_id: str,
             tap: Tap | None) -> list[tuple[str, np.ndarray]]:
        if output_names:
            wanted = self._wanted(output_names)
            # None: every output in the model's order, with no selection to make per call -- what a tap
            # needs (it compares them all) and what a request naming every output in order gets.
            ask = None if tap is not None or wanted == self._output_names else wanted
        else:  # the usual request: every output, nothing to select or copy
            wanted, ask = self._output_names, None
        try:
            if request_id and self._feedback is not None:
                results = self.session.run(ask, feed, request_id=request_id)  # type: ignore[call-arg]
            else:
                results = self.session.run(ask, feed)
        except OutriderError:
            raise
        except Exception as exc:  # onnxruntime refusing the input: its message tells the caller why
            log.debug("session.run rejected a request", exc_info=True)
            raise InvalidArgument(f"model '{self.model_name}' rejected the input: {exc}") from None
        if tap is not None:
            tap(feed, self._output_names, results)
            if wanted is not self._output_names:  # the ones asked for, in the order asked
                by_name = dict(zip(self._output_names, results))
                results = [by_name[out] for out in wanted]
        if not self._zipmap:  # no output to convert: each is an array already (asarray: a session-like's list)
            return [(out, np.asarray(value)) for out, value in zip(wanted, results)]
        return [(out, self._as_tensor(out, value)) for out, value in zip(wanted, results)]

    def feedback(self, labels: Sequence[Label]) -> tuple[int, int]:
        """Join ground-truth labels to earlier predictions; returns (matched, unmatched).

        Every label is checked before any is applied, so a bad call changes nothing.
        The caller checks ``joins_labels`` first.
        """
        kind = getattr(self.session, "label_kind", None)
        if self._feedback is None or kind is None:
            raise FailedPrecondition(
                f"model '{self.model_name}' has no class-label output and no float output with one value "
                "per row: there is no prediction to compare ground truth with")
        if len(labels) > MAX_LABELS_PER_CALL:
            raise InvalidArgument(f"{len(labels)} labels in one call; send at most {MAX_LABELS_PER_CALL} per call")
        want, field = (str, "class_label") if kind == "classification" else (float, "target")
        for i, (request_id, value, _) in enumerate(labels):
            if not request_id:
                raise InvalidArgument(f"label {i}: request_id is empty; give the id of the inference request")
            if value is None:
                raise InvalidArgument(f"label {i}: set exactly one of class_label or target")
            if not isinstance(value, want):
                raise InvalidArgument(f"label {i}: model '{self.model_name}' is a {kind} model; "
                                      f"send its label as {field}")
            if want is float and not np.isfinite(value):
                raise InvalidArgument(f"label {i}: target must be a finite number, not {value}")
        matched = 0
        for request_id, value, row in labels:
            matched += bool(self._feedback(request_id, value, row))
        return matched, len(labels) - matched

    def _require(self, name: str, version: str) -> None:
        if name != self.model_name:
            raise NotFound(f"model '{name}' is not served here; this server serves '{self.model_name}'")
        if version not in ("", self.model_version):
            raise NotFound(
                f"model '{name}' has no version '{version}'; served version is '{self.model_version}' "
                "(or leave the version empty)"
            )

    def _feed(self, inputs: Sequence[WireTensor]) -> dict[str, np.ndarray]:
        feed: dict[str, np.ndarray] = {}
        for tensor in inputs:
            spec = self._input_by_name.get(tensor.name)
            if spec is None:
                raise InvalidArgument(f"unknown input '{tensor.name}'; the model's inputs are: "
                                      f"{', '.join(self._input_by_name)}")
            if tensor.name in feed:
                raise InvalidArgument(f"input '{tensor.name}' is given more than once")
            feed[tensor.name] = tensors.to_array(tensor, spec)
        if len(feed) != len(self._input_by_name):  # names are unique and known by now: some are missing
            missing = [name for name in self._input_by_name if name not in feed]
            raise InvalidArgument(
                f"missing input(s) {', '.join(repr(m) for m in missing)}; the model's inputs are: "
                f"{', '.join(self._input_by_name)}"
            )
        return feed

    def _wanted(self, output_names: Sequence[str]) -> list[str]:
        if not output_names:
            return list(self._output_names)
        unknown = [name for name in output_names if name not in self._output_names]
        if unknown:
            raise InvalidArgument(
                f"unknown output(s) {', '.join(repr(u) for u in unknown)}; "
                f"the model's outputs are: {', '.join(self._output_names)}"
            )
        return list(dict.fromkeys(output_names))  # a name asked twice is answered once

    def _as_tensor(self, name: str, value: Any) -> np.ndarray:
        if name in self._zipmap:
            array = capture.zipmap_to_array(value, self._zipmap[name])
            if len(array):
                self._zipmap[name] = array.shape[1]
            return array
        return np.asarray(value)


def _input_spec(arg: Any) -> TensorSpec:
    return TensorSpec(arg.name, tensors.oip_datatype(arg.type), tensors.spec_shape(arg.shape))


def _output_spec(arg: Any) -> tuple[TensorSpec, bool]:
    if arg.type.startswith("seq(map(") and arg.type.endswith(",tensor(float)))"):
        return TensorSpec(arg.name, "FP32", (-1, -1)), True
    return TensorSpec(arg.name, tensors.oip_datatype(arg.type), tensors.spec_shape(arg.shape)), False
