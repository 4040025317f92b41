"""Reference profiles: the agent's own summaries, computed once over reference data.

Drift is only meaningful if the reference and the traffic are summarised the
same way, so a profile is built by the very code the agent runs: the slots
and column names of ``agent.capture`` and the ``WindowBuilder`` of
``agent.worker`` (with the larger ``sketches.REFERENCE_K``), fed with the
reference data and the model's predictions on it. The profile records the
data file's sha256 and row count (the lineage of the reference) and, when the
data has labels, the model's performance on it.

Two fits go with it (``agent.sketches.joint``): a PCA of the standardised
numeric features (``projection``: the agent's ``@reconstruction_error``) and,
for a classifier with labels, the isotonic map from ``@confidence`` to
P(correct) (``calibration``: the collector's label-free accuracy estimate).

The PCA is fitted on a random half of the rows and the profile's own
``@reconstruction_error`` is computed (by ``Projection.errors``, as the agent
does) over the other half only. Rows a PCA was fitted on sit closer to its
components than any new row: it kept the directions that sample happens to vary
most in. Measured (20 features, 1,000-row windows): with the error column
computed on the fitting rows, a 2,000-row reference flagged 15 of 20 clean
evaluations on that column; held out, 0 of 100 clean ones for references of
500, 2,000 and 50,000 rows (5 draws each), and 100 of 100 with a 0.9 -> 0
correlation break.
Profile held-out data, not the training set: a model is overconfident on
the rows it learnt, and the map would promise that accuracy to traffic.

``outrider profile --model M.onnx --data DATA --out PROFILE.pb`` is the CLI.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent import capture, sketches
from agent import feature_names as naming
from agent.capture import Reduce, Slot
from agent.sketches import joint
from agent.errors import InvalidArgument
from agent.reference_data import SUPPORTED, ReferenceData, file_sha256, load_data
from agent.worker import BLOCK_ROWS, Identity, WindowBuilder
from protos import summary_pb2

FeatureNames = Sequence[str] | Mapping[str, Sequence[str]]


def build_profile(model: str | os.PathLike | bytes, data: str | os.PathLike, *,
                  feature_names: FeatureNames | None = None, label_column: str | None = None,
                  k: int = sketches.REFERENCE_K, batch_rows: int = BLOCK_ROWS,
                  model_name: str | None = None, notes: list[str] | None = None) -> summary_pb2.ReferenceProfile:
    """Run ``model`` over the data file ``data`` and summarise features and
    predictions exactly as a ``MonitoredSession`` of that model would.

    Columns are named by ``feature_names`` (a list for a one-input model, or
    ``{input: [names]}``), else by the data (a table's header; an ``.npz``
    array ``feature_names``): by name where the header holds the names the
    model's metadata or ``<input>[i]`` give, else by position for a model with
    one 2-D input as wide as the table; else by the model's metadata or
    ``<input>[i]``. The names are recorded in ``profile.feature_names``: the
    registry gives them to managed agents, static agents take them with
    ``--feature-names``. ``label_column`` names the ground truth (a CSV
    or Parquet column, or an ``.npz`` array; ``.npz`` files use an array
    named ``label`` when there is one). Raises InvalidArgument, saying what to
    fix, on a bad model, file, column or shape. The data is read whole into
    memory (reference sets are training-sized, not traffic-sized).

    Why the profile has no projection or calibration, when it has none, is
    appended to ``notes``.
    """
    notes = notes if notes is not None else []
    if batch_rows < 1:
        raise InvalidArgument(f"batch_rows must be at least 1, got {batch_rows}")
    model_bytes, default_name = _read_model(model)
    session = _open_model(model_bytes)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    names, given = _input_names(inputs, session.get_modelmeta().custom_metadata_map, feature_names)
    # the data's own column names (a header, .npz names) name the columns unless names were given
    loaded = load_data(data, inputs, names=names, label_column=label_column, given=given)
    sha = hashlib.sha256(model_bytes).hexdigest()
    identity = Identity("profile", "", model_name or default_name or "model", "", sha)
    out_index = {o.name: i for i, o in enumerate(outputs)}
    builder: WindowBuilder | None = None
    scorer: _Scorer | None = None
    projection: joint.Projection | None = None
    errors: summary_pb2.ColumnSummary | None = None
    confidences: _Confidences | None = None
    for start in range(0, loaded.rows, batch_rows):
        feed = {name: arr[start:start + batch_rows] for name, arr in loaded.features.items()}
        outs = _run(session, feed)
        if builder is None:  # planned from real values, as the agent does for symbolic shapes
            slots = capture.plan_slots(inputs, outputs, loaded.names, feed, outs)
            repeated = capture.repeated_columns(slots)
            if repeated:
                raise InvalidArgument(f"the column names {naming.few(repeated)} would be used twice (a feature named "
                                      "like another column, an output's perhaps): give the features other names "
                                      "(or, if it is the ground truth, pass it with --label)")
            projection, errors = reference_projection(slots, loaded.features, k, notes)
            builder = WindowBuilder(tuple(slots), identity, k=k)
            if loaded.labels is not None:
                scorer = _Scorer.for_slots(slots, outs, out_index, loaded.labels)
                confidences = _Confidences.for_slots(slots, scorer, notes)
        blocks = [_block(s, feed, outs, out_index) for s in builder.slots]
        builder.add_rows(blocks)
        if scorer is not None:
            rows = scorer.add(outs, start)
            if confidences is not None:
                confidences.add(blocks, rows)
    assert builder is not None  # load_data refuses empty data
    window = builder.close(time.time_ns(), 0, 0)
    columns = list(window.columns)
    if errors is not None:  # where the agent's windows have it: after the captured columns
        at = next((i for i, c in enumerate(columns) if c.name == joint.CONFIDENCE), len(columns))
        columns.insert(at, errors)
    profile = summary_pb2.ReferenceProfile(
        model_name=identity.model_name, model_sha256=sha, data_sha256=file_sha256(data), rows=window.rows,
        data_name=Path(data).name, created_unix_nano=time.time_ns(), columns=columns)
    _record_names(profile, builder.slots)
    if projection is not None:
        profile.projection.CopyFrom(projection.to_proto())
    if scorer is not None:
        profile.performance.CopyFrom(scorer.performance())
    if confidences is not None:
        calibration = confidences.fit(profile, notes)
        if calibration is not None:
            profile.calibration.CopyFrom(calibration)
    return profile


def reference_projection(slots: Sequence[Slot], features: Mapping[str, np.ndarray], k: int,
                         notes: list[str]) -> tuple[joint.Projection | None, summary_pb2.ColumnSummary | None]:
    """The reference's projection and its ``@reconstruction_error`` column, as a profile has them:
    the PCA of the numeric feature columns of ``slots`` (``joint.fit_projection``) fitted on a random
    half of the rows of ``features`` (tensor name -> the whole reference's values), the column
    sketched at ``k`` over the other half. (None, None) with a note saying why when there is none."""
    projection, held_out = _fit_projection(slots, features, notes)
    if projection is None:
        return None, None
    return projection, _held_out_errors(projection, held_out, k)


def _fit_projection(slots: Sequence[Slot], features: Mapping[str, np.ndarray],
                    notes: list[str]) -> tuple[joint.Projection | None, np.ndarray]:
    """The PCA of the reference's numeric feature columns (``joint.fit_projection``) on a random half
    of the rows, and the other half's rows (the error column's); or None with a note."""
    sources = capture.numeric_features(slots)
    rows = len(next(iter(features.values())))
    # in the inputs' own type (float32, usually): the reference is in memory already, once
    dtype = np.result_type(np.float32, *(features[slots[slot].tensor].dtype for slot, *_ in sources))
    columns = np.empty((rows, len(sources)), dtype=dtype)
    for place, (slot, column, _) in enumerate(sources):
        values = np.asarray(features[slots[slot].tensor])
        columns[:, place] = values.reshape(rows, -1)[:, column]
    order = np.random.default_rng(0).permutation(rows)
    fit = np.sort(order[:min(rows // 2, joint.MAX_FIT_ROWS)])
    projection, why = joint.fit_projection(columns[fit], [name for *_, name in sources])
    if projection is None:
        notes.append(f"no multivariate projection: {why}")
    return projection, columns[np.sort(order[rows // 2:])]


def _held_out_errors(projection: joint.Projection, rows: np.ndarray, k: int) -> summary_pb2.ColumnSummary:
    """The reference's ``@reconstruction_error`` column, over rows the projection was not fitted on."""
    sketch = sketches.NumericSketch(k)
    for start in range(0, len(rows), BLOCK_ROWS):  # a block at a time: float64 copies stay small
        sketch.update(projection.errors(rows[start:start + BLOCK_ROWS]))
    return sketch.to_proto(joint.RECONSTRUCTION_ERROR, capture.FEATURE, projection.fingerprint)


