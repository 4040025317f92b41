"""OIP wire form <-> numpy: round trips and every refusal, without a server."""
from __future__ import annotations

import numpy as np
import pytest

from agent import tensors
from agent.errors import InvalidArgument
from agent.tensors import TensorSpec, WireTensor
from protos import open_inference_pb2 as pb

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
           "FP16", "FP32", "FP64"]


def sample(datatype: str, shape=(3, 2)) -> np.ndarray:
    dtype = tensors.DATATYPES[datatype].newbyteorder("=")
    values = np.arange(np.prod(shape)).reshape(shape)
    if datatype == "BOOL":
        return (values % 2).astype(bool)
    if dtype.kind == "i":
        return (values - 2).astype(dtype)  # some negatives
    return (values * 1.5 if dtype.kind == "f" else values).astype(dtype)


def raw_tensor(name, datatype, shape, raw) -> WireTensor:
    return WireTensor(name, datatype, tuple(shape), raw)


def typed_tensor(name, datatype, shape, **contents) -> WireTensor:
    return WireTensor(name, datatype, tuple(shape), None, pb.InferTensorContents(**contents))


@pytest.mark.parametrize("datatype", NUMERIC)
def test_raw_round_trip(datatype):
    array = sample(datatype)
    got_type, shape, raw = tensors.to_raw(array)
    assert (got_type, shape) == (datatype, [3, 2])
    assert raw == array.astype(tensors.DATATYPES[datatype]).tobytes()  # little-endian on the wire
    back = tensors.to_array(raw_tensor("x", datatype, shape, raw), TensorSpec("x", datatype, (-1, 2)))
    assert back.dtype == array.dtype and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_outputs_go_out_little_endian_and_row_major_whatever_their_layout():
    values = np.arange(6, dtype=np.int32).reshape(2, 3)
    wire = values.astype("<i4").tobytes()
    for array in (values.astype(">i4"), np.asfortranarray(values), values.T.copy().T):
        datatype, shape, raw = tensors.to_raw(array)
        assert (datatype, shape, raw) == ("INT32", [2, 3], wire), array.dtype


def test_bytes_round_trip_decodes_to_str():
    array = np.array([["paris", ""], ["zürich", "東京"]], dtype=object)
    datatype, shape, raw = tensors.to_raw(array)
    assert datatype == "BYTES" and shape == [2, 2]
    assert raw[:4] == (5).to_bytes(4, "little") and raw[4:9] == b"paris"
    back = tensors.to_array(raw_tensor("s", "BYTES", shape, raw), TensorSpec("s", "BYTES", (-1, 2)))
    assert back.dtype == object and back.tolist() == array.tolist()


def test_str_and_bytes_outputs_encode_the_same():
    assert tensors.to_raw(np.array(["ab", "c"]))[2] == tensors.encode_bytes([b"ab", b"c"])


@pytest.mark.parametrize("datatype, field, values", [
    ("BOOL", "bool_contents", [True, False, True, True, False, False]),
    ("UINT8", "uint_contents", [0, 1, 2, 253, 254, 255]),
    ("UINT16", "uint_contents", [0, 1, 2, 3, 4, 65535]),
    ("UINT32", "uint_contents", [0, 1, 2, 3, 4, 2**32 - 1]),
    ("UINT64", "uint64_contents", [0, 1, 2, 3, 4, 2**64 - 1]),
    ("INT8", "int_contents", [-128, -1, 0, 1, 2, 127]),
    ("INT16", "int_contents", [-32768, -1, 0, 1, 2, 32767]),
    ("INT32", "int_contents", [-2**31, -1, 0, 1, 2, 2**31 - 1]),
    ("INT64", "int64_contents", [-2**63, -1, 0, 1, 2, 2**63 - 1]),
    ("FP32", "fp32_contents", [0.5, -1.25, 0, 1, 2, 3]),
    ("FP64", "fp64_contents", [0.1, -1e300, 0, 1, 2, 3]),
    ("BYTES", "bytes_contents", [b"a", b"", "é".encode(), b"d", b"e", b"f"]),
])
def test_typed_contents(datatype, field, values):
    got = tensors.to_array(typed_tensor("t", datatype, [3, 2], **{field: values}),
                           TensorSpec("t", datatype, (-1, 2)))
    expected = [v.decode() for v in values] if datatype == "BYTES" else values
    assert got.shape == (3, 2)
    assert got.ravel().tolist() == expected
    if datatype != "BYTES":
        assert got.dtype == tensors.DATATYPES[datatype].newbyteorder("=")


