"""Ground truth joined to predictions by request id: realised performance per window.

Labels arrive late (minutes to hours after the prediction), so the agent
keeps what it predicted under the caller's request id for a bounded join
window. The costs are placed where they hurt least:

- ``record`` runs on the request thread, so it only stores a *reference* to
  the label output array under the id (no conversion; no per-row work, but
  for a string output, whose strings are sized for the byte budget);
- ``label`` converts the one value it joins and counts it;
- ``take_performance`` runs on the thread that closes windows and turns the
  counts into a ``summary_pb2.Performance`` for the window being closed.

Nothing here runs for calls without a request id. Callers choose the ids,
the batch sizes and the labels, so every way they add to memory has a bound
(``FeedbackLimits``), and whatever goes past one is counted (``stats``), never
kept silently:

- held predictions: a count budget and a byte budget. An entry costs its id,
  its kept array (a string array: each string too) and ``ENTRY_OVERHEAD``, plus
  one byte per row once a row is labelled; the oldest are evicted first. One
  prediction larger than the whole byte budget is not kept (``too_large``);
- request ids longer than ``max_request_id_chars``: the request is served as
  usual (monitoring never breaks inference) but its prediction is not kept
  (``ids_too_long``); a label for it is unmatched;
- predictions older than ``join_seconds`` no longer join and are purged;
- classes: the confusion matrix of a window is classes x classes, so a model
  has at most ``max_classes`` class names, ``<other>`` included: the first
  ones seen keep their names (for the log's life, not per window, so a name
  means the same in every window), later ones and names longer than
  ``max_class_chars`` or with unprintable characters are counted under
  ``<other>`` (``other_class_labels`` counts the labels affected; a class
  really named ``<other>`` shares that row). Labels are never refused for
  their name: the join still counts;
- regression: a label whose error would make the window's error sums infinite
  is unmatched (``out_of_range``), so a window is never refused for it.

A managed agent swaps versions; labels keep arriving for predictions of the
version it replaced. The new version's log ``replaces`` the old one: a label
whose request id it does not hold is tried on the replaced log (only the last
one: the link is never longer than one), joined and counted there, for that
version; a label neither knows is counted unmatched here.

Classification (integer, boolean or string label outputs) fills a confusion
matrix of class names (numbers print as integers: ``1``, not ``1.0``);
regression (a float output with one value per row) fills error sums of
``prediction - label``. The kind follows the recorded array's dtype.
"""
from __future__ import annotations

import math
import numbers
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from protos import summary_pb2

Kind = Literal["classification", "regression"]

OTHER_CLASS = "<other>"  # where labels and predictions of classes beyond the bound are counted
# What one kept prediction costs beyond its id and array: its dict slot, entry list and order pair
# (measured with tracemalloc on CPython 3.11: about 230 bytes; rounded up).
ENTRY_OVERHEAD = 320
# A window's confusion matrix has classes x classes cells: 1,000 classes make a million, about a megabyte
# of window; more would make windows the collector cannot take in one message.
MOST_CLASSES = 1_000


@dataclass(frozen=True)
class FeedbackLimits:
    """What the predictions kept for feedback, and the labels joined to them, may cost."""

    max_requests: int = 100_000          # predictions held
    max_bytes: int = 32 << 20            # bytes of the predictions held (ids, arrays, overhead)
    max_request_id_chars: int = 256      # longer ids: served, not kept
    max_classes: int = 256               # class names per model in a window's confusion matrix, <other> included
    max_class_chars: int = 128           # longer class names count as <other>

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_bytes", "max_request_id_chars", "max_class_chars"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {getattr(self, name)!r}")
        if not isinstance(self.max_classes, int) or not 2 <= self.max_classes <= MOST_CLASSES:
            raise ValueError(f"max_classes must be from 2 (one class and {OTHER_CLASS}) to {MOST_CLASSES}, "
                             f"not {self.max_classes!r}")


_CLASS_TYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool", "string"}
_FLOAT_TYPES = {"float", "double", "float16"}


