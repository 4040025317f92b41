"""Summaries across columns: a PCA projection of the numeric features, and a confidence calibration.

**Multivariate drift.** A reference profile carries a PCA of its numeric
feature columns, each standardised by the reference's mean and standard
deviation (``fit_projection``). Every summarised row then gets one more value,
its *reconstruction error*: the Euclidean norm of the standardised row minus its
projection onto the k kept components, in standard deviations
(``Projection.errors``). The agent sketches it as the numeric column
``@reconstruction_error`` and the drift engine tests it like any other column.
The components kept are the directions the reference varies most in; what
is left, the residual, is where correlations hold the data in: when two
features that moved together stop doing so, their marginals can stay as
they were while rows leave the reference's subspace and the error grows.
The norm, not its square: its distribution is closer to symmetric, so
Wasserstein/std reads it more steadily (NannyML's detector reports the same
distance). A missing or infinite value counts as the reference mean (0 after
standardising): its column's missing-rate test judges that, and a row is
not thrown away for one gap; a row with no finite value at all has no error
(missing).

**Label-free accuracy (CBPE).** A classifier's ``@confidence`` is each row's
largest class probability. On labelled reference data, an isotonic
regression of "prediction correct" on confidence (``fit_calibration``) maps a
confidence to the probability that the prediction is right. The expected
accuracy of any traffic is then the mean of that map over the traffic's
confidence distribution, which the collector reads from the merged
``@confidence`` sketch (``expected_accuracy``): no labels needed. It holds
as long as the map does (covariate shift: P(label | features) unchanged).
Fit the map on data the model did not train on, or it is optimistic.

The same code builds the reference's columns and the traffic's, and the
collector checks every field a profile or a command carries here
(``check_projection``, ``check_calibration``).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.errors import InvalidArgument
from agent.sketches.numeric import NumericSketch
from protos import summary_pb2

RECONSTRUCTION_ERROR = "@reconstruction_error"
CONFIDENCE = "@confidence"
DERIVED_COLUMNS = (RECONSTRUCTION_ERROR, CONFIDENCE)

# Components are kept until they explain this share of the standardised variance.
# High on purpose: the residual is where a broken correlation shows, and the fewer
# unrelated directions it holds, the less they dilute it. Measured (20 features, one pair
# correlated 0.9 -> 0, twenty 1,000-row windows against a 50,000-row reference): W/std of
# the error 0.22-0.27 at a share of 0.65 (NannyML's default), 0.58-0.67 at 0.9; clean
# windows at most 0.09 and 0.07.
VARIANCE_SHARE = 0.9
MAX_COMPONENTS = 64          # k; the projection costs the worker O(rows * d * k)
MAX_PROJECTION_COLUMNS = 512  # d; a model with more numeric features gets no projection
MAX_FIT_ROWS = 200_000       # rows the SVD sees (a seeded uniform subsample beyond)
MAX_CALIBRATION_POINTS = 256
MIN_CALIBRATION_ROWS = 100   # labelled rows with a finite confidence
_ORTHONORMAL_TOLERANCE = 1e-6


@dataclass(frozen=True, eq=False)
class Projection:
    """A checked ``summary_pb2.Projection`` as arrays: ``errors`` is the summary worker's call."""

    columns: tuple[str, ...]
    mean: np.ndarray         # d
    scale: np.ndarray        # d, > 0
    basis: np.ndarray        # k x d, orthonormal rows
    explained_variance: float
    # The @reconstruction_error column's ``source``: which projection computed it, so that the
    # errors of windows summarised with another one (a profile attached since) can be told apart.
    fingerprint: str = field(init=False, default="")

    def __post_init__(self) -> None:
        # The residual is z's part outside the kept components, i.e. z projected on the orthogonal
        # complement of the basis: (d - k) directions. With k near d (a high variance share) that
        # is one small product instead of two large ones; else z minus its reconstruction.
        k, d = self.basis.shape
        complement = None
        if 0 < k and d - k <= k:
            complement = np.linalg.svd(self.basis, full_matrices=True)[2][k:].copy()
        object.__setattr__(self, "_complement", complement)
        object.__setattr__(self, "_inverse_scale", 1.0 / self.scale)
        if k:  # (fit_projection's unfitted helper has none)
            digest = hashlib.sha256(self.to_proto().SerializeToString()).hexdigest()
            object.__setattr__(self, "fingerprint", f"projection:{digest[:16]}")

    @classmethod
    def from_proto(cls, msg: summary_pb2.Projection) -> Projection:
        """Raises InvalidArgument, naming the field, unless ``msg`` is a usable projection."""
        check_projection(msg)
        d = len(msg.columns)
        return cls(tuple(msg.columns), np.array(msg.mean, dtype=np.float64), np.array(msg.scale, dtype=np.float64),
                   np.array(msg.basis, dtype=np.float64).reshape(msg.components, d), msg.explained_variance)

    def to_proto(self) -> summary_pb2.Projection:
        return summary_pb2.Projection(columns=self.columns, mean=self.mean.tolist(), scale=self.scale.tolist(),
                                      components=len(self.basis), basis=self.basis.ravel().tolist(),
                                      explained_variance=self.explained_variance)

    def standardise(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(z, empty): ``x`` [n, d] standardised (a new float64 array), non-finite entries set to 0
        (the reference mean), and which rows had no finite value at all (None: every row had one)."""
        return _mean_for_gaps(self._scaled(x))

    def errors(self, x: np.ndarray) -> np.ndarray:
        """Each row's reconstruction error (float64 [n]) from ``x`` [n, d], columns in ``columns`` order.
        Values so large that their square overflows (|z| > 1e154) give an infinite error."""
        z = self._scaled(x)
        out = self._norms(z)
        redo = ~np.isfinite(out)
        if redo.any():  # a missing or infinite value in these rows (rare): again, with gaps as the mean
            again, empty = _mean_for_gaps(z[redo])
            fixed = self._norms(again)
            if empty is not None:
                fixed[empty] = np.nan
            out[redo] = fixed
        return out

    def _scaled(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            z = np.subtract(x, self.mean, dtype=np.float64)  # one pass: the float64 copy and the centring
            z *= self._inverse_scale  # type: ignore[attr-defined]
        return z

    def _norms(self, z: np.ndarray) -> np.ndarray:
        complement = self._complement  # type: ignore[attr-defined]
        with np.errstate(over="ignore", invalid="ignore"):
            residual = z @ complement.T if complement is not None else z - (z @ self.basis.T) @ self.basis
            return np.sqrt(np.einsum("ij,ij->i", residual, residual))


def _mean_for_gaps(z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``z`` (standardised, changed in place) with non-finite entries set to 0, the reference mean; and
    which rows had no finite value at all (None: every row had one)."""
    finite = np.isfinite(z)
    if finite.all():
        return z, None
    z[~finite] = 0.0
    return z, ~finite.any(axis=1)


def fit_projection(x: np.ndarray, columns: Sequence[str], *, share: float = VARIANCE_SHARE,
                   max_components: int = MAX_COMPONENTS, seed: int = 0) -> tuple[Projection | None, str]:
    """The PCA of ``x`` [n, d] (reference rows of the numeric feature ``columns``), standardised
    by its own finite values' mean and (population) standard deviation, 1 where that is 0.
    Keeps the fewest components that explain ``share`` of the variance, at most
    ``max_components`` and d - 1 (with all d the error would always be 0).

    Returns (projection, "") or (None, why there is none)."""
    x = np.asarray(x)
    n, d = x.shape if x.ndim == 2 else (len(x), 1)
    if d < 2:
        return None, f"{d} numeric feature column{'s' if d != 1 else ''}: a projection needs at least 2"
    if d > MAX_PROJECTION_COLUMNS:
        return None, f"{d} numeric feature columns: a projection takes at most {MAX_PROJECTION_COLUMNS}"
    mean, scale = np.zeros(d), np.ones(d)
    for j in range(d):  # one column at a time: no float64 copy of the whole reference
        values = x[:, j].astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            mean[j] = values.mean()
            std = values.std()
            scale[j] = std if std > 0 and math.isfinite(std) else 1.0
    rows = np.arange(n)
    if n > MAX_FIT_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(n, MAX_FIT_ROWS, replace=False))
    unfit = Projection(tuple(columns), mean, scale, np.zeros((0, d)), 0.0)
    z, empty = unfit.standardise(x[rows])
    if empty is not None:
        z = z[~empty]
    if len(z) < 2:
        return None, f"{len(z)} reference row{'s' if len(z) != 1 else ''} with a finite feature value: " \
                      "a projection needs at least 2"
    _, singular, vt = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
    variance = singular ** 2
    total = float(variance.sum())
    if not total > 0 or not math.isfinite(total):
        return None, "the numeric features do not vary in the reference: no directions to project on"
    explained = np.cumsum(variance) / total
    k = int(np.searchsorted(explained, share - 1e-12) + 1)
    k = max(1, min(k, max_components, d - 1))
    return Projection(tuple(columns), mean, scale, vt[:k].copy(), float(min(explained[k - 1], 1.0))), ""


