"""Open Inference Protocol tensors <-> numpy arrays, with every check a request needs.

Plain Python: no gRPC here. The functions read the request's protobuf fields
(``InferInputTensor``, ``InferTensorContents``) by attribute and return numpy
arrays; anything malformed raises ``InvalidArgument`` naming the input and
saying what was expected, so a bad request is refused before the model sees it.

Wire forms (OIP / KServe V2):
- raw: one ``bytes`` per input, flattened row-major, little-endian. Decoded
  with ``np.frombuffer`` and explicit ``<`` dtypes (no per-element unpacking).
- BYTES raw: each element is a 4-byte little-endian length then its bytes.
- typed: ``InferTensorContents``, one repeated field per wire type; FP16 has
  no typed field and travels raw only.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from agent.errors import InvalidArgument

# OIP datatype -> numpy dtype on the wire. BYTES is an object array of str.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# onnxruntime's NodeArg.type strings for the tensor types OIP can carry.
ONNX_TO_OIP: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# Which InferTensorContents field carries each datatype.
_TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_TYPED_FIELDS = tuple(sorted(set(_TYPED_FIELD.values())))


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as OIP sees it; -1 in ``shape`` is a free dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class WireTensor(NamedTuple):
    """One request input as it came off the wire: header plus raw bytes or typed contents.

    A NamedTuple, not a frozen dataclass: one is built per input of every request, and a frozen
    dataclass's ``__init__`` (``object.__setattr__`` per field) costs three times as much."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None
    contents: Any = None  # an InferTensorContents message when the typed form is used


def oip_datatype(onnx_type: str) -> str:
    """'tensor(float)' -> 'FP32'; raises InvalidArgument for types OIP cannot carry."""
    try:
        return ONNX_TO_OIP[onnx_type]
    except KeyError:
        raise InvalidArgument(
            f"ONNX type {onnx_type} has no Open Inference Protocol datatype "
            f"(supported: {', '.join(ONNX_TO_OIP)})"
        ) from None


def spec_shape(dims: Sequence[Any]) -> tuple[int, ...]:
    """onnxruntime dims (int, None or a symbolic name) -> OIP dims with -1 for free ones."""
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)


def wire_inputs(inputs: Sequence[Any], raw_input_contents: Sequence[bytes]) -> list[WireTensor]:
    """Pair each ``InferInputTensor`` with its raw bytes or typed contents.

    The request must use one form throughout: OIP matches raw entries to
    inputs by position, so a mixed request would pair the wrong bytes.
    """
    if len(raw_input_contents):
        if len(raw_input_contents) != len(inputs):
            raise InvalidArgument(
                f"request has {len(raw_input_contents)} raw_input_contents entries for {len(inputs)} inputs; "
                "send exactly one raw entry per input, in input order"
            )
        for tensor in inputs:
            if _has_typed_contents(tensor):
                raise InvalidArgument(
                    f"input '{tensor.name}': has typed contents but the request also uses "
                    "raw_input_contents; send every input raw or every input typed, not both"
                )
        # zip, not list(): copying a protobuf repeated field costs more than the rest of this together
        return [WireTensor(tensor.name, tensor.datatype, tuple(tensor.shape), raw)
                for tensor, raw in zip(inputs, raw_input_contents)]
    return [WireTensor(tensor.name, tensor.datatype, tuple(tensor.shape), None, tensor.contents) for tensor in inputs]


def to_array(tensor: WireTensor, spec: TensorSpec) -> np.ndarray:
    """Check ``tensor`` against the model input ``spec`` and decode it to a native numpy array."""
    name = tensor.name
    if tensor.datatype not in DATATYPES:
        raise InvalidArgument(
            f"input '{name}': unknown datatype '{tensor.datatype}'; "
            f"expected {spec.datatype} (OIP datatypes: {', '.join(DATATYPES)})"
        )
    if tensor.datatype != spec.datatype:
        raise InvalidArgument(
            f"input '{name}': datatype {tensor.datatype} does not match the model, "
            f"which expects {spec.datatype}"
        )
    _check_shape(name, tensor.shape, spec.shape)
    count = math.prod(tensor.shape)
    if tensor.raw is not None:
        flat = _decode_raw(name, tensor.datatype, tensor.raw, count)
    else:
        flat = _decode_typed(name, tensor.datatype, tensor.contents, count)
    return flat.reshape(tensor.shape)


