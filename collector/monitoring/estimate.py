"""Label-free accuracy (CBPE): the accuracy a classifier's traffic should have, before labels come.

The reference profile's calibration maps a prediction's confidence (its
largest class probability) to P(correct), fitted on labelled reference data
(``agent.sketches.joint``). The span's merged ``@confidence`` sketch says how
confident the traffic's predictions are; the map's mean over it is the
expected accuracy. Compared with the same estimate on the reference, a drop of
the policy's ``accuracy_drop`` or more is an ``estimated_performance`` verdict
for the alert machine, a pseudo-column like ``performance`` (realised accuracy
from labels): both can stand side by side once labels arrive.

The estimate holds while the calibration does: under covariate shift
(P(label | features) unchanged) it tracks realised accuracy (within 0.03 on
the scenarios of tests/test_cbpe.py); a change in that relationship (concept
drift) is invisible to it, which is what labels are for.
"""
from __future__ import annotations

import math

from agent import sketches
from agent.sketches import joint
from collector.monitoring.drift import DriftConfig
from protos import collector_pb2 as pb
from protos import summary_pb2

ESTIMATED_PERFORMANCE = "estimated_performance"  # the pseudo-column, and its alerts' kind


def estimated_performance(current: summary_pb2.WindowSummary, profile: summary_pb2.ReferenceProfile,
                          config: DriftConfig) -> tuple[float, float, pb.ColumnDrift | None]:
    """(estimated accuracy of the span, the reference's, the pseudo-column): NaN, NaN, None when the
    profile has no calibration. The column is not evaluated (NaN ``p_adjusted``) below ``min_rows``
    finite confidences; the estimate is given whenever there is one."""
    if not profile.HasField("calibration"):
        return math.nan, math.nan, None
    calibration = profile.calibration
    reference = calibration.reference_estimated_accuracy
    nan = math.nan  # no distribution statistics: this column compares estimates
    col = pb.ColumnDrift(name=ESTIMATED_PERFORMANCE, p_adjusted=nan, psi=nan, ks_d=nan, ks_p=nan, wasserstein=nan,
                         chi2=nan, chi2_p=nan, js=nan, missing_rate=nan, reference_missing_rate=nan)
    found = next((c for c in current.columns if c.name == joint.CONFIDENCE
                  and c.kind == summary_pb2.ColumnSummary.NUMERIC), None)
    confidence = sketches.NumericSketch.from_proto(found) if found is not None else None
    rows = confidence.finite_count if confidence is not None else 0
    col.rows = rows
    estimate = joint.expected_accuracy(confidence, calibration) if rows else nan
    if rows < config.min_rows:
        col.reason = f"{rows} predictions with a confidence in the span, {config.min_rows} needed"
        return estimate, reference, col
    col.p_adjusted = 0.0  # evaluated: the alert machine counts this verdict
    col.drifted = reference - estimate >= config.accuracy_drop
    col.reason = (f"estimated accuracy {estimate:.3f} vs reference {reference:.3f} "
                  f"(tolerated drop {config.accuracy_drop:g})")
    return estimate, reference, col
