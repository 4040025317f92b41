"""Reading reference data for a profile: CSV, Parquet, ``.npy`` and ``.npz``, checked against the model.

Tables (CSV, Parquet) hold one column per feature. Their columns are matched
by name when the header holds the names the agent would use (``agent.capture``:
the given feature names, the model's metadata, or ``<input>[i]``); otherwise,
for a model with one 2-D input and no names given, by position, and the
header's names become the columns' names. Arrays (``.npy``, ``.npz``) hold
whole input tensors; an ``.npz`` may name a one-input model's columns with an
array ``feature_names`` (``feature_names.<input>`` for one of several inputs).
The names chosen are returned with the data, so that the profile records them
and the agents can be given the same. Every problem raises ``InvalidArgument``
saying what to change, before the model runs.
"""
from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent import capture
from agent import feature_names as naming
from agent.errors import InvalidArgument

SUPPORTED = (".csv", ".parquet", ".npy", ".npz")
NPZ_LABEL = "label"  # the .npz array of ground truth when no other name is given
NPZ_NAMES = "feature_names"  # the .npz array naming a one-input model's columns ("feature_names.<input>": one input's)


@dataclass
class ReferenceData:
    """The model's input arrays (by input name), their row count, the labels if any, and the
    column names per input (None: the agent's default names)."""

    features: dict[str, np.ndarray]
    rows: int
    labels: np.ndarray | None = None
    names: dict[str, list[str] | None] = field(default_factory=dict)


def load_data(path: str | os.PathLike, inputs: Sequence[Any], *,
              names: Mapping[str, list[str] | None] | None = None,
              label_column: str | None = None, given: bool = False) -> ReferenceData:
    """Read ``path`` into arrays for the model ``inputs`` (onnxruntime NodeArgs:
    ``name``, ``type``, ``shape``), typed and shaped as the model takes them.

    ``names`` are the column names per input (default: ``<input>[i]``); ``given``:
    they were given on purpose, so the data's own names may not replace them;
    ``label_column`` the column (or ``.npz`` array) of ground truth."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise InvalidArgument(f"data file {path} is not one of {', '.join(SUPPORTED)}; "
                              "convert it, or rename it if its content is one of them")
    if not path.is_file():
        raise InvalidArgument(f"data file {path} does not exist; pass --data PATH ({', '.join(SUPPORTED)})")
    names = dict(names or {})
    if suffix in (".csv", ".parquet"):
        table = _read_csv(path) if suffix == ".csv" else _read_parquet(path)
        features, labels, names = _from_table(table, inputs, names, label_column, path.name, given)
    elif suffix == ".npy":
        features, labels = _from_npy(path, inputs, label_column), None
    else:
        features, labels, named = _from_npz(path, inputs, label_column)
        names = _merge_names(names, named, given, path.name)
    _check_widths(features, names, inputs, path.name)
    counts = {name: len(a) for name, a in features.items()}
    if labels is not None:
        counts["labels"] = len(labels)
    if len(set(counts.values())) > 1:
        raise InvalidArgument(f"{path.name}: the arrays have different row counts {counts}; give each as many rows")
    rows = next(iter(counts.values()), 0)
    if rows == 0:
        raise InvalidArgument(f"{path.name} has no rows: a profile needs reference data")
    return ReferenceData(features, rows, labels, names)


def column_names(path: str | os.PathLike) -> list[str]:
    """The names a data file holds without reading its rows: a table's columns, an .npz's arrays
    ([] for .npy, or a file that cannot be read: ``load_data`` says why)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                return [h.strip() for h in next(csv.reader(f), [])]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return list(archive.files)
    except Exception:  # unreadable: load_data reports it with the fix
        return []
    return []