# ``decode(tensor, raw)``: the common case's ``to_array`` (see ``raw_decoder``); None: not that case.
RawDecoder = Callable[[Any, bytes], "np.ndarray | None"]


def raw_decoder(spec: TensorSpec) -> RawDecoder | None:
    """A decoder for the request nearly every client sends to input ``spec``: its name, its datatype, a
    shape that fits and raw contents of the right length. ``decode(tensor, raw)`` (``tensor`` an
    ``InferInputTensor`` or a ``WireTensor`` with ``raw`` its bytes) returns the array ``to_array`` would,
    or None as soon as anything differs -- then ``to_array`` checks the tensor and says what is wrong, so
    every refusal keeps its one message. The same checks as ``to_array`` in fewer Python operations: it runs
    under the GIL on every request. None for datatypes whose elements need a check or a byte swap (BOOL,
    BYTES, non-native byte order), which always take ``to_array``."""
    wire = DATATYPES.get(spec.datatype)
    if wire is None or spec.datatype in ("BOOL", "BYTES") or not wire.isnative:
        return None
    name, datatype, itemsize, rank = spec.name, spec.datatype, wire.itemsize, len(spec.shape)
    fixed = tuple((i, d) for i, d in enumerate(spec.shape) if d >= 0)
    free = tuple(i for i, d in enumerate(spec.shape) if d < 0)
    prod = math.prod
    frombuffer = np.frombuffer

    def decode(tensor: Any, raw: bytes) -> np.ndarray | None:
        if tensor.name != name or tensor.datatype != datatype:
            return None
        shape = tensor.shape[:]  # a list from protobuf's repeated field (far cheaper than tuple() of it)
        if len(shape) != rank:
            return None
        for i, want in fixed:
            if shape[i] != want:
                return None
        for i in free:
            if shape[i] < 0:
                return None
        if len(raw) != prod(shape) * itemsize:
            return None
        return frombuffer(raw, wire).reshape(shape)

    return decode


def to_raw(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """An output array -> (OIP datatype, shape, raw bytes in the OIP wire form)."""
    array = np.asarray(array)
    datatype, raw = wire_form(array)
    return datatype, list(array.shape), raw


def wire_form(array: np.ndarray) -> tuple[str, bytes]:
    """A numpy array -> (OIP datatype, raw bytes in the OIP wire form): ``to_raw`` without the shape,
    for a reply that takes ``array.shape`` as it is."""
    dtype = array.dtype
    datatype = _DATATYPE_OF.get(dtype) or datatype_of(dtype)
    if datatype == "BYTES":
        return datatype, encode_bytes(array.ravel())
    if dtype.byteorder in _LITTLE_ENDIAN:  # the usual case: already the wire form
        return datatype, array.tobytes()  # row-major whatever the array's layout
    return datatype, np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()


def datatype_of(dtype: np.dtype) -> str:
    """numpy dtype -> OIP datatype (str / bytes / object arrays are BYTES)."""
    known = _DATATYPE_OF.get(dtype)  # every reply asks this per output: a dict hit, not a scan
    if known is not None:
        return known
    if dtype.kind in "OUS":
        return "BYTES"
    for datatype, wire in DATATYPES.items():
        if datatype != "BYTES" and wire.kind == dtype.kind and wire.itemsize == dtype.itemsize:
            _DATATYPE_OF[dtype] = datatype  # a handful of dtypes at most
            return datatype
    raise InvalidArgument(f"numpy dtype {dtype} has no Open Inference Protocol datatype")


_DATATYPE_OF: dict[np.dtype, str] = {}
# numpy byte orders that are little-endian here: "|" (one byte), "<", and "=" (native) on a little-endian host
_LITTLE_ENDIAN = ("|", "<", "=") if sys.byteorder == "little" else ("|", "<")


def encode_bytes(elements: Sequence[Any]) -> bytes:
    """Length-prefixed BYTES wire form; anything not bytes is written as UTF-8 text."""
    parts = []
    for element in elements:
        data = bytes(element) if isinstance(element, (bytes, bytearray)) else str(element).encode("utf-8")
        parts.append(len(data).to_bytes(4, "little"))
        parts.append(data)
    return b"".join(parts)


def decode_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    """Length-prefixed BYTES wire form -> object array of ``count`` str."""
    view = memoryview(raw)
    elements: list[bytes] = []
    pos = 0
    while pos < len(view):
        if len(view) - pos < 4:
            raise InvalidArgument(
                f"input '{name}': BYTES element {len(elements)} has a truncated length prefix "
                f"({len(view) - pos} bytes left); each element needs a 4-byte little-endian length"
            )
        size = int.from_bytes(view[pos:pos + 4], "little")
        pos += 4
        if size > len(view) - pos:
            raise InvalidArgument(
                f"input '{name}': BYTES element {len(elements)} declares {size} bytes but only "
                f"{len(view) - pos} remain; each element is a 4-byte little-endian length then its bytes"
            )
        elements.append(bytes(view[pos:pos + size]))
        pos += size
    if len(elements) != count:
        raise InvalidArgument(
            f"input '{name}': raw BYTES holds {len(elements)} elements, expected {count} from its shape"
        )
    return _text_array(name, elements)


def _text_array(name: str, elements: Sequence[bytes]) -> np.ndarray:
    # ONNX string tensors hold text, and onnxruntime silently turns a bytes
    # object into its repr ("b'..'"), so non-UTF-8 input is refused, not passed on.
    out = np.empty(len(elements), dtype=object)
    for i, data in enumerate(elements):
        try:
            out[i] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"input '{name}': BYTES element {i} is not valid UTF-8; the model's string input takes UTF-8 text"
            ) from None
    return out


