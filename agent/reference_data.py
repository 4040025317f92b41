"""Reading reference data for a profile: CSV, Parquet, ``.npy`` and ``.npz``, checked against the model.

Tables (CSV, Parquet) hold one column per feature, named as the agent names
them (``agent.capture``: the given feature names, the model's metadata, or
``<input>[i]``), so that a profile's columns line up with live traffic;
arrays (``.npy``, ``.npz``) hold whole input tensors. Every problem raises
``InvalidArgument`` saying what to change, before the model runs.
"""
from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent import capture
from agent.errors import InvalidArgument

SUPPORTED = (".csv", ".parquet", ".npy", ".npz")
NPZ_LABEL = "label"  # the .npz array of ground truth when no other name is given


@dataclass
class ReferenceData:
    """The model's input arrays (by input name), their row count, and the labels if any."""

    features: dict[str, np.ndarray]
    rows: int
    labels: np.ndarray | None = None


def load_data(path: str | os.PathLike, inputs: Sequence[Any], *,
              names: Mapping[str, list[str] | None] | None = None,
              label_column: str | None = None) -> ReferenceData:
    """Read ``path`` into arrays for the model ``inputs`` (onnxruntime NodeArgs:
    ``name``, ``type``, ``shape``), typed and shaped as the model takes them.

    ``names`` are the table column names per input (default: ``<input>[i]``);
    ``label_column`` the column (or ``.npz`` array) of ground truth."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise InvalidArgument(f"data file {path} is not one of {', '.join(SUPPORTED)}; "
                              "convert it, or rename it if its content is one of them")
    if not path.is_file():
        raise InvalidArgument(f"data file {path} does not exist; pass --data PATH ({', '.join(SUPPORTED)})")
    names = names or {}
    if suffix in (".csv", ".parquet"):
        table = _read_csv(path) if suffix == ".csv" else _read_parquet(path)
        features, labels = _from_table(table, inputs, names, label_column, path.name)
    elif suffix == ".npy":
        features, labels = _from_npy(path, inputs, label_column), None
    else:
        features, labels = _from_npz(path, inputs, label_column)
    counts = {name: len(a) for name, a in features.items()}
    if labels is not None:
        counts["labels"] = len(labels)
    if len(set(counts.values())) > 1:
        raise InvalidArgument(f"{path.name}: the arrays have different row counts {counts}; give each as many rows")
    rows = next(iter(counts.values()), 0)
    if rows == 0:
        raise InvalidArgument(f"{path.name} has no rows: a profile needs reference data")
    return ReferenceData(features, rows, labels)


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


def table_columns(arg: Any, names: list[str] | None) -> list[str]:
    """The table columns that make up input ``arg``: the agent's names for its columns."""
    dims = list(arg.shape or [])[1:]
    if len(dims) > 1:
        raise InvalidArgument(f"input {arg.name!r} has shape {arg.shape}, which a table cannot hold; "
                              f"save the data as .npz with an array named {arg.name!r}")
    if dims and not isinstance(dims[0], int):
        if names:
            return list(names)
        raise InvalidArgument(f"input {arg.name!r} has no fixed number of columns; name them with "
                              "--feature-names, or save the data as .npz")
    slot = capture.plan_slot(arg, is_output=False, names=names)
    if slot is None:
        raise InvalidArgument(f"input {arg.name!r} of type {arg.type} cannot be read from a table; use .npz")
    return slot.columns


def _from_table(table: dict[str, np.ndarray], inputs: Sequence[Any], names: Mapping[str, list[str] | None],
                label_column: str | None, source: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    wanted = {arg.name: table_columns(arg, names.get(arg.name)) for arg in inputs}
    expected = [c for cols in wanted.values() for c in cols]
    if label_column is not None and label_column not in table:
        raise InvalidArgument(f"{source} has no label column {label_column!r}; its columns are "
                              f"{_few(list(table))}")
    missing = [c for c in expected if c not in table]
    extra = [c for c in table if c not in expected and c != label_column]
    if missing or extra:
        hint = "; name the features with --feature-names (and give the agent the same names)" if missing else ""
        raise InvalidArgument(
            f"{source} columns do not match the model's features: "
            + "; ".join(p for p in (f"missing {_few(missing)}" if missing else "",
                                    f"unexpected {_few(extra)} (drop them, or pass the label with --label)"
                                    if extra else "") if p)
            + f"; expected {_few(expected)}{hint}")
    features = {}
    for arg in inputs:
        cols = [_column(table[c], arg, c, source) for c in wanted[arg.name]]
        features[arg.name] = conform(np.stack(cols, axis=1), arg, source)
    return features, (table[label_column] if label_column is not None else None)


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


def _from_npz(path: Path, inputs: Sequence[Any],
              label_column: str | None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    archive = _load(np.load, path)
    if isinstance(archive, np.ndarray):
        raise InvalidArgument(f"{path.name} is one .npy array, not an .npz archive; name it .npy")
    with archive:
        arrays = {name: _load(archive.__getitem__, name) for name in archive.files}
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
    return {a.name: conform(arrays[a.name], a, path.name) for a in inputs}, labels


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
