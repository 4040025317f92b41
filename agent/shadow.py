"""Shadow: a second model version sees a share of live requests; its answers are compared, then discarded.

The request thread only decides (one random draw against ``share``) and hands
the request's inputs and production's outputs to a bounded queue with
``put_nowait``: a full queue counts the request as ``skipped`` and production
goes on. One daemon thread runs the shadow model, times it, and folds the
comparison into a ``ShadowSummary``, which the agent takes (and resets) each
time a production window is exported. Nothing here can fail or slow a
production request; shadow errors are counted.

What is compared, per row (``prediction_output`` picks the outputs, as for labels):
classifiers: the predicted labels (``label_rows`` / ``label_agree``) and the
score difference, shadow minus production probability of production's label
(the column where production's probabilities peak, so class labels need not be
numbers); regressors: the prediction difference. Both score differences and
the shadow's latency (µs per call) are the same mergeable numeric sketches as
every window column.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

import numpy as np

from agent import capture
from agent.feedback import prediction_output
from agent.sketches import NumericSketch
from protos import summary_pb2

log = logging.getLogger(__name__)

DEFAULT_QUEUE = 64  # requests waiting for the shadow; beyond that they are skipped (and counted)
_STOP = object()
ROLE = summary_pb2.ColumnSummary.ROLE_UNSPECIFIED


@dataclass(frozen=True)
class Comparison:
    """Which outputs (by name) hold what, read from the shadow model's outputs."""

    label: str | None = None       # classifier: the class-label output
    scores: str | None = None      # classifier: the probabilities ([N, C] tensor or ZipMap)
    prediction: str | None = None  # regressor: one float per row

    @classmethod
    def plan(cls, outputs: Sequence[Any]) -> Comparison:
        found = prediction_output(outputs)
        if found is None:
            return cls()
        index, kind = found
        name = outputs[index].name
        if kind == "regression":
            return cls(prediction=name)
        scores = next((arg.name for arg in outputs if arg.name != name and _is_scores(arg)), None)
        return cls(label=name, scores=scores)


def _is_scores(arg: Any) -> bool:
    if arg.type.startswith("seq(map(") and arg.type.endswith(",tensor(float)))"):
        return True
    return arg.type in ("tensor(float)", "tensor(double)") and len(arg.shape or []) == 2


def _matrix(value: Any) -> np.ndarray:
    if isinstance(value, list):  # ZipMap rows
        return capture.zipmap_to_array(value)
    return np.asarray(value, dtype=np.float64)


class _Tally:
    """One summary's worth of counts and sketches."""

    def __init__(self) -> None:
        self.calls = self.rows = self.errors = 0
        self.label_rows = self.label_agree = 0
        self.score_diff = NumericSketch()
        self.latency = NumericSketch()


