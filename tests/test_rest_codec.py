"""agent.rest.codec's two readers: orjson for small bodies, simdjson (FP* data into a buffer of doubles) from
SIMDJSON_BYTES on. Every body is read both ways here, whatever its size, and must give the same tensors, or
the same error (message included), either way."""
import json

import numpy as np
import pytest
import simdjson

from agent.errors import InvalidArgument
from agent.rest import codec

PATHS = {"orjson": 1 << 40, "simdjson": 0}


def both(monkeypatch, parse, *args):
    """``parse(*args)`` read each way: {path: result or the InvalidArgument's message}."""
    seen = {}
    for path, threshold in PATHS.items():
        monkeypatch.setattr(codec, "SIMDJSON_BYTES", threshold)
        try:
            seen[path] = parse(*args)
        except InvalidArgument as exc:
            seen[path] = f"InvalidArgument: {exc}"
    return seen


def request(data, datatype="FP32", shape=(2, 3), **extra) -> bytes:
    return json.dumps({"id": "r1", "inputs": [{"name": "X", "shape": list(shape), "datatype": datatype,
                                               "data": data}], **extra}).encode()


def test_large_bodies_take_the_buffer_path_small_ones_orjson():
    big = request(np.zeros(4096).tolist(), shape=(4096,))
    assert len(big) >= codec.SIMDJSON_BYTES
    assert isinstance(codec._load(big)["inputs"][0]["data"], simdjson.Array)
    small = request([1.0, 2.0], shape=(2,))
    assert len(small) < codec.SIMDJSON_BYTES
    assert isinstance(codec._load(small)["inputs"][0]["data"], list)


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
@pytest.mark.parametrize("nested", [False, True])
def test_floats_read_the_same_either_way(monkeypatch, datatype, nested):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 20)).astype(np.float32 if datatype != "FP64" else np.float64)
    x[0, :5] = [0.0, -0.0, 1e-7, -65504.0, 5e-324 if datatype == "FP64" else 1.0]
    data = x.tolist() if nested else x.ravel().tolist()
    data[1] = [int(v) for v in data[1]] if nested else 7  # integers are numbers too
    seen = both(monkeypatch, codec.parse_infer, request(data, datatype, x.shape), None)
    raws = {path: r.inputs[0].raw for path, r in seen.items()}
    assert raws["orjson"] == raws["simdjson"]
    assert seen["simdjson"].request_id == "r1" and seen["simdjson"].inputs[0].shape == (64, 20)


@pytest.mark.parametrize("data, datatype, shape, words", [
    (["1", "2"], "FP32", (2,), "FP32 data must be numbers"),
    ([True, False], "FP32", (2,), "FP32 data must be numbers"),
    ([None, 1.0], "FP64", (2,), "FP64 data must be numbers"),
    ([[1.0, 2.0], [3.0]], "FP32", (2, 2), "nested unevenly"),
    ([1.5, 2], "INT32", (2,), "INT32 data must be integers"),
    ([-129, 0], "INT8", (2,), "outside the INT8 range"),
    ([1, 0], "BOOL", (2,), "BOOL data must be true or false"),
])
def test_bad_data_is_refused_the_same_either_way(monkeypatch, data, datatype, shape, words):
    seen = both(monkeypatch, codec.parse_infer, request(data, datatype, shape), None)
    assert seen["orjson"] == seen["simdjson"] and words in seen["simdjson"], seen


def test_a_count_that_does_not_match_the_shape_is_left_to_the_shape_check_either_way(monkeypatch):
    seen = both(monkeypatch, codec.parse_infer, request([1.0, 2.0, 3.0], "FP32", (2, 2)), None)
    assert seen["orjson"] == seen["simdjson"] and len(seen["simdjson"].inputs[0].raw) == 12


@pytest.mark.parametrize("body", [b"{", b'{"inputs": [{"data": [NaN]}]}', b'{"inputs": []} trailing',
                                  b'{"id": "\xff"}', b"[1]"])
def test_not_json_is_refused_either_way(monkeypatch, body):
    seen = both(monkeypatch, codec.parse_infer, body, None)
    for message in seen.values():
        assert message.startswith("InvalidArgument: ") and ("not valid JSON" in message or "JSON object" in message)


def test_replies_read_the_same_either_way(monkeypatch):
    probabilities = np.random.default_rng(3).random((512, 2)).astype(np.float32)
    reply = json.dumps({"model_name": "m", "model_version": "2", "outputs": [
        {"name": "label", "shape": [512], "datatype": "INT64", "data": list(range(512))},
        {"name": "probabilities", "shape": [512, 2], "datatype": "FP32", "data": probabilities.tolist()}]}).encode()
    seen = both(monkeypatch, codec.parse_reply, reply, None)
    assert seen["orjson"] == seen["simdjson"]
    name, version, outputs = seen["simdjson"]
    assert (name, version) == ("m", "2")
    assert np.array_equal(np.frombuffer(outputs[1].raw, np.float32).reshape(512, 2), probabilities)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e39 as FP32: inf, both ways
@pytest.mark.parametrize("nested", [False, True])
def test_mangled_bodies_are_read_or_refused_the_same_either_way(monkeypatch, nested):
    """A hostile or broken client: bytes of a 64-row body replaced, cut out or inserted at random."""
    import random

    rng = random.Random(7)
    x = np.random.default_rng(5).standard_normal((64, 20)).astype(np.float32)
    base = request(x.tolist() if nested else x.ravel().tolist(), shape=x.shape, outputs=[{"name": "label"}])
    alphabet = b'[]{},:"0123456789.eE-+ \\truefalsnl\xff\x00'
    outcomes = set()
    for _ in range(400):
        body = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            at, how = rng.randrange(len(body)), rng.random()
            if how < 0.4:
                body[at] = rng.choice(alphabet)
            elif how < 0.7:
                del body[at:at + rng.randint(1, 40)]
            else:
                body[at:at] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
        seen = both(monkeypatch, codec.parse_infer, bytes(body), None)
        assert seen["orjson"] == seen["simdjson"], bytes(body)
        outcomes.add(isinstance(seen["orjson"], str))
    assert outcomes == {True, False}  # some bodies still read, some refused
