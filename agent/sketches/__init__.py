"""All of Outrider's summary math: mergeable per-column sketches and the tests on them.

The agent builds these from blocks of traffic; the collector merges windows
from many agents in any order and compares the result with a reference. So
every statistic here is mergeable (associative and commutative up to floating
rounding, and up to the KLL's randomised compaction for quantiles), and every
sketch round-trips through ``summary_pb2.ColumnSummary`` in the Apache
DataSketches binary formats, so other tools can read them.

One package, one home: ``numeric`` (NumericSketch), ``block`` (the summary
worker's update of a block's numeric columns), ``kll`` (KLL bytes: compacted,
checked, read), ``categorical`` (CategoricalSketch), ``compare`` (every comparison
between two sketches). Import from here; the split is an implementation detail.
``joint`` (``from agent.sketches import joint``) is the math across columns:
the reference's PCA projection and reconstruction error, and the confidence
calibration behind the label-free accuracy estimate.
"""
from __future__ import annotations

from agent.errors import InvalidArgument
from agent.sketches.categorical import CategoricalSketch
from agent.sketches.compare import (
    PSI_EPSILON,
    CategoricalComparison,
    Cells,
    MissingComparison,
    NumericComparison,
    ad_pvalue,
    ad_test,
    categorical_cells,
    chi2,
    compare_categorical,
    compare_discrete,
    compare_missing,
    compare_numeric,
    discrete_cells,
    js_distance,
    ks_pvalue,
    ks_statistic,
    missing_rate,
    not_finite,
    psi,
    wasserstein,
)
from agent.sketches.block import update_numeric_block, update_numeric_blocks
from agent.sketches.numeric import DEFAULT_K, MAX_EXACT_VALUES, REFERENCE_K, NumericSketch
from protos import summary_pb2

__all__ = [
    "DEFAULT_K",
    "MAX_EXACT_VALUES",
    "PSI_EPSILON",
    "REFERENCE_K",
    "CategoricalComparison",
    "CategoricalSketch",
    "Cells",
    "MissingComparison",
    "NumericComparison",
    "NumericSketch",
    "ad_pvalue",
    "ad_test",
    "categorical_cells",
    "chi2",
    "compare_categorical",
    "compare_discrete",
    "compare_missing",
    "compare_numeric",
    "discrete_cells",
    "from_proto",
    "js_distance",
    "ks_pvalue",
    "ks_statistic",
    "missing_rate",
    "not_finite",
    "psi",
    "update_numeric_block",
    "update_numeric_blocks",
    "wasserstein",
]


def from_proto(msg: summary_pb2.ColumnSummary) -> NumericSketch | CategoricalSketch:
    """Rebuild whichever sketch ``msg.kind`` names."""
    if msg.kind == summary_pb2.ColumnSummary.NUMERIC:
        return NumericSketch.from_proto(msg)
    if msg.kind == summary_pb2.ColumnSummary.CATEGORICAL:
        return CategoricalSketch.from_proto(msg)
    raise InvalidArgument(f"column {msg.name!r} has no kind")