def file_sha256(path: str | os.PathLike) -> str:
    """The data file's sha256, read in chunks: reference files can be large."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------ tables


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    """Every column as text; types come from the model's inputs, not from guessing."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise InvalidArgument(f"{path.name} is empty: a CSV needs a header row of column names")
            header = [h.strip() for h in header]
            rows = []
            for row in reader:
                if not row:
                    continue  # a trailing blank line
                if len(row) != len(header):
                    raise InvalidArgument(f"{path.name} line {reader.line_num} has {len(row)} fields, the header "
                                          f"{len(header)}; fix that line")
                rows.append(row)
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path.name} is not UTF-8 text ({exc.reason}); save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise InvalidArgument(f"{path.name} is not valid CSV: {exc}") from None
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise InvalidArgument(f"{path.name} has repeated column names {dupes}; give each column its own name")
    cells = np.array(rows, dtype=str).reshape(len(rows), len(header))
    return {h: cells[:, j] for j, h in enumerate(header)}


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidArgument("reading Parquet needs pyarrow: pip install 'outrider[parquet]', "
                              "or convert the data to CSV or .npz") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's errors: ArrowInvalid, OSError, ...
        raise InvalidArgument(f"cannot read {path.name} as Parquet: {exc}") from None
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def table_columns(arg: Any, names: list[str] | None) -> list[str] | None:
    """The table columns that make up input ``arg``: the agent's names for its columns; None when
    its width is open and it has no names (only the table's own header can say)."""
    dims = list(arg.shape or [])[1:]
    if len(dims) > 1:
        raise InvalidArgument(f"input {arg.name!r} has shape {arg.shape}, which a table cannot hold; "
                              f"save the data as .npz with an array named {arg.name!r}")
    if dims and not isinstance(dims[0], int):
        return list(names) if names else None
    slot = capture.plan_slot(arg, is_output=False, names=names)
    if slot is None:
        raise InvalidArgument(f"input {arg.name!r} of type {arg.type} cannot be read from a table; use .npz")
    return slot.columns


def _from_table(table: dict[str, np.ndarray], inputs: Sequence[Any], names: dict[str, list[str] | None],
                label_column: str | None, source: str, given: bool
                ) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, list[str] | None]]:
    """The inputs' arrays from the table's columns, the labels, and each input's column names."""
    if label_column is not None and label_column not in table:
        raise InvalidArgument(f"{source} has no label column {label_column!r}; its columns are "
                              f"{_few(list(table))}")
    columns = [c for c in table if c != label_column]
    wanted = {arg.name: table_columns(arg, names.get(arg.name)) for arg in inputs}
    expected = [c for cols in wanted.values() for c in cols or []]
    by_name = all(cols is not None for cols in wanted.values()) and set(expected) == set(columns)
    if not by_name:
        if given or not _by_position(inputs, columns):
            raise InvalidArgument(_mismatch(inputs, wanted, expected, columns, label_column, source, given))
        # one 2-D input as wide as the table: positions map to names, and the header's names are the columns'
        wanted = {inputs[0].name: columns}
        names = {inputs[0].name: columns}
    features = {}
    for arg in inputs:
        cols = [_column(table[c], arg, c, source) for c in wanted[arg.name]]
        features[arg.name] = conform(np.stack(cols, axis=1), arg, source)
    return features, (table[label_column] if label_column is not None else None), names


def _by_position(inputs: Sequence[Any], columns: list[str]) -> bool:
    """Whether the table's columns can be the columns of the model's only input, in order."""
    if len(inputs) != 1 or not columns:
        return False
    arg = naming.Input.of(inputs[0])
    return arg.per_column and (arg.width is None or arg.width == len(columns))


def _mismatch(inputs: Sequence[Any], wanted: dict[str, list[str] | None], expected: list[str], columns: list[str],
              label_column: str | None, source: str, given: bool) -> str:
    besides = f" besides the label {label_column!r}" if label_column else ""
    if len(inputs) == 1 and not given:
        arg = naming.Input.of(inputs[0])
        return (f"{source} has {len(columns)} columns{besides} ({_few(columns)}), but input {arg.name!r} takes "
                f"{arg.width} columns: give one column per feature (drop the others, or name the label with "
                "--label)")
    have, want = set(columns), set(expected)
    missing = [c for c in expected if c not in have]
    extra = [c for c in columns if c not in want]
    hint = ("; the --feature-names given must be the header's names" if given else
            "; name each input's columns in the header as the model's metadata or <input>[i] do, or name them with "
            "--feature-names '{\"input\": [names]}'")
    open_width = [a for a, cols in wanted.items() if cols is None]
    return (f"{source} columns do not match the model's features: "
            + "; ".join(p for p in (f"missing {_few(missing)}" if missing else "",
                                    f"unexpected {_few(extra)} (drop them, or pass the label with --label)"
                                    if extra else "",
                                    f"inputs {open_width} have no fixed number of columns" if open_width else "")
                        if p)
            + f"; expected {_few(expected)}{hint}")