def refused(tensor: WireTensor, spec: TensorSpec) -> str:
    with pytest.raises(InvalidArgument) as info:
        tensors.to_array(tensor, spec)
    message = str(info.value)
    assert f"'{tensor.name}'" in message  # every refusal names the input
    return message


SPEC = TensorSpec("X", "FP32", (-1, 4))
FOUR = np.zeros((2, 4), np.float32).tobytes()


def test_unknown_datatype():
    assert "unknown datatype 'FLOAT'" in refused(raw_tensor("X", "FLOAT", [2, 4], FOUR), SPEC)


def test_datatype_must_match_the_model():
    message = refused(raw_tensor("X", "FP64", [2, 4], np.zeros((2, 4)).tobytes()), SPEC)
    assert "FP64" in message and "expects FP32" in message


def test_rank_must_match():
    assert "rank 1" in refused(raw_tensor("X", "FP32", [8], FOUR), SPEC)


def test_fixed_dimension_must_match():
    assert "[N, 4]" in refused(raw_tensor("X", "FP32", [4, 2], FOUR), SPEC)


def test_negative_dimension():
    assert "negative" in refused(raw_tensor("X", "FP32", [-1, 4], FOUR), SPEC)


def test_raw_length_must_match_shape():
    message = refused(raw_tensor("X", "FP32", [3, 4], FOUR), SPEC)
    assert "32 bytes, expected 48" in message


def test_raw_bool_must_be_0_or_1():
    assert "0 or 1" in refused(raw_tensor("b", "BOOL", [2], b"\x00\x02"), TensorSpec("b", "BOOL", (-1,)))


BYTES_SPEC = TensorSpec("s", "BYTES", (-1,))


@pytest.mark.parametrize("raw, words", [
    (b"\x05\x00", "truncated length prefix"),
    (b"\x09\x00\x00\x00abc", "declares 9 bytes but only 3 remain"),
    (tensors.encode_bytes([b"a", b"b", b"c"]), "holds 3 elements, expected 2"),
    (tensors.encode_bytes([b"a"]), "holds 1 elements, expected 2"),
    (tensors.encode_bytes([b"a", b"\xff\xfe"]), "not valid UTF-8"),
])
def test_malformed_bytes(raw, words):
    assert words in refused(raw_tensor("s", "BYTES", [2], raw), BYTES_SPEC)


def test_typed_count_must_match_shape():
    message = refused(typed_tensor("X", "FP32", [2, 4], fp32_contents=[1.0] * 7), SPEC)
    assert "holds 7 elements, expected 8" in message


def test_typed_wrong_field():
    message = refused(typed_tensor("X", "FP32", [1, 4], fp32_contents=[1.0] * 4, fp64_contents=[1.0]), SPEC)
    assert "contents.fp32_contents" in message and "contents.fp64_contents" in message


def test_typed_narrow_ints_are_range_checked():
    message = refused(typed_tensor("i", "INT8", [2], int_contents=[1, 200]), TensorSpec("i", "INT8", (-1,)))
    assert "INT8 range" in message


def test_fp16_has_no_typed_form():
    message = refused(typed_tensor("h", "FP16", [1], fp32_contents=[1.0]), TensorSpec("h", "FP16", (-1,)))
    assert "raw_input_contents" in message


def test_wire_inputs_pairs_raw_by_position():
    inputs = [pb.ModelInferRequest.InferInputTensor(name=n, datatype="FP32", shape=[1]) for n in "ab"]
    wire = tensors.wire_inputs(inputs, [b"1111", b"2222"])
    assert [(t.name, t.raw, t.contents) for t in wire] == [("a", b"1111", None), ("b", b"2222", None)]


def test_wire_inputs_refuses_a_raw_count_mismatch():
    inputs = [pb.ModelInferRequest.InferInputTensor(name=n, datatype="FP32", shape=[1]) for n in "ab"]
    with pytest.raises(InvalidArgument, match="1 raw_input_contents entries for 2 inputs"):
        tensors.wire_inputs(inputs, [b"1111"])