class ShadowRunner:
    """Runs ``session`` (anything with onnxruntime's ``run`` and ``get_outputs``) beside production.

    ``offer`` is the request thread's part; ``take`` the window exporter's; ``stop`` the controller's.
    """

    def __init__(self, session: Any, version: str, sha256: str = "", share: float = 1.0, *,
                 queue_size: int = DEFAULT_QUEUE) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], not {share}")
        if queue_size <= 0:
            raise ValueError(f"queue_size must be greater than 0, not {queue_size}")
        self.session = session
        self.version, self.sha256, self.share = version, sha256, share
        self.comparison = Comparison.plan(session.get_outputs())
        self._names = [arg.name for arg in session.get_outputs()]
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        # Two locks, so a request never waits for the shadow thread's sketch updates:
        self._offer_lock = threading.Lock()  # the request threads' counts: a lock and an add
        self._accepted = self._skipped = 0
        self._lock = threading.Lock()        # the tally; never held across a model call
        self._done = threading.Condition(self._lock)
        self._tally = _Tally()
        self._finished = 0  # requests run (or failed), for ``flush``
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"outrider-shadow-{version}", daemon=True)
        self._thread.start()

    # --- request thread ---------------------------------------------------------------
    def offer(self, feed: Mapping[str, Any], output_names: Sequence[str], outputs: Sequence[Any]) -> None:
        """Maybe hand this request to the shadow; never blocks, never raises."""
        try:
            if self._stopping.is_set() or (self.share < 1.0 and random.random() >= self.share):
                return
            with self._offer_lock:
                self._accepted += 1
            self._queue.put_nowait((feed, output_names, outputs))
        except queue.Full:
            with self._offer_lock:
                self._accepted -= 1
                self._skipped += 1
        except Exception:  # monitoring never fails the request
            log.debug("shadow offer failed", exc_info=True)

    # --- exporter thread --------------------------------------------------------------
    def take(self) -> summary_pb2.ShadowSummary | None:
        """What happened since the last take (None when nothing did); starts a new tally."""
        with self._offer_lock:
            skipped, self._skipped = self._skipped, 0
        fresh = _Tally()  # built outside the lock
        with self._lock:
            tally, self._tally = self._tally, fresh
        if not (tally.calls or tally.errors or skipped):
            return None
        return summary_pb2.ShadowSummary(
            model_version=self.version, model_sha256=self.sha256, calls=tally.calls, rows=tally.rows,
            skipped=skipped, errors=tally.errors, label_rows=tally.label_rows,
            label_agree=tally.label_agree,
            score_diff=tally.score_diff.to_proto("score_diff", ROLE, self.comparison.scores
                                                 or self.comparison.prediction or ""),
            latency=tally.latency.to_proto("latency_us", ROLE, ""),
        )

    @property
    def alive(self) -> bool:
        """Whether its thread still runs (False once ``stop`` returned, unless a call hung)."""
        return self._thread.is_alive()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every request queued so far was run; False if ``timeout`` came first."""
        with self._done:
            return self._done.wait_for(lambda: self._finished >= self._accepted, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking requests; the thread finishes the call it is in (queued ones are dropped)."""
        self._stopping.set()
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass  # the loop sees _stopping after its current call
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("shadow version %s is still in a model call after %.0f s; left to finish alone",
                        self.version, timeout)

    # --- shadow thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._stopping.is_set():
                return
            feed, names, outputs = item
            t0 = perf_counter_ns()
            try:
                shadow = self.session.run(None, feed)
            except Exception:
                log.debug("shadow version %s raised", self.version, exc_info=True)
                with self._lock:
                    self._tally.errors += 1
                    self._finished += 1
                    self._done.notify_all()
                continue
            latency_us = (perf_counter_ns() - t0) / 1e3
            rows = len(next(iter(feed.values()))) if feed else 0
            try:
                labels, agree, diff = self._compare(dict(zip(names, outputs)), dict(zip(self._names, shadow)))
            except Exception:  # outputs we cannot line up: the call counts, its comparison does not
                log.debug("shadow comparison failed", exc_info=True)
                labels, agree, diff = 0, 0, None
            with self._lock:
                t = self._tally
                t.calls += 1
                t.rows += rows
                t.label_rows += labels
                t.label_agree += agree
                t.latency.update(np.array([latency_us]))
                if diff is not None and diff.size:
                    t.score_diff.update(diff)
                self._finished += 1
                self._done.notify_all()

    def _compare(self, production: dict[str, Any],
                 shadow: dict[str, Any]) -> tuple[int, int, np.ndarray | None]:
        """(label rows, agreeing rows, score differences) of one call."""
        c = self.comparison
        if c.prediction is not None:
            if c.prediction not in production:
                return 0, 0, None
            p = np.asarray(production[c.prediction], dtype=np.float64).reshape(-1)
            s = np.asarray(shadow[c.prediction], dtype=np.float64).reshape(-1)
            return 0, 0, (s - p if p.shape == s.shape else None)
        labels = agree = 0
        diff = None
        if c.label is not None and c.label in production:
            p = np.asarray(production[c.label]).reshape(-1)
            s = np.asarray(shadow[c.label]).reshape(-1)
            if p.shape == s.shape:
                if p.dtype.kind != s.dtype.kind:  # e.g. int64 vs string labels: compare as text
                    p, s = p.astype(str), s.astype(str)
                labels, agree = p.size, int(np.count_nonzero(p == s))
        if c.scores is not None and c.scores in production:
            p, s = _matrix(production[c.scores]), _matrix(shadow[c.scores])
            if p.shape == s.shape and p.ndim == 2 and p.shape[0] and p.shape[1]:
                rows_idx = np.arange(p.shape[0])
                column = p.argmax(axis=1)
                diff = s[rows_idx, column].astype(np.float64) - p[rows_idx, column]
        return labels, agree, diff
