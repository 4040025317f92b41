"""What the hot path captures from each tensor, and which summary columns it becomes.

A model's inputs and outputs are turned into *slots*: each slot is one ring
array with a fixed per-row shape and dtype, filled by a plain copy on the
request thread. How a slot becomes summary columns is decided here too, so
that the request thread copies bytes and the summary worker does the math.

Rules (documented in the README):
- numeric tensor ``[N]`` or ``[N, F]``: F numeric columns, named by
  ``feature_names``, the model's ``feature_names`` metadata, or ``<tensor>[i]``;
- string tensor ``[N]`` / ``[N, F]``: F categorical columns (values are
  summarised on their first ``STRING_WIDTH`` characters);
- integer or string *outputs* (class labels): categorical columns;
- any other shape ``[N, d1, d2, ...]`` (images, sequences): each sample is
  summarised by three numeric columns ``<tensor>.mean``, ``.std`` and ``.l2``;
- skl2onnx ZipMap outputs (a list of ``{class: probability}``): one numeric
  column per class, ``<output>[<class>]``.

Derived columns, computed by the summary worker from the captured rows
(``agent.sketches.joint``): ``@confidence`` (a classifier's largest class
probability per row, role PREDICTION) and, once the agent has a reference
projection, ``@reconstruction_error`` (role FEATURE).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Sequence

import numpy as np

from agent.errors import InvalidArgument
from protos import summary_pb2

STRING_WIDTH = 32
FEATURE = summary_pb2.ColumnSummary.FEATURE
PREDICTION = summary_pb2.ColumnSummary.PREDICTION

_ORT_DTYPES = {
    "float": np.float32, "double": np.float64, "float16": np.float16,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_, "string": np.dtype(f"<U{STRING_WIDTH}"),
}


class Reduce(Enum):
    """How a slot's rows become columns."""

    NUMERIC = "numeric"          # one numeric column per feature
    CATEGORICAL = "categorical"  # one categorical column per feature
    SAMPLE_STATS = "sample"      # mean / std / L2 norm of each sample
    ZIPMAP = "zipmap"            # list of {class: prob} converted to [N, classes]


@dataclass
class Slot:
    """One captured tensor: its ring row shape and dtype and its columns."""

    tensor: str
    role: int                     # FEATURE or PREDICTION
    reduce: Reduce
    dtype: np.dtype
    row_shape: tuple[int, ...]    # per-row shape in the ring
    columns: list[str] = field(default_factory=list)
    is_output: bool = False

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


def _elem_type(ort_type: str) -> str | None:
    if ort_type.startswith("tensor(") and ort_type.endswith(")"):
        return ort_type[len("tensor("):-1]
    return None


def _static(dims: Sequence[Any]) -> bool:
    return all(isinstance(d, int) and d >= 0 for d in dims)


def names_from_metadata(custom: dict[str, str]) -> dict[str, list[str]] | list[str] | None:
    """Feature names stored in the model: ``feature_names`` as a JSON list, a JSON
    object ``{input: [names]}``, or a comma-separated string."""
    raw = custom.get("feature_names")
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        return [n.strip() for n in raw.split(",")]
    return parsed if isinstance(parsed, (list, dict)) else None


def plan_slot(arg: Any, *, is_output: bool, names: list[str] | None = None,
              sample: Any = None) -> Slot | None:
    """Decide the slot for one ORT NodeArg; ``sample`` (a real value of the
    tensor) resolves dimensions the model leaves symbolic. None: not captured."""
    role = PREDICTION if is_output else FEATURE
    elem = _elem_type(arg.type)
    if elem is None:
        if arg.type.startswith("seq(map(") and is_output:
            classes = list(sample[0].keys()) if sample else None
            if not classes:
                return None  # resolved at the first call that returns rows
            return Slot(arg.name, role, Reduce.ZIPMAP, np.dtype(np.float32), (len(classes),),
                        [f"{arg.name}[{c}]" for c in classes], is_output)
        return None
    if elem not in _ORT_DTYPES:
        return None
    dtype = np.dtype(_ORT_DTYPES[elem])
    shape = list(arg.shape)[1:] if arg.shape else []
    if sample is not None:
        shape = list(np.shape(sample))[1:]
    if not _static(shape):
        return None
    categorical = elem == "string" or (is_output and dtype.kind in "iub" and len(shape) <= 1)
    if len(shape) <= 1:
        width = shape[0] if shape else 1
        default = [arg.name] if width == 1 else [f"{arg.name}[{i}]" for i in range(width)]
        cols = list(names) if names and len(names) == width else default
        reduce = Reduce.CATEGORICAL if categorical else Reduce.NUMERIC
        return Slot(arg.name, role, reduce, dtype, tuple(shape), cols, is_output)
    if elem == "string":
        return None  # strings of rank > 2: nothing sensible to summarise
    return Slot(arg.name, role, Reduce.SAMPLE_STATS, dtype, tuple(shape),
                [f"{arg.name}.mean", f"{arg.name}.std", f"{arg.name}.l2"], is_output)


