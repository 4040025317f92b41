"""How far a column's drift is past its thresholds, as one number (1 = at the threshold): the web page's
heat map and EFFECT / THRESHOLD column and the CLI's sparkline read it from here, so they always agree."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from collector.monitoring.drift import DISCRETE, DriftConfig
from protos import collector_pb2 as pb
from protos import summary_pb2

CS = summary_pb2.ColumnSummary
PSEUDO = ("performance", "estimated_performance")  # judged by the accuracy, not an effect size


def _nan(x: float) -> float:
    return x if math.isfinite(x) else math.nan


def config_of(fields: Mapping[str, Any]) -> DriftConfig:
    """A policy from GetDriftConfig's JSON, keeping only the fields this version knows (a newer
    collector's extra field must not stop an older CLI from drawing)."""
    known = {f.name for f in dataclasses.fields(DriftConfig)}
    return DriftConfig.from_dict({k: v for k, v in fields.items() if k in known})


def main_statistic(col: pb.ColumnDrift, config: DriftConfig) -> tuple[str, float, float]:
    """(name, value, threshold) of the effect size the column is judged by first: Jensen-Shannon for
    categorical columns and for numeric ones judged by their frequencies ("discrete")."""
    if col.kind == CS.CATEGORICAL or col.method == DISCRETE:
        return "Jensen-Shannon", _nan(col.js), config.js_threshold
    return "Wasserstein / std", _nan(col.wasserstein), config.wasserstein_threshold


def ratio(col: pb.ColumnDrift, config: DriftConfig) -> float:
    """The largest of the column's effect sizes over its threshold, its missing rate's (Cohen's h over
    ``missing_threshold``) included; NaN when nothing was compared. A drifted column none of whose
    stored effects reach 1 reads 2 (an evaluation stored before ``missing_effect`` existed)."""
    if col.name in PSEUDO:
        return math.nan if math.isnan(col.p_adjusted) else 2.0 if col.drifted else 0.0
    frequencies = col.kind == CS.CATEGORICAL or col.method == DISCRETE
    psi_threshold = config.categorical_psi_threshold if frequencies else config.numeric_psi_threshold
    _, value, threshold = main_statistic(col, config)
    candidates = [value / threshold, _nan(col.psi) / psi_threshold]
    if col.method == DISCRETE:
        candidates.append(_nan(col.wasserstein) / config.wasserstein_threshold)
    missing = _nan(col.missing_effect) / config.missing_threshold
    if missing > 0:  # 0 also in evaluations stored before the field: an unset field must not read "compared"
        candidates.append(missing)
    found = [v for v in candidates if math.isfinite(v)]
    if col.drifted and not any(v >= 1 for v in found):
        return 2.0
    return max(found) if found else math.nan