def _column(values: np.ndarray, arg: Any, name: str, source: str) -> np.ndarray:
    """One table column in the input's type: text for string inputs, else numbers ("" and NaN missing)."""
    if input_dtype(arg).kind == "U":
        if values.dtype.kind == "O":
            return np.array(["" if v is None else str(v) for v in values.tolist()], dtype=str)
        return values.astype(str)
    if values.dtype.kind in "iubf":
        return values
    if values.dtype.kind == "O":  # Parquet strings or nullable numbers
        values = np.array(["" if v is None else str(v) for v in values.tolist()], dtype=str)
    text = np.char.strip(values.astype(str))
    try:
        return np.where(text == "", "nan", text).astype(np.float64)
    except ValueError:
        bad = next((i, v) for i, v in enumerate(text.tolist()) if v and not _is_number(v))
        raise InvalidArgument(f"{source} column {name!r} row {bad[0] + 1}: {bad[1]!r} is not a number, "
                              f"but input {arg.name!r} is {arg.type}; fix the value or leave it empty") from None


# ------------------------------------------------------------------ arrays


def _from_npy(path: Path, inputs: Sequence[Any], label_column: str | None) -> dict[str, np.ndarray]:
    if label_column is not None:
        raise InvalidArgument("a .npy file holds features only; for labels use .npz (features by input name "
                              f"plus a {NPZ_LABEL!r} array) or a CSV with --label")
    if len(inputs) != 1:
        raise InvalidArgument(f"a .npy file holds one array, but the model has {len(inputs)} inputs; use .npz "
                              f"with arrays named {[a.name for a in inputs]}")
    array = _load(np.load, path)
    if not isinstance(array, np.ndarray):
        raise InvalidArgument(f"{path.name} is an .npz archive, not one .npy array; name it .npz")
    return {inputs[0].name: conform(array, inputs[0], path.name)}


def _from_npz(path: Path, inputs: Sequence[Any], label_column: str | None
              ) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, list[str]]]:
    archive = _load(np.load, path)
    if isinstance(archive, np.ndarray):
        raise InvalidArgument(f"{path.name} is one .npy array, not an .npz archive; name it .npy")
    with archive:
        arrays = {name: _load(archive.__getitem__, name) for name in archive.files}
    named = _npz_names(arrays, inputs, path.name)
    label = label_column if label_column is not None else (NPZ_LABEL if NPZ_LABEL in arrays else None)
    wanted = [a.name for a in inputs]
    missing = [n for n in wanted if n not in arrays]
    if label is not None and label not in arrays:
        raise InvalidArgument(f"{path.name} has no label array {label!r}; its arrays are {sorted(arrays)}")
    extra = sorted(set(arrays) - set(wanted) - {label})
    if missing or extra:
        raise InvalidArgument(f"{path.name} arrays {sorted(arrays)} do not match the model's inputs {wanted}"
                              f"{f' plus an optional {NPZ_LABEL!r}' if label is None else f' and label {label!r}'}; "
                              "save one array per input, named after it")
    labels = arrays[label].reshape(-1) if label is not None else None
    if labels is not None and arrays[label].ndim > 1 and arrays[label].shape[1:] != (1,) * (arrays[label].ndim - 1):
        raise InvalidArgument(f"{path.name}: label array has shape {arrays[label].shape}; save one label per row")
    return {a.name: conform(arrays[a.name], a, path.name) for a in inputs}, labels, named


def _npz_names(arrays: dict[str, np.ndarray], inputs: Sequence[Any], source: str) -> dict[str, list[str]]:
    """Take the names arrays out of ``arrays``: ``feature_names`` (a one-input model) or
    ``feature_names.<input>``, each a 1-D array of strings."""
    named: dict[str, list[str]] = {}
    inputs_by_name = {a.name for a in inputs}
    for key in [k for k in arrays if k == NPZ_NAMES or k.startswith(NPZ_NAMES + ".")]:
        if key in inputs_by_name:
            continue  # an input that happens to be called so
        values = arrays.pop(key)
        target = key[len(NPZ_NAMES) + 1:] if key != NPZ_NAMES else (inputs[0].name if len(inputs) == 1 else "")
        if not target:
            raise InvalidArgument(f"{source}: array {NPZ_NAMES!r} names the columns of a one-input model; this one "
                                  f"has inputs {sorted(inputs_by_name)}: name them {NPZ_NAMES}.<input>")
        if target not in inputs_by_name:
            raise InvalidArgument(f"{source}: array {key!r} names the columns of input {target!r}, which the model "
                                  f"does not have (its inputs: {sorted(inputs_by_name)})")
        if values.ndim != 1 or values.dtype.kind not in "US":
            raise InvalidArgument(f"{source}: array {key!r} must be a 1-D array of strings "
                                  f"(np.array(names, dtype=str)), not {values.dtype} of shape {list(values.shape)}")
        named[target] = naming.coerce(values.astype(str).tolist(), f"{source} array {key!r}")
    return named


