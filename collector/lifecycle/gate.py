"""The evaluation gate: the tests a model version must pass before it may be deployed.

Four checks, each stored with its result and a one-line detail:

- ``schema``: the inputs are those of the baseline (same names and types,
  compatible shapes) and the outputs a superset of its outputs;
- ``metrics``: holdout metrics not worse than the baseline's by more than the
  tolerance (accuracy: absolute; MAE: relative);
- ``latency``: p99 of single-row calls (onnxruntime, CPU, one thread) within
  the budget, on rows synthesised from the reference profile's quantiles, or
  zeros of the right shape for inputs the profile does not describe;
- ``finite_predictions``: the predictions on the reference data (the
  profile's PREDICTION columns) hold no NaN and no infinity.

The baseline is the production version; until stages exist, it is the newest
earlier version of the model that passed its gate.

This is the only collector module that loads ONNX models, and it imports
onnxruntime lazily: the collector's serving path never pays for it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import InvalidArgument
from protos import summary_pb2

CS = summary_pb2.ColumnSummary
LATENCY_CALLS = 200
WARMUP_CALLS = 5

# onnxruntime's type names -> numpy dtypes (strings are fed as numpy str arrays)
_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int8)": np.int8, "tensor(int16)": np.int16, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_, "tensor(string)": np.str_,
}


@dataclass(frozen=True)
class GatePolicy:
    accuracy_tolerance: float = 0.01  # absolute drop in accuracy allowed
    mae_tolerance: float = 0.05  # relative rise in MAE allowed (0.05: +5 %)
    latency_budget_ms: float = 50.0  # p99 of single-row calls
    latency_calls: int = LATENCY_CALLS

    def __post_init__(self) -> None:
        if self.accuracy_tolerance < 0 or self.mae_tolerance < 0 or self.latency_budget_ms <= 0:
            raise ValueError("gate tolerances must be >= 0 and the latency budget > 0")
        if self.latency_calls < 1:
            raise ValueError("latency_calls must be at least 1")


def _session(model: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's load errors share no base class
        lines = str(exc).strip().splitlines()
        raise InvalidArgument(f"the artifact is not a loadable ONNX model: {lines[0] if lines else exc}") from None


def _args(args: Any) -> list[dict[str, Any]]:
    return [{"name": a.name, "type": a.type,
             "shape": [d if isinstance(d, int) else None for d in (a.shape or [])]} for a in args]


def read_schema(model: bytes) -> dict[str, Any]:
    """The model's inputs and outputs: name, onnxruntime type, shape (None for symbolic dimensions).
    Raises InvalidArgument when the bytes are not a model onnxruntime can load."""
    session = _session(model)
    return {"inputs": _args(session.get_inputs()), "outputs": _args(session.get_outputs())}


# ------------------------------------------------------------------ the checks


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


def _shapes_compatible(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def check_schema(schema: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    if baseline is None:
        return _check("schema", True, "no earlier version passed its gate: nothing to be compatible with")
    problems = []
    ins = {a["name"]: a for a in schema["inputs"]}
    base_ins = {a["name"]: a for a in baseline["inputs"]}
    if set(ins) != set(base_ins):
        problems.append(f"inputs {sorted(ins)} differ from the baseline's {sorted(base_ins)}")
    for name in sorted(set(ins) & set(base_ins)):
        new, old = ins[name], base_ins[name]
        if new["type"] != old["type"]:
            problems.append(f"input {name} is {new['type']}, was {old['type']}")
        elif not _shapes_compatible(new["shape"], old["shape"]):
            problems.append(f"input {name} has shape {_shape(new['shape'])}, was {_shape(old['shape'])}")
    outs = {a["name"]: a for a in schema["outputs"]}
    missing = [a["name"] for a in baseline["outputs"] if a["name"] not in outs]
    if missing:
        problems.append(f"outputs {missing} of the baseline are missing")
    for old in baseline["outputs"]:
        new = outs.get(old["name"])
        if new is not None and new["type"] != old["type"]:
            problems.append(f"output {old['name']} is {new['type']}, was {old['type']}")
    if problems:
        return _check("schema", False, "incompatible with the baseline: " + "; ".join(problems))
    return _check("schema", True, "inputs match the baseline's; outputs include all of its outputs")


def _shape(shape: list) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def check_metrics(metrics: dict[str, float], baseline: dict[str, float] | None,
                  policy: GatePolicy) -> dict[str, Any]:
    if baseline is None:
        return _check("metrics", True, "no earlier version passed its gate: nothing to compare with")
    compared, problems = [], []
    if "accuracy" in baseline:
        if "accuracy" not in metrics:
            problems.append("the baseline has a holdout accuracy, this version none (register with --holdout)")
        else:
            new, old = metrics["accuracy"], baseline["accuracy"]
            compared.append(f"accuracy {new:.4f} vs {old:.4f}")
            if new < old - policy.accuracy_tolerance:
                problems.append(f"accuracy {new:.4f} is below the baseline's {old:.4f} by more than "
                                f"{policy.accuracy_tolerance:g}")
    if "mae" in baseline:
        if "mae" not in metrics:
            problems.append("the baseline has a holdout MAE, this version none (register with --holdout)")
        else:
            new, old = metrics["mae"], baseline["mae"]
            compared.append(f"MAE {new:.4g} vs {old:.4g}")
            if new > old * (1 + policy.mae_tolerance):
                problems.append(f"MAE {new:.4g} is above the baseline's {old:.4g} by more than "
                                f"{policy.mae_tolerance:.0%}")
    if problems:
        return _check("metrics", False, "; ".join(problems))
    if not compared:
        return _check("metrics", True, "the baseline has no holdout metrics to compare with")
    return _check("metrics", True, ", ".join(compared) + " (within tolerance)")


def check_finite(profile: summary_pb2.ReferenceProfile | None) -> dict[str, Any]:
    if profile is None:
        return _check("finite_predictions", False,
                      "no reference profile: register with --reference or --profile to check the predictions")
    predictions = [c for c in profile.columns if c.role == CS.PREDICTION]
    if not predictions:
        return _check("finite_predictions", False, "the reference profile has no prediction columns")
    bad = [f"{c.name} ({c.missing} NaN, {c.infinite} inf)" for c in predictions if c.missing or c.infinite]
    if bad:
        return _check("finite_predictions", False, "non-finite predictions on the reference data: " + ", ".join(bad))
    return _check("finite_predictions", True,
                  f"{len(predictions)} prediction columns over {profile.rows} reference rows: all finite")


def _column_values(profile: summary_pb2.ReferenceProfile | None, source: str, width: int,
                   n: int) -> np.ndarray | None:
    """n rows of ``width`` values for input ``source``: each column's quantiles at evenly spaced
    ranks, from the profile's numeric feature columns of that input; None if it has no such columns."""
    if profile is None:
        return None
    from agent import sketches

    columns = [c for c in profile.columns if c.source == source and c.role == CS.FEATURE and c.kind == CS.NUMERIC]
    if len(columns) != width:
        return None
    ranks = (np.arange(n) + 0.5) / n
    out = np.zeros((n, width))
    for j, column in enumerate(columns):
        sketch = sketches.NumericSketch.from_proto(column)
        if sketch.finite_count:
            out[:, j] = np.nan_to_num(sketch.quantiles(ranks))
    return out