def check_projection(msg: summary_pb2.Projection) -> None:
    """Raise InvalidArgument unless ``msg`` is bounded and consistent: 2 to MAX_PROJECTION_COLUMNS
    distinct named columns, a finite mean and a positive finite scale per column, 1 to
    min(d - 1, MAX_COMPONENTS) components whose basis is k x d with orthonormal rows, and an
    explained variance share in [0, 1]."""
    d, k = len(msg.columns), msg.components
    if not 2 <= d <= MAX_PROJECTION_COLUMNS:
        raise InvalidArgument(f"projection has {d} columns; from 2 to {MAX_PROJECTION_COLUMNS} allowed")
    if not all(msg.columns):
        raise InvalidArgument("projection has a column with an empty name")
    if len(set(msg.columns)) != d:
        raise InvalidArgument("projection columns must be distinct")
    for field in ("mean", "scale"):
        values = getattr(msg, field)
        if len(values) != d:
            raise InvalidArgument(f"projection {field} has {len(values)} values for {d} columns")
        if not np.isfinite(np.asarray(values, dtype=np.float64)).all():
            raise InvalidArgument(f"projection {field} must be finite")
    if min(msg.scale) <= 0:
        raise InvalidArgument("projection scale must be greater than 0 (1 for a constant column)")
    if not 1 <= k <= min(d - 1, MAX_COMPONENTS):
        raise InvalidArgument(f"projection keeps {k} components of {d} columns; from 1 to "
                              f"{min(d - 1, MAX_COMPONENTS)} allowed")
    if len(msg.basis) != k * d:
        raise InvalidArgument(f"projection basis has {len(msg.basis)} values; {k} x {d} = {k * d} expected")
    basis = np.asarray(msg.basis, dtype=np.float64).reshape(k, d)
    if not np.isfinite(basis).all():
        raise InvalidArgument("projection basis must be finite")
    if np.abs(basis @ basis.T - np.eye(k)).max() > _ORTHONORMAL_TOLERANCE:
        raise InvalidArgument("projection basis rows must be orthonormal")
    if not (math.isfinite(msg.explained_variance) and 0 <= msg.explained_variance <= 1):
        raise InvalidArgument(f"projection explained_variance must lie in [0, 1], got {msg.explained_variance}")