def _merge_names(names: dict[str, list[str] | None], named: dict[str, list[str]], given: bool,
                 source: str) -> dict[str, list[str] | None]:
    """The data's names replace the model's metadata names; names given must agree with them."""
    for key, value in named.items():
        if given and names.get(key) is not None and names[key] != value:
            raise InvalidArgument(f"the feature names given for input {key!r} differ from those {source} holds "
                                  f"({_few(value)}); drop one of them")
        names[key] = value
    return names


def _check_widths(features: dict[str, np.ndarray], names: dict[str, list[str] | None], inputs: Sequence[Any],
                  source: str) -> None:
    """Names for each column of the data: the agent would quietly fall back to ``<input>[i]``."""
    for arg in inputs:
        given = names.get(arg.name)
        array = features[arg.name]
        if given is not None and array.ndim == 2 and len(given) != array.shape[1]:
            raise InvalidArgument(f"{len(given)} feature names for input {arg.name!r}, but {source} gives it "
                                  f"{array.shape[1]} columns: give one name per column")


def _load(fn: Any, what: Any) -> Any:
    """``np.load`` (or an .npz member) without pickle: a pickle in a data file could run code."""
    name = getattr(what, "name", what)
    try:
        return fn(what, allow_pickle=False) if fn is np.load else fn(what)
    except ValueError as exc:
        if "bject arrays" in str(exc):
            raise InvalidArgument(f"cannot load {name}: it holds Python objects; save strings as a text array "
                                  "(np.array(values, dtype=str))") from None
        raise InvalidArgument(f"cannot read {name} as a numpy file: {exc}") from None
    except Exception as exc:  # OSError, EOFError, zipfile.BadZipFile, ...
        raise InvalidArgument(f"cannot read {name} as a numpy file: {exc}") from None


def input_dtype(arg: Any) -> np.dtype:
    """The numpy type onnxruntime takes for this input (text for string tensors)."""
    elem = arg.type[len("tensor("):-1] if arg.type.startswith("tensor(") else ""
    if elem == "string":
        return np.dtype(str)
    if elem not in capture._ORT_DTYPES:
        raise InvalidArgument(f"input {arg.name!r} has type {arg.type}, which a profile cannot feed")
    return np.dtype(capture._ORT_DTYPES[elem])


def conform(array: np.ndarray, arg: Any, source: str) -> np.ndarray:
    """``array`` in the dtype and shape of input ``arg``; a [N] array fills an
    input of shape [N, 1]. Values that would change in the cast are refused."""
    shape = list(arg.shape or [])
    array = np.asarray(array)
    if array.ndim + 1 == len(shape) and shape[-1] == 1:
        array = array[..., None]
    ok = array.ndim == len(shape) and all(not isinstance(d, int) or d == n
                                          for d, n in zip(shape[1:], array.shape[1:]))
    if not ok:
        want = "[" + ", ".join(str(d) if isinstance(d, int) else "N" for d in shape) + "]"
        raise InvalidArgument(f"{source}: input {arg.name!r} takes shape {want} (N rows), the data has "
                              f"{list(array.shape)}; reshape the data to match")
    dtype = input_dtype(arg)
    kind = array.dtype.kind
    if dtype.kind == "U":
        if kind not in "US":
            raise InvalidArgument(f"{source}: input {arg.name!r} takes strings, the data holds {array.dtype}")
        return array.astype(str)
    if kind not in "iubf":
        raise InvalidArgument(f"{source}: input {arg.name!r} takes {arg.type}, the data holds {array.dtype}")
    if dtype.kind in "iub" and kind == "f":
        finite = np.isfinite(array)
        if not finite.all() or np.any(np.mod(array, 1) != 0):
            raise InvalidArgument(f"{source}: input {arg.name!r} takes whole numbers ({arg.type}); the data has "
                                  "fractions or missing values")
    return array.astype(dtype, copy=False)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _few(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"