def prediction_output(outputs: Sequence[Any]) -> tuple[int, Kind] | None:
    """Which output (of ORT NodeArgs) holds the prediction a label is compared with.

    The first class-label output (integer/bool/string, one value per row: the
    outputs ``agent.capture`` summarises as categorical), else the first float
    output with one value per row (regression). None when there is neither,
    e.g. a network that returns only logits: there is nothing to join a label to.
    """
    def one_per_row(arg: Any) -> bool:
        dims = list(arg.shape or [])[1:]
        return not dims or (len(dims) == 1 and (dims[0] == 1 or not isinstance(dims[0], int)))

    def elem(arg: Any) -> str:
        t = arg.type
        return t[len("tensor("):-1] if t.startswith("tensor(") and t.endswith(")") else ""

    for types, kind in ((_CLASS_TYPES, "classification"), (_FLOAT_TYPES, "regression")):
        for i, arg in enumerate(outputs):
            if elem(arg) in types and one_per_row(arg):
                return i, kind  # type: ignore[return-value]
    return None


def class_name(value: Any) -> str:
    """A class label as text, the same way for predictions and ground truth,
    so that an int64 prediction ``1`` matches a label ``"1"``, ``1`` or ``1.0``."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def target_value(value: Any) -> float:
    """A regression label as a finite float; anything else is a caller's mistake."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"a regression label must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"a regression label must be finite, not {value!r}")
    return number


def _row_value(prediction: Any, row: int) -> Any:
    """The prediction of one row, or None when the request has no such row
    (or the row holds more than one value)."""
    arr = np.asarray(prediction)
    if arr.ndim == 0 or row >= len(arr):
        return None
    value = arr[row]
    if np.ndim(value):
        if np.size(value) != 1:
            return None
        value = np.ravel(value)[0]
    return value


@dataclass
class _Counts:
    """What accumulates between two windows."""

    labeled: int = 0
    unmatched: int = 0
    classes: dict[str, int] = field(default_factory=dict)           # name -> index, first seen first
    confusion: dict[tuple[str, str], int] = field(default_factory=dict)  # (true, predicted) -> count
    error_sum: float = 0.0
    abs_error_sum: float = 0.0
    sq_error_sum: float = 0.0

    def to_proto(self) -> summary_pb2.Performance:
        n = len(self.classes)
        matrix = [0] * (n * n)
        for (true, pred), count in self.confusion.items():
            matrix[self.classes[true] * n + self.classes[pred]] = count
        return summary_pb2.Performance(
            labeled=self.labeled, unmatched=self.unmatched, classes=list(self.classes), confusion=matrix,
            error_sum=self.error_sum, abs_error_sum=self.abs_error_sum, sq_error_sum=self.sq_error_sum)


_ARRAY_HEADER = sys.getsizeof(np.empty(0))  # an ndarray object without its buffer


def _array_bytes(prediction: np.ndarray) -> int:
    """Memory a kept array holds: its buffer (its base's, for a view: onnxruntime's outputs are views),
    two array headers and, for strings, each string. On the request path: attribute reads only."""
    base = prediction.base
    size = (base.nbytes if type(base) is np.ndarray else prediction.nbytes) + 2 * _ARRAY_HEADER
    if prediction.dtype.kind == "O":  # a string output: per-row work, only for calls with a request id
        size += sum(map(sys.getsizeof, prediction.flat))
    return size


