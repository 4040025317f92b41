"""Open Inference Protocol REST bodies <-> the data plane's tensors.

A request body is a JSON object, optionally followed by binary tensor data
(Triton's and KServe's binary tensor extension: the JSON's length is in the
``Inference-Header-Content-Length`` header, and each input whose
``parameters.binary_data_size`` is set takes that many bytes after it, in input
order). Every input becomes an ``agent.tensors.WireTensor`` with raw bytes in
the OIP wire form, so the checks of shape, datatype, element count, BOOL and
BYTES contents are ``agent.tensors.to_array``'s, the same as gRPC's.

What is JSON-only is checked here: the document's structure, and that JSON
``data`` holds values of the input's datatype (numbers for FP*, integers in
range for INT*/UINT*, true/false for BOOL, strings for BYTES), nested or flat
in row-major order. Nothing is converted silently: "1.5" is not a number and
1.5 is not an INT32.

Replies: outputs in JSON (flat row-major ``data``) or, per output
(``parameters.binary_data``, or the request's ``binary_data_output``), as
binary data after the JSON with ``binary_data_size`` set.

Parsing numbers is most of a JSON request's cost. Small bodies are read by
orjson. Larger ones (``SIMDJSON_BYTES``) by simdjson (pysimdjson): the
document's few small parts become Python objects, and the ``data`` of an FP*
tensor goes straight from the text into a buffer of doubles, never through a
list of Python floats (half the CPU of orjson and numpy at 64 rows of 20;
that is the monitor's work for every call through ``agent proxy``'s REST
relay, and the agent's own REST server's). Other data (integers, whose
range is checked; BOOL; BYTES; anything that is not a plain number where a
number should be) takes the list path, so what is refused, and why, stays the
same, and so does nested data (the buffer path takes flat data, which is what
tritonclient and KServe's clients send). A body simdjson refuses is read again
by orjson, whose message says where it goes wrong. Replies are written by
orjson: numpy arrays directly, float32 as the shortest text that reads back
to the same float32, and NaN and infinity (which JSON lacks) as null.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import simdjson

from agent import tensors
from agent.errors import InvalidArgument
from agent.tensors import WireTensor

HEADER_LENGTH = "inference-header-content-length"  # lower case, as ASGI gives header names
_FLOATS = ("FP16", "FP32", "FP64")  # read by the buffer path of _json_raw
# Below this many bytes of JSON, orjson reads a body faster: simdjson's objects cost more than the few numbers
# they save converting (parse_infer 9 against 11-17 µs at one row of 20 floats, 20 against 21 at 8 rows, 30 against
# 26 at 16 rows, 64 against 33 at 64 rows, a 6.7 KB body being 16 rows).
SIMDJSON_BYTES = 6 * 1024


@dataclass(frozen=True)
class InferRequest:
    """A decoded REST infer request: what ``DataPlane.infer`` takes, and how to answer."""

    inputs: list[WireTensor]
    outputs: list[str]       # asked for by name ([]: every output)
    binary: dict[str, bool]  # output name -> answer it as binary data
    binary_default: bool     # for outputs not named in ``binary``
    request_id: str


def _load(head: bytes) -> Any:
    """The JSON document as Python objects; from ``SIMDJSON_BYTES`` on, each ``data`` of an entry of ``inputs``
    or ``outputs`` is left a ``simdjson.Array`` for ``_json_raw``. ValueError if it is not JSON (orjson's
    JSONDecodeError and simdjson's UnicodeDecodeError included)."""
    if len(head) < SIMDJSON_BYTES:
        return orjson.loads(head)
    try:
        doc = simdjson.Parser().parse(head)  # a parser a document: it cannot be reused while any of it is held
    except ValueError:  # orjson decides, and says where the body goes wrong (simdjson does not say where)
        return orjson.loads(head)
    if not isinstance(doc, simdjson.Object):
        return _plain(doc)
    out = {}
    for key in doc.keys():
        value = doc[key]
        if key in ("inputs", "outputs") and isinstance(value, simdjson.Array):
            out[key] = [_entry(entry) for entry in value]
        else:
            out[key] = _plain(value)
    return out


def _entry(entry: Any) -> Any:
    if not isinstance(entry, simdjson.Object):
        return _plain(entry)
    out = {}
    for key in entry.keys():
        value = entry[key]
        out[key] = value if key == "data" and isinstance(value, simdjson.Array) else _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    """Split ``body`` into its JSON and binary parts and decode the request; InvalidArgument if malformed."""
    if header_length is None:
        head, binary = body, b""
    else:
        if not header_length.strip().isdigit():
            raise InvalidArgument(f"Inference-Header-Content-Length {header_length!r} is not a number of bytes")
        size = int(header_length)
        if size > len(body):
            raise InvalidArgument(f"Inference-Header-Content-Length is {size} but the body has only {len(body)} "
                                  "bytes; it gives the length of the JSON part that starts the body")
        head, binary = body[:size], body[size:]
    try:
        doc = _load(head)
    except ValueError as exc:
        hint = ("" if header_length is not None else
                "; a body with binary tensor data needs the Inference-Header-Content-Length header")
        raise InvalidArgument(f"the request body is not valid JSON ({exc}){hint}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("the request body must be a JSON object with 'inputs'")
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("'id' must be a string")
    params = _object(doc.get("parameters"), "parameters")
    binary_default = _flag(params, "binary_data_output", "parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidArgument("'inputs' must be a non-empty list of {name, shape, datatype, data} objects")
    inputs, used = [], 0
    for i, entry in enumerate(raw_inputs):
        tensor, size = _input(entry, i, binary, used)
        inputs.append(tensor)
        used += size
    if used != len(binary):
        raise InvalidArgument(f"the body has {len(binary)} bytes of binary data after the JSON, but the inputs' "
                              f"binary_data_size add up to {used}")
    outputs, binary_flags = [], {}
    raw_outputs = doc.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise InvalidArgument("'outputs' must be a list of {name, parameters} objects")
    for i, entry in enumerate(raw_outputs):
        entry = _object(entry, f"outputs[{i}]")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"outputs[{i}]: 'name' must be a non-empty string")
        out_params = _object(entry.get("parameters"), f"output '{name}' parameters")
        if "classification" in out_params:
            raise InvalidArgument(f"output '{name}': the classification extension is not supported; "
                                  "ask for the output itself")
        outputs.append(name)
        if "binary_data" in out_params:
            binary_flags[name] = _flag(out_params, "binary_data", f"output '{name}' parameters")
    return InferRequest(inputs, outputs, binary_flags, binary_default, request_id)


def _input(entry: Any, index: int, binary: bytes, offset: int) -> tuple[WireTensor, int]:
    """One input as a WireTensor with raw bytes, and how many bytes of ``binary`` it took."""
    entry = _object(entry, f"inputs[{index}]")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"inputs[{index}]: 'name' must be a non-empty string")
    datatype = entry.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"input '{name}': 'datatype' must be a string such as \"FP32\"")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidArgument(f"input '{name}': 'shape' must be a list of integers, e.g. [2, 3]")
    params = _object(entry.get("parameters"), f"input '{name}' parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0:
            raise InvalidArgument(f"input '{name}': binary_data_size must be a whole number of bytes")
        if "data" in entry:
            raise InvalidArgument(f"input '{name}': has both 'data' and binary_data_size; send one")
        if offset + size > len(binary):
            raise InvalidArgument(f"input '{name}': binary_data_size is {size} but only {len(binary) - offset} "
                                  "bytes of binary data are left after the JSON")
        return WireTensor(name, datatype, tuple(shape), binary[offset:offset + size]), size
    if "data" not in entry:
        raise InvalidArgument(f"input '{name}': no 'data' and no binary_data_size parameter")
    if datatype not in tensors.DATATYPES:
        raw = b""  # to_array names the datatypes there are
    else:
        raw = _json_raw(name, datatype, entry["data"], tuple(shape))
    return WireTensor(name, datatype, tuple(shape), raw), 0


def _json_raw(name: str, datatype: str, data: Any, shape: tuple[int, ...] = ()) -> bytes:
    """JSON ``data`` (nested or flat) -> the OIP raw form of ``datatype``, checking every value's type."""
    if isinstance(data, simdjson.Array):
        if datatype in _FLOATS:
            try:
                values = np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)
            except (TypeError, ValueError):  # not all numbers: the list path says what is wrong
                values = None
            # flat data only (what tritonclient and KServe's clients send): nested data takes the list path, which
            # says when it is nested unevenly
            if values is not None and values.size == len(data) == int(np.prod(shape)):
                return values.astype(tensors.DATATYPES[datatype]).tobytes()
        data = data.as_list()
    try:
        array = np.asarray(data) if isinstance(data, list) else np.asarray([data])
    except ValueError:  # ragged nesting
        raise InvalidArgument(f"input '{name}': 'data' is nested unevenly; give it flat in row-major "
                              "order or nested as the shape") from None
    kind = array.dtype.kind
    if array.size == 0:
        kind = "empty"
    if datatype == "BYTES":
        if kind not in ("U", "empty"):
            raise InvalidArgument(f"input '{name}': BYTES data must be strings")
        return tensors.encode_bytes(array.ravel().tolist())
    wire = tensors.DATATYPES[datatype]
    if datatype == "BOOL":
        if kind not in ("b", "empty"):
            raise InvalidArgument(f"input '{name}': BOOL data must be true or false")
    elif wire.kind in "iu":
        if kind not in ("i", "u", "empty"):
            raise InvalidArgument(f"input '{name}': {datatype} data must be integers")
        # numpy read the values as int64 (or uint64 past its range): when that fits the wire type every value
        # does, and the scans below (a fifth of a decoded INT64 reply's cost) are skipped
        info = np.iinfo(wire)
        if array.size and not np.can_cast(array.dtype, wire) and (array.min() < info.min or array.max() > info.max):
            raise InvalidArgument(f"input '{name}': data has values outside the {datatype} range "
                                  f"[{info.min}, {info.max}]")
    elif kind not in ("f", "i", "u", "empty"):  # FP*: JSON writes 1.0 as 1
        raise InvalidArgument(f"input '{name}': {datatype} data must be numbers")
    return np.ascontiguousarray(array, dtype=wire).tobytes()