class _Confidences:
    """The reference's ``@confidence`` and whether each labelled prediction was right: the
    calibration's data (``joint.fit_calibration``)."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.confidence: list[np.ndarray] = []
        self.correct: list[np.ndarray] = []

    @classmethod
    def for_slots(cls, slots: Sequence[Slot], scorer: _Scorer, notes: list[str]) -> _Confidences | None:
        slot = capture.confidence_slot(slots)
        if slot is None or not scorer.classify:
            notes.append("no confidence calibration: the model is not a classifier with class probabilities")
            return None
        return cls(slot)

    def add(self, blocks: Sequence[np.ndarray], rows: tuple[np.ndarray, np.ndarray] | None) -> None:
        if rows is None:
            return
        known, correct = rows
        self.confidence.append(joint.confidence(blocks[self.slot].reshape(len(known), -1))[known])
        self.correct.append(correct)

    def fit(self, profile: summary_pb2.ReferenceProfile, notes: list[str]) -> summary_pb2.Calibration | None:
        calibration, why = joint.fit_calibration(np.concatenate(self.confidence), np.concatenate(self.correct))
        if calibration is None:
            notes.append(f"no confidence calibration: {why}")
            return None
        column = next(c for c in profile.columns if c.name == joint.CONFIDENCE)
        # As the collector estimates traffic: through the sketch, so that the two compare like for like.
        calibration.reference_estimated_accuracy = joint.expected_accuracy(sketches.NumericSketch.from_proto(column),
                                                                           calibration)
        return calibration


def _read_model(model: str | os.PathLike | bytes) -> tuple[bytes, str | None]:
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), None
    path = Path(model)
    try:
        return path.read_bytes(), path.stem
    except OSError as exc:
        raise InvalidArgument(f"cannot read model file {path}: {exc.strerror or exc}; "
                              "pass an existing .onnx file with --model") from None


def _open_model(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's load errors have no common base class
        raise InvalidArgument(f"cannot load the model as ONNX: {_first_line(exc)}; "
                              "pass a valid .onnx file with --model") from None


def _run(session: Any, feed: dict[str, np.ndarray]) -> list[Any]:
    try:
        return session.run(None, feed)
    except Exception as exc:  # e.g. values the model rejects
        raise InvalidArgument(f"the model failed on the data: {_first_line(exc)}; "
                              "check that the data matches the model's inputs") from None


def _input_names(inputs: Sequence[Any], custom: Mapping[str, str],
                 option: FeatureNames | None) -> tuple[dict[str, list[str] | None], bool]:
    """Column names per input, chosen as the agent chooses them (given names, else the model's
    metadata), and whether they were given. Given names that could not apply are an error here,
    where the agent would quietly fall back to ``<input>[i]``: a profile is built on purpose."""
    given = naming.for_inputs(inputs, option)
    names = {a.name: capture.feature_names_for(given, dict(custom), a.name, len(inputs)) for a in inputs}
    return names, option is not None


def _record_names(profile: summary_pb2.ReferenceProfile, slots: Sequence[Slot]) -> None:
    """The names the profile's feature columns carry, per input, for the registry and the agents."""
    for slot in slots:
        if not slot.is_output and slot.reduce in (Reduce.NUMERIC, Reduce.CATEGORICAL):
            profile.feature_names[slot.tensor].names.extend(slot.columns)