def test_wire_inputs_refuses_raw_and_typed_mixed():
    inputs = [pb.ModelInferRequest.InferInputTensor(name="a", datatype="FP32", shape=[1]),
              pb.ModelInferRequest.InferInputTensor(
                  name="b", datatype="FP32", shape=[1], contents=pb.InferTensorContents(fp32_contents=[1]))]
    with pytest.raises(InvalidArgument, match="input 'b'.*not both"):
        tensors.wire_inputs(inputs, [b"1111", b"2222"])


def test_onnx_types_and_shapes():
    assert tensors.oip_datatype("tensor(float)") == "FP32"
    assert tensors.oip_datatype("tensor(string)") == "BYTES"
    assert tensors.oip_datatype("tensor(float16)") == "FP16"
    with pytest.raises(InvalidArgument, match="tensor\\(bfloat16\\)"):
        tensors.oip_datatype("tensor(bfloat16)")
    assert tensors.spec_shape([None, "batch", 3, 0]) == (-1, -1, 3, 0)


# ------------------------------------------------------------------ the common case's shortcut

def infer_input(name, datatype, shape) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))


SHORTCUT_SPECS = [TensorSpec("x", "FP32", (-1, 4)), TensorSpec("x", "INT64", (2, -1, 3)), TensorSpec("x", "INT32", (-1, -1)),
                  TensorSpec("x", "FP16", (-1,)), TensorSpec("x", "UINT8", (2, 3)), TensorSpec("x", "FP64", ())]


def shortcut_cases(spec: TensorSpec) -> list[tuple[str, str, list[int], bytes]]:
    """(name, datatype, shape, raw): a request that fits ``spec``, and one per way of not fitting it."""
    shape = [2 if d < 0 else d for d in spec.shape]
    itemsize = tensors.DATATYPES[spec.datatype].itemsize
    raw = bytes(range(256)) * 4
    good = raw[:int(np.prod(shape)) * itemsize]
    empty = [0 if d < 0 else d for d in spec.shape]
    cases = [("x", spec.datatype, shape, good), ("x", spec.datatype, empty, b""),
             ("y", spec.datatype, shape, good), ("x", "FP32" if spec.datatype != "FP32" else "FP64", shape, good),
             ("x", "NOPE", shape, good), ("x", spec.datatype, shape, good[:-1]), ("x", spec.datatype, shape, good + b"\0"),
             ("x", spec.datatype, [*shape, 1], good), ("x", spec.datatype, shape[:-1], good)]
    if shape:
        cases.append(("x", spec.datatype, [-shape[0], *shape[1:]], good))
        cases.append(("x", spec.datatype, [-n if d < 0 else n for n, d in zip(shape, spec.shape)], good))
        cases.append(("x", spec.datatype, [shape[0] + 1, *shape[1:]], good))
        cases.append(("x", spec.datatype, [*shape[:-1], shape[-1] + 1], good))
    return cases


@pytest.mark.parametrize("spec", SHORTCUT_SPECS, ids=lambda s: f"{s.datatype}{list(s.shape)}")
def test_the_shortcut_decodes_what_to_array_does_or_declines(spec):
    decode = tensors.raw_decoder(spec)
    assert decode is not None
    for name, datatype, shape, raw in shortcut_cases(spec):
        got = decode(infer_input(name, datatype, shape), raw)
        try:
            want = tensors.to_array(raw_tensor(name, datatype, shape, raw), spec)
        except InvalidArgument:
            assert got is None, (name, datatype, shape, len(raw))  # refused: the general path says why
            continue
        if name == "x" and datatype == spec.datatype:  # what the shortcut is for: it takes it
            assert got is not None, (shape, len(raw))
        if got is not None:
            assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("datatype", ["BOOL", "BYTES"])
def test_datatypes_whose_elements_need_a_check_never_take_the_shortcut(datatype):
    assert tensors.raw_decoder(TensorSpec("x", datatype, (-1, 2))) is None


def test_wire_form_is_to_raw_without_the_shape():
    for array in (sample("FP32"), sample("INT64").astype(">i8"), np.array([["a", "bc"]], dtype=object)):
        datatype, shape, raw = tensors.to_raw(array)
        assert tensors.wire_form(array) == (datatype, raw) and shape == list(array.shape)