class PredictionLog:
    """Predictions kept by request id, and the performance of the labels joined to them.

    ``limits`` bounds what callers can add (``FeedbackLimits``); ``clock``
    (seconds, monotonic) is injectable so tests can move time.
    Thread-safe: requests record, feedback calls label and the window thread
    takes the counts concurrently, each under one short lock.
    """

    def __init__(self, join_seconds: float = 3600.0, limits: FeedbackLimits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not join_seconds > 0:
            raise ValueError(f"join_seconds must be greater than 0, not {join_seconds!r}")
        self.join_seconds = float(join_seconds)
        self.limits = limits if limits is not None else FeedbackLimits()
        self._clock = clock
        self._lock = threading.Lock()
        # request id -> [recorded at, label output array, labelled rows (bool array) or None, bytes charged]
        self._entries: dict[str, list] = {}
        # (request id, entry) in record order, oldest first: what to evict or expire next.
        # A reused id leaves a stale pair behind (its entry was replaced and emptied); stale
        # pairs still count towards max_requests and their ids towards max_bytes, so memory
        # stays bounded either way. (An OrderedDict would do both jobs, but costs twice as much per record.)
        self._order: deque[tuple[str, list]] = deque()
        self._bytes = 0  # charged by the pairs in _order
        self._counts = _Counts()
        self._known: dict[str, None] = {}  # class names with a row and column of their own (< max_classes)
        self._replaced: PredictionLog | None = None  # the log of the version this one's replaced
        self.evicted = 0       # pushed out by the count or byte budget while still joinable
        self.expired = 0       # dropped after join_seconds
        self.duplicates = 0    # labels for a row that already had one (ignored: first label wins)
        self.ids_too_long = 0  # predictions not kept: the request id was longer than max_request_id_chars
        self.too_large = 0     # predictions not kept: larger on their own than max_bytes
        self.other_labels = 0  # labels whose true or predicted class was counted as <other>
        self.out_of_range = 0  # regression labels whose error would overflow the window's sums

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, request_id: str, prediction: Any) -> bool:
        """Keep ``prediction`` (the label output, as the model returned it) under ``request_id``;
        False (and counted) when the id is too long or the prediction alone is over the byte budget.

        The array is kept by reference, not copied: a caller that modifies
        the returned output in place changes what its label is compared with.
        A reused id replaces the earlier prediction.
        """
        limits = self.limits
        if len(request_id) > limits.max_request_id_chars:
            with self._lock:
                self.ids_too_long += 1
            return False
        if not isinstance(prediction, np.ndarray):
            prediction = np.asarray(prediction)
        cost = ENTRY_OVERHEAD + sys.getsizeof(request_id) + _array_bytes(prediction)  # outside the lock
        with self._lock:
            if cost > limits.max_bytes:
                self.too_large += 1
                return False
            now = self._clock()
            entry = [now, prediction, None, cost]
            replaced = self._entries.get(request_id)
            if replaced is not None:  # its pair stays in _order, charged for its id only
                kept = ENTRY_OVERHEAD + sys.getsizeof(request_id)
                self._bytes -= replaced[3] - kept
                replaced[1:] = [None, None, kept]
            self._entries[request_id] = entry
            self._order.append((request_id, entry))
            self._bytes += cost
            if len(self._order) > limits.max_requests or self._bytes > limits.max_bytes:
                self._shrink(now)
        return True

    def _shrink(self, now: float) -> None:
        """Under the lock: evict the oldest until both budgets hold."""
        limits, entries, order = self.limits, self._entries, self._order
        while order and (len(order) > limits.max_requests or self._bytes > limits.max_bytes):
            oldest, old_entry = order.popleft()
            self._bytes -= old_entry[3]
            if entries.get(oldest) is old_entry:  # else: replaced earlier, nothing more to drop
                del entries[oldest]
                if old_entry[0] <= now - self.join_seconds:
                    self.expired += 1
                else:
                    self.evicted += 1

    def label(self, request_id: str, value: Any, row: int = 0) -> bool:
        """Join the true ``value`` of row ``row`` of request ``request_id``; True if joined.

        False (counted as unmatched) for an unknown id or row, a prediction
        older than the join window, a non-finite regression prediction or one
        whose error is out of range. An id this log does not hold is tried on
        the log it ``replaces``. A second label for the same row is ignored (a
        retried feedback call must not count twice) but answers True like the
        first. Raises ValueError for a value that cannot be a label (a
        regression label that is not a finite number): that changes nothing.
        """
        if row < 0:
            raise ValueError(f"row must be 0 or more, not {row}")
        with self._lock:
            joined = self._join(request_id, value, row)
            replaced = self._replaced
            if joined is None and replaced is not None:
                # Always newer log then older one, never the reverse: the two locks cannot deadlock.
                with replaced._lock:
                    try:
                        joined = replaced._join(request_id, value, row)
                    except ValueError:  # a label the current version takes but the replaced one cannot
                        joined = False
            if not joined:
                self._counts.unmatched += 1
                return False
            return True

    def replaces(self, older: PredictionLog | None) -> None:
        """Labels for request ids this log does not hold are tried on ``older`` (the log of the version
        this one's version replaced) and counted there; ``older``'s own link is cut, so labels reach
        only the last replaced version. None: no fallback."""
        with self._lock:
            self._replaced = older
        if older is not None:
            with older._lock:
                older._replaced = None

    def _join(self, request_id: str, value: Any, row: int) -> bool | None:
        """Under ``self._lock``: True when joined (or already joined), False when the prediction cannot
        take this label, None when no live prediction has this id; unmatched is not counted here."""
        entry = self._entries.get(request_id)
        now = self._clock()
        if entry is None or entry[0] <= now - self.join_seconds:
            return None
        predicted = _row_value(entry[1], row)
        regression = predicted is not None and entry[1].dtype.kind == "f"
        if regression:
            truth: Any = target_value(value)
            predicted = float(predicted)
            if not math.isfinite(predicted):
                predicted = None
        if predicted is None:
            return False
        labelled = entry[2]
        if labelled is not None and labelled[row]:
            self.duplicates += 1
            return True
        c = self._counts
        if regression:
            error = predicted - truth
            sums = (c.error_sum + error, c.abs_error_sum + abs(error), c.sq_error_sum + error * error)
            if not all(map(math.isfinite, sums)):
                self.out_of_range += 1
                return False
            c.error_sum, c.abs_error_sum, c.sq_error_sum = sums
        else:
            true, pred = self._class(class_name(value)), self._class(class_name(predicted))
            self.other_labels += OTHER_CLASS in (true, pred)
            c.classes.setdefault(true, len(c.classes))
            c.classes.setdefault(pred, len(c.classes))
            c.confusion[true, pred] = c.confusion.get((true, pred), 0) + 1
        c.labeled += 1
        if labelled is None:  # one byte per row of the request, charged to the entry
            labelled = entry[2] = np.zeros(len(entry[1]), dtype=bool)
            entry[3] += labelled.nbytes
            self._bytes += labelled.nbytes
        labelled[row] = True
        self._shrink(now)
        return True

    def _class(self, name: str) -> str:
        """Under the lock: ``name``, or ``<other>`` when it is beyond the class bound."""
        known = self._known
        if name in known:
            return name
        limits = self.limits
        if len(name) > limits.max_class_chars or not name.isprintable() or len(known) >= limits.max_classes - 1:
            return OTHER_CLASS
        known[name] = None
        return name

    def take_performance(self) -> summary_pb2.Performance:
        """What accumulated since the last call, as a ``Performance``; starts afresh.

        Also purges expired predictions: this runs once per window, off the
        request thread, so the request path never pays for the time bound.
        """
        with self._lock:
            counts, self._counts = self._counts, _Counts()
            self._purge()
        return counts.to_proto()

    def pending(self) -> tuple[int, int]:
        """(labeled, unmatched) counted but not yet taken."""
        with self._lock:
            return self._counts.labeled, self._counts.unmatched

    def stats(self) -> dict[str, int]:
        """Held predictions, their bytes, and everything left out or dropped, for operators and tests."""
        with self._lock:
            self._purge()
            return {"held": len(self._entries), "held_bytes": self._bytes, "evicted": self.evicted,
                    "expired": self.expired, "ids_too_long": self.ids_too_long, "too_large": self.too_large,
                    "duplicate_labels": self.duplicates, "other_class_labels": self.other_labels,
                    "out_of_range_labels": self.out_of_range}

    def _purge(self) -> None:
        cutoff = self._clock() - self.join_seconds
        entries, order = self._entries, self._order
        while order and order[0][1][0] <= cutoff:
            request_id, entry = order.popleft()
            self._bytes -= entry[3]
            if entries.get(request_id) is entry:
                del entries[request_id]
                self.expired += 1