def plan_slots(inputs: Sequence[Any], outputs: Sequence[Any], names: dict[str, list[str] | None],
               feed: dict[str, Any] | None = None, outs: Sequence[Any] | None = None) -> list[Slot]:
    """Every captured slot of a model, inputs first; ``feed`` / ``outs`` (one real
    call) resolve symbolic dimensions. The agent and reference profiles share it,
    so a profile's columns are named exactly like the traffic's."""
    slots = [plan_slot(arg, is_output=False, names=names.get(arg.name),
                       sample=feed.get(arg.name) if feed else None) for arg in inputs]
    slots += [plan_slot(arg, is_output=True, sample=outs[i] if outs else None) for i, arg in enumerate(outputs)]
    return [s for s in slots if s]


def repeated_columns(slots: Sequence[Slot]) -> list[str]:
    """Column names that more than one column would carry (a feature named like an output, say):
    the collector refuses such windows, so a plan with any is refused where it is made."""
    seen: set[str] = set()
    repeated = set()
    for name in (c for s in slots for c in s.columns):
        if name in seen:
            repeated.add(name)
        seen.add(name)
    return sorted(repeated)


def feature_names_for(option: Any, custom: dict[str, str], input_name: str,
                      n_inputs: int) -> list[str] | None:
    """Pick the names for one input: explicit option first, then model metadata."""
    for source in (option, names_from_metadata(custom)):
        if isinstance(source, dict) and input_name in source:
            return list(source[input_name])
        if isinstance(source, (list, tuple)) and n_inputs == 1:
            return list(source)
    return None


def zipmap_to_array(value: list[dict], classes: int = 0) -> np.ndarray:
    """ZipMap rows -> float32 [N, classes], class order as the dicts give it
    (the model's class-label order); used by the capture and the OIP endpoint.
    No rows carry no class count: ``classes`` (if known) sizes the empty result."""
    if not len(value):
        return np.zeros((0, classes), dtype=np.float32)
    return np.array([list(row.values()) for row in value], dtype=np.float32).reshape(len(value), -1)


# ---------------------------------------------------------------- derived columns


def confidence_slot(slots: Sequence[Slot]) -> int | None:
    """The slot whose row maximum is ``@confidence``: the probabilities of a classifier, i.e.
    a model with a class-label output (one integer or string value per row) and a ZipMap or a
    float output of two or more columns (the first such). None for any other model."""
    outputs = [(i, s) for i, s in enumerate(slots) if s.is_output]
    if not any(s.reduce is Reduce.CATEGORICAL and len(s.columns) == 1 for _, s in outputs):
        return None
    for i, s in outputs:
        if s.reduce is Reduce.ZIPMAP or (s.reduce is Reduce.NUMERIC and s.dtype.kind == "f" and len(s.columns) >= 2):
            return i
    return None


def numeric_features(slots: Sequence[Slot]) -> list[tuple[int, int, str]]:
    """(slot, column, name) of every numeric input column, in slot order: what a projection may read."""
    return [(i, j, name) for i, s in enumerate(slots) if not s.is_output and s.reduce is Reduce.NUMERIC
            for j, name in enumerate(s.columns)]


def projection_sources(slots: Sequence[Slot], columns: Sequence[str]) -> list[tuple[int, int]]:
    """Where each of a projection's ``columns`` is captured: (slot, column). Raises InvalidArgument
    naming the columns this model's numeric inputs do not have (the names do not line up)."""
    found = {name: (i, j) for i, j, name in numeric_features(slots)}
    missing = [c for c in columns if c not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        have = [name for *_, name in numeric_features(slots)]
        raise InvalidArgument(f"the reference's projection reads column(s) {shown}, which this model's numeric "
                         f"inputs do not have (they are {', '.join(have[:5]) or 'none'}"
                         f"{', ...' if len(have) > 5 else ''}): give the agent the feature names the "
                         "profile was built with")
    return [found[c] for c in columns]