def _block(slot: Slot, feed: Mapping[str, Any], outs: Sequence[Any], out_index: Mapping[str, int]) -> np.ndarray:
    """One slot's rows as the ring would hold them: the slot's dtype and row
    shape (strings cut to ``capture.STRING_WIDTH``, ZipMap dicts as an array)."""
    value = outs[out_index[slot.tensor]] if slot.is_output else feed[slot.tensor]
    if slot.reduce is Reduce.ZIPMAP:
        value = capture.zipmap_to_array(value)
    n = len(value)
    block = np.empty((n, *slot.row_shape), dtype=slot.dtype)
    block[...] = value
    return block


class _Scorer:
    """The model's performance on labelled reference data, as ``Performance`` counts.

    The prediction is the first class-label output (integer or string, one per
    row: classification) or else the first single-valued numeric output
    (regression). Rows whose label is missing are not counted."""

    def __init__(self, output: int, classify: bool, labels: np.ndarray) -> None:
        self.output, self.classify, self.labels = output, classify, labels
        self.pairs: Counter[tuple[str, str]] = Counter()
        self.labeled = 0
        self.sums = np.zeros(3)  # error, |error|, error^2

    @classmethod
    def for_slots(cls, slots: Sequence[Slot], outs: Sequence[Any], out_index: Mapping[str, int],
                  labels: np.ndarray) -> _Scorer:
        outputs = [s for s in slots if s.is_output]
        for slot in outputs:
            if slot.reduce is Reduce.CATEGORICAL and len(slot.columns) == 1:
                i = out_index[slot.tensor]
                return cls(i, True, _class_labels(labels, np.asarray(outs[i]).dtype))
        for slot in outputs:
            if slot.reduce is Reduce.NUMERIC and len(slot.columns) == 1:
                return cls(out_index[slot.tensor], False, _float_labels(labels))
        raise InvalidArgument("cannot score the labels: the model has no class-label output and no "
                              "single-valued numeric output; profile without --label")

    def add(self, outs: Sequence[Any], start: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Count one batch; for classification, which rows had a label and whether each was predicted right."""
        pred = np.asarray(outs[self.output]).reshape(-1)
        if pred.dtype.kind == "b":  # class "1", as the labels are written, not "True"
            pred = pred.astype(np.int64)
        truth = self.labels[start:start + len(pred)]
        if self.classify:
            known = truth != ""
            pred_text = pred.astype(str) if pred.dtype.kind != "O" else np.array([str(p) for p in pred])
            self.pairs.update(zip(truth[known].tolist(), pred_text[known].tolist()))
            self.labeled += int(known.sum())
            return known, truth[known] == pred_text[known]
        known = ~np.isnan(truth)
        error = pred[known].astype(np.float64) - truth[known]
        self.sums += (error.sum(), np.abs(error).sum(), (error * error).sum())
        self.labeled += int(known.sum())
        return None

    def performance(self) -> summary_pb2.Performance:
        perf = summary_pb2.Performance(labeled=self.labeled)
        if not self.classify:
            perf.error_sum, perf.abs_error_sum, perf.sq_error_sum = (float(v) for v in self.sums)
            return perf
        classes = _label_order({c for pair in self.pairs for c in pair})
        index = {c: i for i, c in enumerate(classes)}
        matrix = np.zeros((len(classes), len(classes)), dtype=np.uint64)
        for (truth, pred), n in self.pairs.items():
            matrix[index[truth], index[pred]] += n
        perf.classes.extend(classes)
        perf.confusion.extend(int(v) for v in matrix.ravel())
        return perf


def _label_order(classes: set[str]) -> list[str]:
    """Numeric class labels in numeric order (2 before 10), others as text."""
    try:
        return sorted(classes, key=float)
    except ValueError:
        return sorted(classes)


def _class_labels(labels: np.ndarray, pred_dtype: np.dtype) -> np.ndarray:
    """Labels as the text of the prediction they should equal ("" = missing):
    for an integer label output, 1, 1.0 and "1" are all class "1"."""
    if pred_dtype.kind in "iub":
        values = _float_labels(labels)
        known = ~np.isnan(values)
        if not np.all(np.mod(values[known], 1) == 0):
            raise InvalidArgument("the labels are not whole numbers, but the model predicts integer classes: "
                                  "pass the column of class labels with --label")
        return np.where(known, np.nan_to_num(values).astype(np.int64).astype(str), "")
    text = labels.astype(str) if labels.dtype.kind != "O" else np.array(["" if v is None else str(v) for v in labels])
    return np.where(np.char.lower(text) == "nan", "", np.char.strip(text))


def _float_labels(labels: np.ndarray) -> np.ndarray:
    if labels.dtype.kind in "iubf":
        return labels.astype(np.float64)
    if labels.dtype.kind == "O":  # Parquet: None is a missing label
        labels = np.array(["" if v is None else str(v) for v in labels.tolist()], dtype=str)
    text = np.char.strip(np.asarray(labels, dtype=str))
    try:
        return np.where(text == "", "nan", text).astype(np.float64)
    except ValueError:
        bad = next(v for v in text.tolist() if v and not _is_float(v))
        raise InvalidArgument(f"label {bad!r} is not a number, but the model's prediction is: "
                              "pass the column of numeric labels with --label") from None


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# ------------------------------------------------------------------ the CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    """``outrider profile``."""
    from agent.cli import add_flag, positive

    p = subparsers.add_parser(
        "profile", help="summarise reference data into a reference profile for drift detection",
        description="Run an ONNX model over reference (training or validation) data and write the same "
                    "summaries the agent builds of live traffic, with larger sketches: the reference that "
                    "drift is measured against. Attach the file to a model version with 'outrider attach'.")
    env = "OUTRIDER_PROFILE_"
    add_flag(p, "--model", prefix=env, required=True, metavar="PATH.onnx", help="the ONNX model")
    add_flag(p, "--data", prefix=env, required=True, metavar="DATA",
             help=f"reference data: {', '.join(SUPPORTED)} (Parquet needs the 'parquet' extra)")
    add_flag(p, "--out", prefix=env, required=True, metavar="PROFILE.pb", help="where to write the profile")
    add_flag(p, "--label", prefix=env, metavar="COLUMN",
             help="column (or .npz array) of ground truth: the profile then records the model's performance")
    add_flag(p, "--feature-names", prefix=env, metavar="NAMES",
             help="names of the input's columns: A,B,C, JSON {\"input\": [names]} for several inputs, or @FILE "
                  "holding either (default: the data's header or .npz 'feature_names', else the model's "
                  "metadata, else X[i])")
    add_flag(p, "--batch-rows", prefix=env, default=str(BLOCK_ROWS), type=positive(int), metavar="N",
             help="rows per model call")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=profile_command)


def profile_command(args: argparse.Namespace) -> int:
    from agent.cli import UsageError

    try:
        names = naming.parse(args.feature_names) if args.feature_names else None
    except InvalidArgument as exc:
        raise UsageError(str(exc)) from None
    if not Path(args.model).is_file():
        raise UsageError(f"model file {args.model} does not exist; pass --model PATH.onnx")
    notes: list[str] = []
    try:
        profile = build_profile(args.model, args.data, feature_names=names, label_column=args.label,
                                batch_rows=args.batch_rows, notes=notes)
    except InvalidArgument as exc:
        raise UsageError(str(exc)) from None
    out = Path(args.out)
    try:
        out.write_bytes(profile.SerializeToString())
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}; pass another --out") from None
    summary = describe(profile)
    if args.json:
        from agent.cli_contract import print_json

        print_json({**summary, "notes": notes, "out": str(out)})  # strict: an RMSE of NaN predictions prints null
        return 0
    perf = f", accuracy {summary['accuracy']:.4f}" if "accuracy" in summary else (
        f", RMSE {summary['rmse']:.4g}" if "rmse" in summary else "")
    print(f"profiled {summary['rows']} rows of {profile.data_name} (sha256 {profile.data_sha256[:16]}...): "
          f"{summary['features']} feature and {summary['predictions']} prediction columns{perf}; wrote {out}")
    for name, names in summary["feature_names"].items():
        print(f"  columns of input {name}: {', '.join(names)}")
    if summary["feature_names"]:  # what lines the traffic up with this reference
        print("  agents must name their columns alike: a version registered with this reference gives its names "
              "to managed agents; a static agent takes them with 'outrider agent serve --feature-names'")
    if summary["projection"]:
        p = summary["projection"]
        print(f"multivariate drift: {p['components']} principal components of {p['columns']} numeric features "
              f"keep {p['explained_variance']:.0%} of their variance (column {joint.RECONSTRUCTION_ERROR})")
    if summary["calibration"]:
        c = summary["calibration"]
        print(f"label-free accuracy: confidence calibrated on {profile.performance.labeled} labels "
              f"({c['points']} points), estimated accuracy {c['reference_estimated_accuracy']:.4f}")
    for note in notes:
        print(note)
    return 0


def describe(profile: summary_pb2.ReferenceProfile) -> dict[str, Any]:
    """What a person wants to know of a profile: its size, lineage and, with labels, the headline metric."""
    roles = Counter(c.role for c in profile.columns if c.name not in joint.DERIVED_COLUMNS)
    out: dict[str, Any] = {
        "model_name": profile.model_name, "model_sha256": profile.model_sha256, "data_name": profile.data_name,
        "data_sha256": profile.data_sha256, "rows": profile.rows, "columns": len(profile.columns),
        "features": roles[summary_pb2.ColumnSummary.FEATURE],
        "predictions": roles[summary_pb2.ColumnSummary.PREDICTION],
        "feature_names": {k: list(v.names) for k, v in profile.feature_names.items()},
    }
    out["projection"] = {"columns": len(profile.projection.columns), "components": profile.projection.components,
                         "explained_variance": profile.projection.explained_variance} \
        if profile.HasField("projection") else None
    out["calibration"] = {"points": len(profile.calibration.confidence),
                          "reference_accuracy": profile.calibration.reference_accuracy,
                          "reference_estimated_accuracy": profile.calibration.reference_estimated_accuracy} \
        if profile.HasField("calibration") else None
    perf = profile.performance
    if perf.labeled and perf.classes:
        n = len(perf.classes)
        out["accuracy"] = sum(perf.confusion[i * n + i] for i in range(n)) / perf.labeled
    elif perf.labeled:
        out["rmse"] = float(np.sqrt(perf.sq_error_sum / perf.labeled))
    return out


__all__ = ["ReferenceData", "build_profile", "describe", "load_data", "reference_projection", "register"]
