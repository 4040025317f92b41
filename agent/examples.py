"""Small ONNX models built locally from scikit-learn, for the demo, tests and benchmarks.

Nothing is downloaded: each builder trains on seeded synthetic data and
converts with skl2onnx (the ``demo`` extra). Each returns the serialized model.
"""
from __future__ import annotations

import numpy as np

N_TRAIN = 2_000


def _to_onnx(model, sample, *, zipmap: bool = True, **kw) -> bytes:
    from skl2onnx import to_onnx

    options = {} if zipmap else {id(model): {"zipmap": False}}
    return to_onnx(model, sample, options=options, target_opset=17, **kw).SerializeToString()


def tabular_data(n: int = N_TRAIN, n_features: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal float32 features and a binary label that depends on a few of them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_features)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] - 0.25 * x[:, 2] + 0.3 * rng.standard_normal(n) > 0).astype(np.int64)
    return x, y


def logistic_regression(n_features: int = 20, *, zipmap: bool = False) -> bytes:
    """Binary logistic regression: input ``X`` float[N, n_features]; outputs label, probabilities."""
    from sklearn.linear_model import LogisticRegression

    x, y = tabular_data(n_features=n_features)
    return _to_onnx(LogisticRegression(max_iter=500).fit(x, y), x[:1], zipmap=zipmap)


def random_forest(n_features: int = 20, n_trees: int = 50, *, zipmap: bool = False) -> bytes:
    """A 50-tree ensemble classifier on the same data (max depth 8)."""
    from sklearn.ensemble import RandomForestClassifier

    x, y = tabular_data(n_features=n_features)
    forest = RandomForestClassifier(n_estimators=n_trees, max_depth=8, random_state=0).fit(x, y)
    return _to_onnx(forest, x[:1], zipmap=zipmap)


def linear_regression(n_features: int = 5) -> bytes:
    """Regression: input ``X`` float[N, n_features]; output ``variable`` float[N, 1]."""
    from sklearn.linear_model import LinearRegression

    x, _ = tabular_data(n_features=n_features)
    y = x @ np.arange(1, n_features + 1, dtype=np.float32)
    return _to_onnx(LinearRegression().fit(x, y), x[:1])


CITIES = ("paris", "lyon", "nice", "lille")


def mixed_inputs_classifier() -> bytes:
    """Two inputs, numeric and categorical: ``num`` float[N, 3] and ``city`` string[N, 1].

    The city is label-encoded (unknown cities -> -1) and concatenated with the
    numbers; a fixed linear layer and softmax give ``label`` int64[N] and
    ``probabilities`` float[N, 2]. Hand-built with onnx.helper: scikit-learn
    needs pandas to route named columns of two tensors.
    """
    from onnx import TensorProto, helper

    w = np.array([[1.0, -1.0], [0.5, -0.5], [-0.25, 0.25], [0.7, -0.7]], dtype=np.float32)
    nodes = [
        helper.make_node("LabelEncoder", ["city"], ["city_id"], domain="ai.onnx.ml",
                         keys_strings=list(CITIES), values_int64s=list(range(len(CITIES))),
                         default_int64=-1),
        helper.make_node("Cast", ["city_id"], ["city_f"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["num", "city_f"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "mixed_inputs",
        [helper.make_tensor_value_info("num", TensorProto.FLOAT, [None, 3]),
         helper.make_tensor_value_info("city", TensorProto.STRING, [None, 1])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.flatten())],
    )
    return _finish(graph)


def image_scorer() -> bytes:
    """A non-tabular input: ``image`` float[N, 3, 8, 8] -> ``score`` float[N, 1] (its mean)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=0),
         helper.make_node("Unsqueeze", ["m", "one"], ["score"])],
        "image_scorer",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor("one", TensorProto.INT64, [1], [1])],
    )
    return _finish(graph)


def typed_identity() -> bytes:
    """One input and output per OIP dtype, each ``<dtype>_in`` -> ``<dtype>_out``, shape [N, 2].

    Lets the inference endpoint's wire conversions be tested for every type.
    """
    from onnx import TensorProto, helper

    types = {"fp16": TensorProto.FLOAT16, "fp32": TensorProto.FLOAT, "fp64": TensorProto.DOUBLE,
             "int8": TensorProto.INT8, "int16": TensorProto.INT16, "int32": TensorProto.INT32,
             "int64": TensorProto.INT64, "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL,
             "bytes": TensorProto.STRING}
    nodes = [helper.make_node("Identity", [f"{n}_in"], [f"{n}_out"]) for n in types]
    graph = helper.make_graph(
        nodes, "typed_identity",
        [helper.make_tensor_value_info(f"{n}_in", t, [None, 2]) for n, t in types.items()],
        [helper.make_tensor_value_info(f"{n}_out", t, [None, 2]) for n, t in types.items()],
    )
    return _finish(graph, opset=13)


def _finish(graph, opset: int = 17) -> bytes:
    from onnx import checker, helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8  # readable by every onnxruntime we support
    checker.check_model(model)
    return model.SerializeToString()