# ---------------------------------------------------------------- confidence and calibration


def confidence(probabilities: np.ndarray) -> np.ndarray:
    """Each row's largest class probability (float64 [n]); NaN where any of the row's is NaN."""
    p = np.asarray(probabilities)
    if p.ndim != 2 or p.shape[1] == 0:
        return np.full(len(p), np.nan)
    if p.shape[1] > 16:
        return p.max(axis=1).astype(np.float64)
    # A few classes: one maximum per column, 30x faster than max(axis=1) along rows this short
    # (8 vs 231 us for 6,400 rows of 2); NaN propagates the same way.
    out = p[:, 0].astype(np.float64)
    for j in range(1, p.shape[1]):
        np.maximum(out, p[:, j], out=out)
    return out


def calibrate(calibration: summary_pb2.Calibration, values: np.ndarray) -> np.ndarray:
    """P(correct) at each confidence: linear between the calibration's points, flat beyond them."""
    return np.interp(np.asarray(values, dtype=np.float64), np.asarray(calibration.confidence),
                     np.asarray(calibration.correct))


def fit_calibration(conf: np.ndarray, correct: np.ndarray) -> tuple[summary_pb2.Calibration | None, str]:
    """Isotonic regression of ``correct`` (bool per labelled row) on ``conf`` (its confidence):
    the points of a non-decreasing map, at most MAX_CALIBRATION_POINTS (adjacent blocks of the
    fit merged, weighted, when there are more). Ties in confidence are pooled first, so the map
    is a function. Sets ``reference_accuracy`` to the share correct of these rows; the caller
    sets ``reference_estimated_accuracy`` from the reference's confidence sketch
    (``expected_accuracy``), as the collector computes it for traffic.

    Returns (calibration, "") or (None, why there is none)."""
    from scipy.optimize import isotonic_regression

    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    keep = np.isfinite(conf)
    conf, correct = conf[keep], correct[keep]
    if len(conf) < MIN_CALIBRATION_ROWS:
        return None, (f"{len(conf)} labelled rows with a finite confidence: a calibration needs at least "
                      f"{MIN_CALIBRATION_ROWS}")
    values, inverse, counts = np.unique(conf, return_inverse=True, return_counts=True)
    hits = np.bincount(inverse, weights=correct, minlength=len(values))
    fitted = isotonic_regression(hits / counts, weights=counts.astype(np.float64), increasing=True).x
    # Blocks: runs of equal fitted value; each becomes one point at its weighted mean confidence.
    starts = np.flatnonzero(np.r_[True, fitted[1:] != fitted[:-1]])
    groups = _groups(np.add.reduceat(counts, starts), MAX_CALIBRATION_POINTS)
    block_of = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(values)]))
    group_of = groups[block_of]
    weight = np.bincount(group_of, weights=counts)
    xs = np.bincount(group_of, weights=counts * values) / weight
    ys = np.clip(np.bincount(group_of, weights=counts * fitted) / weight, 0.0, 1.0)
    ys = np.maximum.accumulate(ys)  # rounding must not make a weighted mean dip
    calibration = summary_pb2.Calibration(confidence=xs.tolist(), correct=ys.tolist(),
                                          reference_accuracy=float(correct.mean()))
    return calibration, ""