def encode_reply(model_name: str, model_version: str, request_id: str,
                 results: Sequence[tuple[str, np.ndarray]], request: InferRequest) -> tuple[bytes, int | None]:
    """The reply body, and the length of its JSON part when binary data follows (None: JSON only)."""
    outputs, blobs = [], []
    for name, array in results:
        datatype = tensors.datatype_of(np.asarray(array).dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(np.shape(array))}
        if request.binary.get(name, request.binary_default):
            _, _, raw = tensors.to_raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(np.asarray(array), datatype)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request_id:
        doc["id"] = request_id
    head = dumps(doc)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _json_data(array: np.ndarray, datatype: str) -> Any:
    flat = array.ravel()  # contiguous, as orjson writes arrays
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat.tolist()]
    return flat.astype(flat.dtype.newbyteorder("="), copy=False)


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be a JSON object")
    return value


def _flag(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}: {key} must be true or false")
    return value


def parse_reply(body: bytes, header_length: str | None) -> tuple[str, str, list[WireTensor]]:
    """A REST infer reply -> (model name, model version, outputs as WireTensors with raw bytes): what
    ``agent proxy`` reads of an upstream's answer. Outputs take the same form as inputs (JSON ``data``
    or ``binary_data_size`` after the JSON part), so they decode the same way; InvalidArgument if malformed."""
    head, binary = body, b""
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise InvalidArgument(f"the reply's Inference-Header-Content-Length {header_length!r} does not fit its "
                                  f"{len(body)} bytes")
        head, binary = body[:int(header_length)], body[int(header_length):]
    try:
        doc = _load(head)
    except ValueError as exc:
        raise InvalidArgument(f"the reply is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise InvalidArgument("the reply is not a JSON object with 'outputs'")
    outputs, used = [], 0
    for i, entry in enumerate(doc["outputs"]):
        tensor, size = _input(entry, i, binary, used)
        outputs.append(tensor)
        used += size
    name, version = doc.get("model_name", ""), doc.get("model_version", "")
    return (name if isinstance(name, str) else "", version if isinstance(version, str) else "", outputs)