def _rows(inputs: list[Any], profile: summary_pb2.ReferenceProfile | None, n: int) -> tuple[list[dict], str]:
    feeds: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    synthesised = []
    for arg in inputs:
        dtype = _DTYPES.get(arg.type)
        if dtype is None:
            raise InvalidArgument(f"input {arg.name} has type {arg.type}, which the gate cannot feed")
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in (arg.shape or [])]
        dims[:1] = [1] * min(1, len(dims))  # one row
        width = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        values = _column_values(profile, arg.name, width, n) if len(dims) == 2 and dtype != np.str_ else None
        if values is not None:
            synthesised.append(arg.name)
        for i in range(n):
            row = values[i].astype(dtype).reshape(dims) if values is not None else np.zeros(dims, dtype=dtype)
            feeds[i][arg.name] = row
    how = (f"rows from the profile's quantiles for {', '.join(synthesised)}" if synthesised else "zero rows")
    return feeds, how


def check_latency(model: bytes, profile: summary_pb2.ReferenceProfile | None, policy: GatePolicy) -> dict[str, Any]:
    session = _session(model)
    try:
        feeds, how = _rows(session.get_inputs(), profile, policy.latency_calls)
        for feed in feeds[:WARMUP_CALLS]:
            session.run(None, feed)
        times = []
        for feed in feeds:
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
    except InvalidArgument as exc:
        return _check("latency", False, str(exc))
    except Exception as exc:  # the model fails on a single row
        lines = str(exc).strip().splitlines()
        return _check("latency", False, f"the model failed on a single row: {lines[0] if lines else exc}")
    p50, p99 = (float(np.percentile(times, q)) * 1000 for q in (50, 99))
    detail = (f"p99 {p99:.3f} ms (p50 {p50:.3f} ms) over {len(times)} single-row calls on {how}; "
              f"budget {policy.latency_budget_ms:g} ms")
    return _check("latency", p99 <= policy.latency_budget_ms, detail)


def run_gate(model: bytes, schema: dict[str, Any], metrics: dict[str, float],
             profile: summary_pb2.ReferenceProfile | None, baseline: dict[str, Any] | None,
             policy: GatePolicy) -> dict[str, Any]:
    """Every check on one version. ``baseline`` is {"version", "schema", "metrics"} of the
    version to compare with, or None. Returns {"passed", "baseline_version", "checks": [...]}."""
    checks = [
        check_schema(schema, baseline["schema"] if baseline else None),
        check_metrics(metrics, baseline["metrics"] if baseline else None, policy),
        check_latency(model, profile, policy),
        check_finite(profile),
    ]
    return {"passed": all(c["passed"] for c in checks), "baseline_version": baseline["version"] if baseline else 0,
            "checks": checks, "policy": {"accuracy_tolerance": policy.accuracy_tolerance,
                                         "mae_tolerance": policy.mae_tolerance,
                                         "latency_budget_ms": policy.latency_budget_ms}}


def parse_metrics(text: str) -> dict[str, float]:
    """Holdout metrics as sent by the CLI: a JSON object of finite numbers ("" for none)."""
    if not text:
        return {}
    try:
        metrics = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"metrics_json is not JSON: {exc}") from None
    if not isinstance(metrics, dict) or len(metrics) > 64:
        raise InvalidArgument("metrics_json must be a JSON object of at most 64 metrics")
    for key, value in metrics.items():
        if (not isinstance(key, str) or not key.isidentifier() or isinstance(value, bool)
                or not isinstance(value, (int, float)) or not np.isfinite(value)):
            raise InvalidArgument(f"metric {key!r} must be named like an identifier and be a finite number")
    return {k: float(v) for k, v in metrics.items()}