def _groups(weights: np.ndarray, most: int) -> np.ndarray:
    """For each block, its group: consecutive blocks of about equal total weight, at most ``most`` groups."""
    if len(weights) <= most:
        return np.arange(len(weights))
    cumulative = np.cumsum(weights)
    # a block's group is the share of the weight up to its middle, in ``most`` equal steps
    middle = (cumulative - weights / 2) / cumulative[-1]
    group = np.minimum((middle * most).astype(np.int64), most - 1)
    return np.unique(group, return_inverse=True)[1]


def expected_accuracy(sketch: NumericSketch, calibration: summary_pb2.Calibration) -> float:
    """The mean of the calibration map over the sketch's finite confidences (NaN if it has none):
    each item the KLL retains stands for its weight in values. Its error is at most the sketch's
    rank error, because the map is non-decreasing within [0, 1]."""
    items, cdf = sketch.sorted_view()
    if not items.size or not len(calibration.confidence):
        return math.nan
    weights = np.diff(cdf, prepend=0.0)
    return float(np.dot(weights, calibrate(calibration, items)) / cdf[-1])


def check_calibration(msg: summary_pb2.Calibration) -> None:
    """Raise InvalidArgument unless ``msg`` is a bounded non-decreasing map into [0, 1]: 1 to
    MAX_CALIBRATION_POINTS points, finite strictly increasing confidences, P(correct) in [0, 1] and
    non-decreasing, reference accuracies in [0, 1]."""
    n = len(msg.confidence)
    if not 1 <= n <= MAX_CALIBRATION_POINTS:
        raise InvalidArgument(f"calibration has {n} points; from 1 to {MAX_CALIBRATION_POINTS} allowed")
    if len(msg.correct) != n:
        raise InvalidArgument(f"calibration has {n} confidences but {len(msg.correct)} P(correct) values")
    xs, ys = np.asarray(msg.confidence, dtype=np.float64), np.asarray(msg.correct, dtype=np.float64)
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise InvalidArgument("calibration points must be finite")
    if (np.diff(xs) <= 0).any():
        raise InvalidArgument("calibration confidences must be strictly increasing")
    if ((ys < 0) | (ys > 1)).any():
        raise InvalidArgument("calibration P(correct) values must lie in [0, 1]")
    if (np.diff(ys) < 0).any():
        raise InvalidArgument("calibration P(correct) values must not decrease (the map is monotone)")
    for field in ("reference_accuracy", "reference_estimated_accuracy"):
        value = getattr(msg, field)
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise InvalidArgument(f"calibration {field} must lie in [0, 1], got {value}")
