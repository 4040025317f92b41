"""Evidently and NannyML on the cases benchmarks/drift_peers.py wrote: run with the peer venv's python.

    <peer venv>/bin/python benchmarks/_peer_worker.py MANIFEST.json > verdicts.json

Imports nothing from Outrider (it runs in another venv, with its own numpy and pandas). The manifest:

    {"numeric": [names], "categorical": [names],
     "cases": [{"id": str, "reference": "ref.npz", "current": "cur.npz", "chunk_size": int}, ...]}

Each .npz holds one array per column (float64 with NaN for missing values; strings for the categorical
ones). Output (stdout, one JSON object):

    {"versions": {"evidently": ..., "nannyml": ..., "pandas": ..., "numpy": ...},
     "cases": {id: {"evidently": {"columns": [flagged], "dataset": bool},
                    "nannyml": {"columns": [flagged], "multivariate": bool | null}}}}

Both tools run with their defaults, as a user gets them out of the box:
- Evidently: ``DataDriftPreset()`` with its tests; a column is flagged when its "Value Drift" test fails
  (Evidently picks the method per column: KS / chi-square / Z-test below 1,000 reference rows, normed
  Wasserstein / Jensen-Shannon above); the dataset verdict is its "Share of Drifted Columns" test.
- NannyML: ``UnivariateDriftCalculator`` (default methods and thresholds) and
  ``DataReconstructionDriftCalculator`` (PCA reconstruction error), fitted once per reference; both
  chunk by ``chunk_size`` (the current window's rows) so the analysis period is one chunk and the
  thresholds come from the reference's chunks of the same size, which is how NannyML derives them.
  ``multivariate`` is null when NannyML gives no verdict (e.g. no threshold).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings

# Both libraries phone home (NannyML's usage statistics, Evidently's telemetry): not from a benchmark.
os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("EVIDENTLY_DISABLE_TELEMETRY", "1")


def _frame(path: str, numeric: list[str], categorical: list[str]):
    import numpy as np
    import pandas as pd

    with np.load(path, allow_pickle=False) as data:
        frame = {name: data[name].astype(np.float64) for name in numeric}
        frame.update({name: data[name].astype(object) for name in categorical})
    return pd.DataFrame(frame)


def _evidently(reference, current, numeric: list[str], categorical: list[str]) -> dict:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    snapshot = Report([DataDriftPreset()], include_tests=True).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition))
    flagged, dataset = [], False
    for test in snapshot.dict()["tests"]:
        params = test["metric_config"]["params"]
        failed = test["status"] != "SUCCESS"
        if params["type"].endswith("ValueDrift"):
            if failed:
                flagged.append(params["column"])
        elif params["type"].endswith("DriftedColumnsCount"):
            dataset = failed
    return {"columns": sorted(flagged), "dataset": dataset}


class _NannyML:
    """The two calculators fitted on one reference, for windows of one size."""

    def __init__(self, reference, numeric: list[str], categorical: list[str], chunk_size: int) -> None:
        import nannyml

        self.columns = numeric + categorical
        self.univariate = nannyml.UnivariateDriftCalculator(
            column_names=self.columns, treat_as_categorical=categorical, chunk_size=chunk_size).fit(reference)
        try:
            self.multivariate = nannyml.DataReconstructionDriftCalculator(
                column_names=self.columns, chunk_size=chunk_size).fit(reference)
        except Exception as exc:  # noqa: BLE001 - reported as "no verdict", with the reason on stderr
            print(f"nannyml reconstruction drift not fitted: {exc}", file=sys.stderr)
            self.multivariate = None

    def __call__(self, current) -> dict:
        result = self.univariate.calculate(current).filter(period="analysis").to_df()
        flagged = sorted({name for name in self.columns
                          for key in result.columns
                          if key[0] == name and key[-1] == "alert" and bool(result[key].iloc[-1])})
        verdict = None
        if self.multivariate is not None:
            frame = self.multivariate.calculate(current).filter(period="analysis").to_df()
            alert = [key for key in frame.columns if key[-1] == "alert"]
            if alert:
                value = frame[alert[0]].iloc[-1]
                verdict = None if value is None or (isinstance(value, float) and math.isnan(value)) else bool(value)
        return {"columns": flagged, "multivariate": verdict}


def main(manifest_path: str) -> int:
    import importlib.metadata as metadata

    with open(manifest_path) as f:
        manifest = json.load(f)
    numeric, categorical = manifest["numeric"], manifest["categorical"]
    out_stream = sys.stdout
    out: dict = {"versions": {name: metadata.version(name) for name in ("evidently", "nannyml", "pandas", "numpy")},
                 "cases": {}}
    frames: dict[str, object] = {}
    fitted: dict[tuple[str, int], _NannyML] = {}

    def frame(path: str):
        if path not in frames:
            frames[path] = _frame(path, numeric, categorical)
        return frames[path]

    # The libraries print and warn (too few chunks, deprecations); keep stdout for the one JSON answer.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in manifest["cases"]:
            reference, current = frame(case["reference"]), _frame(case["current"], numeric, categorical)
            key = (case["reference"], int(case["chunk_size"]))
            if key not in fitted:
                fitted[key] = _NannyML(reference, numeric, categorical, int(case["chunk_size"]))
            out["cases"][case["id"]] = {"evidently": _evidently(reference, current, numeric, categorical),
                                        "nannyml": fitted[key](current)}
            print(f"{case['id']}", file=sys.stderr, flush=True)
    json.dump(out, out_stream)
    out_stream.write("\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: _peer_worker.py MANIFEST.json", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1]))