def _check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if len(shape) == len(expected) and all(got >= 0 and (want < 0 or got == want)
                                           for got, want in zip(shape, expected)):
        return  # the usual case: no message to build
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{name}': shape {list(shape)} has a negative dimension")
    wanted = "[" + ", ".join("N" if d < 0 else str(d) for d in expected) + "]"
    if len(shape) != len(expected):
        raise InvalidArgument(
            f"input '{name}': shape {list(shape)} has rank {len(shape)}, "
            f"the model expects rank {len(expected)} {wanted}"
        )
    for got, want in zip(shape, expected):
        if want >= 0 and got != want:
            raise InvalidArgument(
                f"input '{name}': shape {list(shape)} does not match the model's {wanted}"
            )


def _decode_raw(name: str, datatype: str, raw: bytes, count: int) -> np.ndarray:
    if datatype == "BYTES":
        return decode_bytes(name, raw, count)
    wire = DATATYPES[datatype]
    if len(raw) != count * wire.itemsize:
        raise InvalidArgument(
            f"input '{name}': raw contents are {len(raw)} bytes, expected {count * wire.itemsize} "
            f"({count} elements x {wire.itemsize} bytes of {datatype})"
        )
    if datatype == "BOOL":
        octets = np.frombuffer(raw, dtype=np.uint8)
        if octets.size and octets.max() > 1:
            raise InvalidArgument(f"input '{name}': raw BOOL bytes must be 0 or 1")
        return octets.view(np.bool_)
    flat = np.frombuffer(raw, dtype=wire)
    # Explicit little-endian on the wire; onnxruntime wants native byte order (the same on x86 and ARM).
    return flat if wire.isnative else flat.astype(wire.newbyteorder("="))


def _decode_typed(name: str, datatype: str, contents: Any, count: int) -> np.ndarray:
    if datatype == "FP16":
        raise InvalidArgument(
            f"input '{name}': FP16 has no typed contents field; send it in raw_input_contents"
        )
    field = _TYPED_FIELD[datatype]
    for other in _ALL_TYPED_FIELDS:
        if other != field and contents is not None and len(getattr(contents, other)):
            raise InvalidArgument(
                f"input '{name}': datatype {datatype} is carried in contents.{field}, "
                f"but contents.{other} was set"
            )
    values = getattr(contents, field) if contents is not None else ()
    if len(values) != count:
        raise InvalidArgument(
            f"input '{name}': contents.{field} holds {len(values)} elements, "
            f"expected {count} from its shape"
        )
    if datatype == "BYTES":
        return _text_array(name, list(values))
    wire = DATATYPES[datatype]
    native = wire.newbyteorder("=")
    if wire.kind in "iu" and wire.itemsize < 4:
        # int_contents / uint_contents are 32-bit: narrow types need a range check.
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(native)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidArgument(
                f"input '{name}': contents.{field} has values outside the {datatype} range "
                f"[{info.min}, {info.max}]"
            )
        return wide.astype(native)
    return np.array(values, dtype=native)


def _has_typed_contents(tensor: Any) -> bool:
    return tensor.HasField("contents") and any(
        len(getattr(tensor.contents, f)) for f in _ALL_TYPED_FIELDS
    )
