"""``MonitoredSession``: a drop-in ``onnxruntime.InferenceSession`` that summarises its traffic.

The request thread runs the model, then copies the call's input rows and
outputs into a preallocated ring and returns; nothing else. A summary worker
(thread, or helper process reading the ring in shared memory) builds the
sketches and closes windows into ``WindowSummary`` messages for a sink.
A full ring drops rows and counts them; monitoring never raises into, nor
blocks, the caller.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from time import perf_counter_ns
from typing import Any, Literal, Sequence

import numpy as np
import onnxruntime as ort

from agent import capture
from agent import feature_names as naming
from agent.capture import Reduce, Slot
from agent.errors import InvalidArgument
from agent.feedback import FeedbackLimits, Kind, PredictionLog, prediction_output
from agent.reference import REFERENCE, Reference, from_command, load_projection
from agent.ring import (CALLS_HEAD, CALLS_TAIL, DROPPED, ERRORS, ROWS_HEAD, ROWS_TAIL, SKIPPED,
                        Ring, RingLayout, shared_memory_is_safe)
from agent.sinks import InMemorySink, WindowSink
from agent.summarizer import ProcessSummarizer, ThreadSummarizer
from agent.worker import Identity, WindowPolicy, check_sample_rows
from protos import summary_pb2

log = logging.getLogger(__name__)

try:  # the C copier; OUTRIDER_PURE_PYTHON=1 forces the Python closure (tests cover both)
    from agent._capture import Capture as _Capture
except ImportError:  # not built (no compiler at install): same behaviour, slower
    _Capture = None
if os.environ.get("OUTRIDER_PURE_PYTHON"):
    _Capture = None
# the hot path indexes the header by literal position, for speed
assert (ROWS_HEAD, ROWS_TAIL, CALLS_HEAD, CALLS_TAIL, DROPPED) == (0, 1, 2, 3, 4)

Summarizer = Literal["auto", "thread", "process"]


class MonitoredSession:
    """Same constructor, ``run``, ``get_inputs``, ``get_outputs`` and
    ``get_modelmeta`` as ``onnxruntime.InferenceSession``, plus keyword-only
    monitoring options:

    model_name / model_version: identify the model in summaries (defaults: the
        file stem or graph name, and the first 12 hex digits of its sha256).
    feature_names: names of the columns of a 2-D input: a list (one input) or
        ``{input_name: [names]}``; otherwise the model's ``feature_names``
        metadata, otherwise ``<input>[i]``. Give the names of the reference
        profile (its ``feature_names``), so that drift compares like with like.
        Names that cannot apply (an unknown input, a count other than the
        input's width) raise ``agent.errors.InvalidArgument`` here.
    sink: receives each closed ``WindowSummary`` (default: an InMemorySink,
        available as ``.sink``).
    window_seconds / window_rows: tumbling windows close after this long and/or
        this many rows.
    ring_rows / ring_bytes: the ring's capacity; rows beyond it are dropped and
        counted, never queued.
    collector: HOST:PORT of the collector; windows then go to a
        ``CollectorExporter`` (instead of ``sink``) through an on-disk spool at
        ``spool_dir`` (default ``./outrider-spool/<agent_id>-<model_name>``),
        with ``collector_token`` as bearer token and ``collector_tls`` (an
        ``agent.exporter.TLSConfig``, or None for plaintext).
    summarizer: "process" (a helper process reading the ring from shared
        memory, so summarising never holds this process's GIL), "thread" (a
        daemon thread: no extra process, but its GIL use slows the serving
        threads) or "auto", the default (process on x86-64, where that ring is
        safe; thread elsewhere).
    run_id: the run this session's windows belong to (default: a new one); an
        agent that swaps model versions keeps one run across its sessions.
    sample_rows: keep a uniform sample of at most this many rows of each window
        (every input and output column) in its ``sample``, for retraining data
        (``outrider data export``); 0, the default, keeps none.
    join_seconds: how long a prediction made with ``run(..., request_id=...)``
        waits for its ground truth (``feedback``); labels joined are counted in
        the ``performance`` of the window that closes next.
    feedback_limits: what those predictions and their labels may cost (an
        ``agent.feedback.FeedbackLimits``: count and byte budgets, longest
        request id, classes per model); what goes past a bound is counted in
        ``predictions.stats()``.
    monitoring: False serves the model as plain onnxruntime, summarising
        nothing (no ring, no worker, no window, no feedback): the baseline of
        an A/B measurement of what monitoring costs (``agent serve --no-monitoring``).
    reference: the model version's reference profile (a ``ReferenceProfile``
        or its file from ``outrider profile``): with its PCA projection every
        window gets the column ``@reconstruction_error`` (multivariate drift).
        Its columns must be this session's feature names (InvalidArgument
        otherwise). ``set_reference`` changes it later; with ``collector``,
        the collector sends the one attached to this model version.
    """

    def __init__(self, path_or_bytes: str | os.PathLike | bytes, sess_options: Any = None,
                 providers: Sequence[Any] | None = None, provider_options: Sequence[dict] | None = None,
                 *, model_name: str | None = None, model_version: str | None = None,
                 feature_names: Sequence[str] | dict[str, Sequence[str]] | None = None,
                 sink: WindowSink | None = None, window_seconds: float | None = 10.0,
                 window_rows: int | None = None, ring_rows: int = 1 << 16,
                 ring_bytes: int = 64 << 20, summarizer: Summarizer = "auto",
                 agent_id: str | None = None, collector: str | None = None,
                 spool_dir: str | os.PathLike | None = None, collector_token: str | None = None,
                 collector_tls: Any = None, join_seconds: float = 3600.0, run_id: str | None = None,
                 sample_rows: int = 0, feedback_limits: FeedbackLimits | None = None,
                 reference: Reference = None, monitoring: bool = True, **kwargs: Any) -> None:
        if collector and sink is not None:
            raise ValueError("pass either sink or collector, not both")
        if not monitoring and collector:
            raise ValueError("monitoring=False summarises nothing, so there is nothing to send: drop collector")
        self.monitoring = monitoring
        if isinstance(path_or_bytes, (bytes, bytearray)):
            model_bytes = bytes(path_or_bytes)
            default_name = None
        elif isinstance(path_or_bytes, (str, os.PathLike)):
            model_bytes = Path(path_or_bytes).read_bytes()
            default_name = Path(path_or_bytes).stem
        else:  # a model that runs elsewhere (agent.proxy's upstream): its calls come in through ``observe``
            model_bytes, default_name = None, None
        if model_bytes is None:
            self._sess = path_or_bytes
            self.model_sha256 = getattr(path_or_bytes, "model_sha256", "")
        else:
            self._sess = ort.InferenceSession(model_bytes, sess_options, providers, provider_options, **kwargs)
            self.model_sha256 = hashlib.sha256(model_bytes).hexdigest()
        meta = self._sess.get_modelmeta()
        self.model_name = model_name or default_name or meta.graph_name or "model"
        self.model_version = model_version or self.model_sha256[:12] or "1"
        self.sink: WindowSink = sink if sink is not None else InMemorySink()
        self.identity = Identity(agent_id or socket.gethostname(), run_id or uuid.uuid4().hex,
                                 self.model_name, self.model_version, self.model_sha256)
        self._policy = WindowPolicy(window_seconds, window_rows, sample_rows=check_sample_rows(sample_rows))
        if summarizer == "auto":
            summarizer = "process" if shared_memory_is_safe() else "thread"
        if summarizer not in ("thread", "process"):
            raise ValueError(f"summarizer must be 'auto', 'thread' or 'process', not {summarizer!r}")
        self._mode = summarizer
        self._ring_rows, self._ring_bytes = ring_rows, ring_bytes
        self._lock = threading.Lock()
        self._inputs = self._sess.get_inputs()
        # checked before anything starts: wrong names would make every window's columns miss the reference
        self._feature_names = naming.for_inputs(self._inputs, feature_names)
        self._outputs = self._sess.get_outputs()
        self._projection = load_projection(reference)
        self.slots: list[Slot] | None = None  # planned at start (at the first call, for symbolic shapes)
        if self._projection is not None:  # the feature columns are known now unless their shapes are symbolic
            inputs = self._plan_inputs()
            if inputs is not None:
                capture.projection_sources(inputs, self._projection.columns)
        self._output_index = {o.name: i for i, o in enumerate(self._outputs)}
        self._selections: dict[tuple[str, ...], list[int]] = {}
        if not join_seconds > 0:
            raise ValueError(f"join_seconds must be greater than 0, not {join_seconds!r}")
        found = prediction_output(self._outputs)
        self._label_index = found[0] if found else 0
        self.label_kind: Kind | None = found[1] if found else None  # what ``feedback`` expects
        # Filled only by calls that pass a request id; None when no output can be compared with a label.
        self.predictions: PredictionLog | None = (PredictionLog(join_seconds, feedback_limits)
                                                  if found and monitoring else None)
        self._ring: Ring | None = None
        self._capture: Any = None
        self._fast: Any = None  # the C copier, when used
        self._pending_errors = self._pending_dropped = 0
        self._plan_failed = False  # columns named twice: every call's rows are dropped (said once)
        self._closed = False
        self._summarizer: ThreadSummarizer | ProcessSummarizer | None = None
        self.export_failures = 0
        self._final_stats: dict[str, int] = {}
        self._started_ns = time.time_ns()  # the first window starts here, not when its worker does
        self._exporter = None
        if collector:
            from agent.hello import exporter_for

            self.sink = self._exporter = exporter_for(self, collector, spool_dir, collector_token, collector_tls,
                                                      on_command=self._on_command)
        try:
            if not monitoring:
                pass  # served as plain onnxruntime: no ring, no worker, no window
            elif self._all_static():
                # Under the lock: the exporter above may already be taking a reference from the collector
                # (set_reference), which must either reach the summarizer started here or be read by it.
                with self._lock:
                    self._start(self._plan(None, None))
            else:
                self._capture = self._resolve_then_capture
        except BaseException:
            if self._exporter is not None:
                self._exporter.close(0)
            raise

    # --- the InferenceSession surface -------------------------------------------------
    def get_inputs(self) -> list:
        return self._inputs

    def get_outputs(self) -> list:
        return self._outputs

    def get_modelmeta(self) -> Any:
        return self._sess.get_modelmeta()

    @property
    def inference_session(self) -> ort.InferenceSession:
        """The wrapped onnxruntime session: calls on it are not monitored (warm-up, shadow tests)."""
        return self._sess

    def get_providers(self) -> list[str]:
        return self._sess.get_providers()

    def get_session_options(self) -> Any:
        return self._sess.get_session_options()

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any],
            run_options: Any = None, *, request_id: str | None = None) -> list:
        """``InferenceSession.run``; with ``request_id`` the prediction is also kept
        for ``feedback`` (for ``join_seconds``)."""
        t0 = perf_counter_ns()
        try:
            outputs = self._sess.run(None, input_feed, run_options)
        except BaseException:
            self._count(ERRORS, 1)
            raise
        latency = perf_counter_ns() - t0
        cap = self._capture
        if cap is not None:
            try:
                cap(input_feed, outputs, latency)
            except Exception:  # a feed we can't copy: count its rows, never fail the call
                self._count_dropped(input_feed)
        if request_id:  # the only cost to calls without an id is this test
            self._record(request_id, outputs)
        if output_names:
            return self._select(outputs, output_names, input_feed, run_options)
        return outputs

    def observe(self, input_feed: dict[str, Any], outputs: list, latency_ns: int, *,
                request_id: str | None = None) -> None:
        """Capture a call the model made elsewhere (``run`` without running it): ``outputs`` in
        ``get_outputs()`` order, ``latency_ns`` as the caller measured it. For a proxy in front of
        a server that runs the model (agent.proxy); like ``run``, it never raises for monitoring."""
        cap = self._capture
        if cap is not None:
            try:
                cap(input_feed, outputs, latency_ns)
            except Exception:
                self._count_dropped(input_feed)
        if request_id:
            self._record(request_id, outputs)

    def observe_error(self) -> None:
        """Count a call the model, run elsewhere, failed (``run``'s errors)."""
        self._count(ERRORS, 1)

    # --- the reference ----------------------------------------------------------------
    def set_reference(self, reference: Reference) -> None:
        """Use ``reference``'s projection (a ReferenceProfile, its file or a Projection; None: none)
        from the next window on. Raises InvalidArgument, changing nothing, when it reads
        columns this session's model does not have."""
        projection = load_projection(reference)
        with self._lock:
            if projection is not None and self.slots is not None:
                capture.projection_sources(self.slots, projection.columns)
            self._projection = projection
            summarizer = None if self._closed else self._summarizer
        if summarizer is not None:  # outside the lock: the helper's pipe may take a moment
            summarizer.set_projection(projection)

    def _on_command(self, command: Any) -> None:
        """The collector's commands to a session it does not manage: only ``reference`` applies. Runs
        on the exporter's stream loop, so the work goes to a thread of its own."""
        if command.kind != REFERENCE:
            log.warning("collector command %r (%s) ignored: this agent was started with a model file, "
                        "not managed by the collector", command.kind, command.id)
            return
        threading.Thread(target=self._take_reference, args=(command,), name="outrider-reference",
                         daemon=True).start()

    def _take_reference(self, command: Any) -> None:
        try:
            version, projection = from_command(command.args)
            if version != self.model_version:
                log.info("reference of %s version %s not used: this agent serves version %s", self.model_name,
                         version, self.model_version)
                return
            self.set_reference(projection)
            log.info("reference projection of %s version %s %s from the collector", self.model_name, version,
                     "installed" if projection is not None else "removed")
        except InvalidArgument as exc:
            log.error("cannot use the reference the collector sent for %s: %s", self.model_name, exc)

    # --- ground truth -----------------------------------------------------------------
    def feedback(self, request_id: str, value: str | float, row: int = 0) -> bool:
        """The true label (classification) or target (regression) of row ``row`` of the
        request made with ``request_id``. True when joined to that prediction;
        False (counted as unmatched) for an unknown id or row or one older than
        ``join_seconds``. The result is in the next window's ``performance``.

        Raises ValueError when the model has no output a label can be compared
        with, or ``value`` is not a number for a regression model.
        """
        if not self.monitoring:
            raise ValueError(f"model {self.model_name!r} is served without monitoring (--no-monitoring): "
                             "no window would carry the label")
        if self.predictions is None:
            raise ValueError(f"model {self.model_name!r} has no class-label output and no float output "
                             "with one value per row: there is no prediction to compare ground truth with")
        return self.predictions.label(request_id, value, row)

    def _record(self, request_id: str, outputs: list) -> None:
        """Keep a reference to the label output (within the log's budgets); converted only if a label arrives."""
        predictions = self.predictions
        if predictions is not None:
            try:
                predictions.record(request_id, outputs[self._label_index])
            except Exception:  # monitoring never fails the call
                log.exception("could not keep the prediction of request %r for feedback", request_id)

    # --- capture ----------------------------------------------------------------------
    def _make_capture(self, ring: Ring, slots: list[Slot]) -> Any:
        """The hot-path function: the C copier where it applies, else a Python closure."""
        if _Capture is not None and all(s.dtype.kind != "U" and s.reduce is not Reduce.ZIPMAP for s in slots) \
                and any(not s.is_output for s in slots):
            offsets, lat_offset, _ = ring.layout._offsets()
            specs = [(off, s.row_bytes, s.dtype.itemsize, s.dtype.char,
                      self._output_index[s.tensor] if s.is_output else s.tensor)
                     for s, off in zip(slots, offsets)]
            first = next(s.tensor for s in slots if not s.is_output)
            self._fast = _Capture(ring.buffer, lat_offset, ring.layout.rows, ring.layout.calls, first, specs)
            return self._fast.capture
        return self._python_capture(ring, slots)

    def _python_capture(self, ring: Ring, slots: list[Slot]) -> Any:
        """The hot-path closure: locals only, one lock, one copy per tensor."""
        lock_acquire, lock_release = self._lock.acquire, self._lock.release
        hdr, lat = ring.hdr, ring.lat
        rows, calls = ring.layout.rows, ring.layout.calls
        rmask, cmask = rows - 1, calls - 1
        inputs = [(s.tensor, a) for s, a in zip(slots, ring.arrays) if not s.is_output]
        plain = [(self._output_index[s.tensor], a) for s, a in zip(slots, ring.arrays)
                 if s.is_output and s.reduce is not Reduce.ZIPMAP]
        zipmaps = [(self._output_index[s.tensor], a) for s, a in zip(slots, ring.arrays)
                   if s.reduce is Reduce.ZIPMAP]
        first = inputs[0][0] if inputs else None
        zipmap_to_array = capture.zipmap_to_array
        wrapped = self._copy_wrapped

        def capture_call(feed: dict, outs: list, latency: int) -> None:
            n = len(feed[first]) if first is not None else len(outs[plain[0][0]])
            converted = [(a, zipmap_to_array(outs[k])) for k, a in zipmaps] if zipmaps else ()
            lock_acquire()
            try:
                head = hdr[0]
                ncall = hdr[2]
                if head + n - hdr[1] > rows or ncall - hdr[3] >= calls:
                    hdr[4] += n  # DROPPED: the ring is full, the worker is behind
                    return
                i = head & rmask
                if i + n <= rows:
                    sl = slice(i, i + n)
                    for name, arr in inputs:
                        arr[sl] = feed[name]
                    for k, arr in plain:
                        arr[sl] = outs[k]
                    for arr, value in converted:
                        arr[sl] = value
                else:
                    wrapped(i, n, [(a, feed[name]) for name, a in inputs]
                            + [(a, outs[k]) for k, a in plain] + list(converted))
                lat[ncall & cmask] = latency
                hdr[2] = ncall + 1   # publish last: the worker reads only published rows
                hdr[0] = head + n
            finally:
                lock_release()

        return capture_call

    def _copy_wrapped(self, i: int, n: int, pairs: list[tuple[np.ndarray, Any]]) -> None:
        """Rows that straddle the ring's end: two copies (rare, off the fast path)."""
        rows = self._ring.layout.rows  # type: ignore[union-attr]
        first = rows - i
        for arr, value in pairs:
            value = np.asarray(value)
            arr[i:] = value[:first]
            arr[:n - first] = value[first:]

    def _count(self, field: int, amount: int) -> None:
        if self._fast is not None:
            self._fast.count(field, amount)  # atomic with the C copier (both hold the GIL)
            return
        with self._lock:
            if self._ring is not None:
                self._ring.hdr[field] += amount
            elif field == ERRORS:
                self._pending_errors += amount
            else:
                self._pending_dropped += amount

    def _count_dropped(self, feed: dict) -> None:
        try:
            n = len(next(iter(feed.values())))
        except Exception:
            n = 1
        self._count(DROPPED, n)

    def _select(self, outputs: list, names: Sequence[str], feed: dict, run_options: Any) -> list:
        key = tuple(names)
        idx = self._selections.get(key)
        if idx is None:
            if any(n not in self._output_index for n in key):
                return self._sess.run(list(names), feed, run_options)  # onnxruntime's own error
            idx = self._selections[key] = [self._output_index[n] for n in key]
        return [outputs[i] for i in idx]

    # --- planning and the worker ------------------------------------------------------
    def _all_static(self) -> bool:
        for arg in (*self._inputs, *self._outputs):
            if arg.type.startswith("seq(map("):
                return False
            dims = list(arg.shape or [])[1:]
            if arg.type.startswith("tensor(") and not all(isinstance(d, int) for d in dims):
                return False
        return True

    def _names(self) -> dict[str, list[str] | None]:
        custom = self._sess.get_modelmeta().custom_metadata_map
        return {arg.name: capture.feature_names_for(self._feature_names, custom, arg.name, len(self._inputs))
                for arg in self._inputs}

    def _plan(self, feed: dict | None, outputs: list | None) -> list[Slot]:
        slots = capture.plan_slots(self._inputs, self._outputs, self._names(), feed, outputs)
        for slot in slots:  # an open width seen only now: the names given did not fit it
            given = self._feature_names.get(slot.tensor)
            if given is not None and not slot.is_output and slot.columns != given:
                log.warning("%d feature names were given for input %r of %s, which has %d columns: its columns "
                            "are named %s... instead", len(given), slot.tensor, self.model_name, len(slot.columns),
                            slot.columns[0])
        repeated = capture.repeated_columns(slots)
        if repeated:
            raise InvalidArgument(f"the column names {naming.few(repeated)} would be used twice (a feature named like "
                                  "another column, an output's perhaps): give the features other names")
        return slots

    def _plan_inputs(self) -> list[Slot] | None:
        """The input slots when they can be planned without a call (no symbolic feature dimensions)."""
        for arg in self._inputs:
            dims = list(arg.shape or [])[1:]
            if not all(isinstance(d, int) for d in dims):
                return None
        return capture.plan_slots(self._inputs, [], self._names())

    def _resolve_then_capture(self, feed: dict, outputs: list, latency: int) -> None:
        """First call of a model with symbolic dimensions: size the ring from real values."""
        with self._lock:
            if self._ring is None and not self._closed:
                if not all(len(v) for v in feed.values()):
                    return  # an empty batch tells us nothing about the shapes yet
                try:
                    self._start(self._plan(feed, outputs))
                except InvalidArgument as exc:  # on a request thread: said once, the rows counted as dropped
                    if not self._plan_failed:
                        log.error("model %s cannot be monitored: %s", self.model_name, exc)
                    self._plan_failed = True
                    raise
        if self._capture is not self._resolve_then_capture and self._capture is not None:
            self._capture(feed, outputs, latency)

    def _start(self, slots: list[Slot]) -> None:
        layout = RingLayout.fit(slots, self._ring_rows, self._ring_bytes)
        self.slots = slots
        args = (self.identity, self._policy, self._export, self._started_ns)
        projection = self._projection
        if projection is not None:
            try:
                capture.projection_sources(slots, projection.columns)
            except InvalidArgument as exc:  # planned at a request (symbolic shapes): log it, never raise there
                log.error("%s; windows of %s have no %s", exc, self.model_name, "@reconstruction_error")
                projection = self._projection = None
        if self._mode == "process":
            ring = Ring.shared(layout)
            self._summarizer = ProcessSummarizer(ring, *args, projection=projection)
        else:
            ring = Ring(layout)
            self._summarizer = ThreadSummarizer(ring, *args, projection=projection)
        ring.hdr[ERRORS] += self._pending_errors
        ring.hdr[DROPPED] += self._pending_dropped
        self._ring = ring
        self._capture = self._make_capture(ring, slots) if slots else None

    def _export(self, window: summary_pb2.WindowSummary) -> None:
        """Runs on the thread that receives closed windows, never on a request thread."""
        predictions = self.predictions
        if predictions is not None:
            try:
                performance = predictions.take_performance()
                if performance.labeled or performance.unmatched:  # absent, not zero, when no labels came
                    window.performance.CopyFrom(performance)
            except Exception:
                log.exception("could not add performance to window %s/%s", window.run_id, window.seq)
        try:
            self.sink.export(window)
        except Exception:
            self.export_failures += 1
            log.exception("window sink failed; window %s/%s dropped", window.run_id, window.seq)

    # --- lifecycle --------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counters since start: rows captured / summarised / dropped, calls, errors. ``skipped_rows``:
        of the dropped rows, those the summary worker failed on (the rest were never copied: the
        ring was full, or a feed could not be copied)."""
        ring = self._ring
        if ring is None:
            return {"rows_captured": 0, "rows_summarised": 0, "calls": 0,
                    "dropped_rows": self._pending_dropped, "skipped_rows": 0, "errors": self._pending_errors}
        if ring.header is None:  # released at close: the counters as they were then
            return dict(self._final_stats)
        h = ring.hdr
        return {"rows_captured": h[ROWS_HEAD], "rows_summarised": h[ROWS_TAIL] - h[SKIPPED],
                "calls": h[CALLS_HEAD], "dropped_rows": h[DROPPED] + h[SKIPPED], "skipped_rows": h[SKIPPED],
                "errors": h[ERRORS]}

    def close(self, timeout: float = 10.0, *, flush_always: bool = False) -> None:
        """Stop capturing, flush the last partial window to the sink, stop the worker;
        then give the collector exporter (if any) ``timeout`` to deliver what it holds.
        ``flush_always``: send that last window even if it has no rows (the sink has more to attach)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._capture = None
            ring = self._ring
        labels_waiting = flush_always or (self.predictions is not None and any(self.predictions.pending()))
        if ring is not None:
            # labels joined since the last window travel in one more, even if it has no rows
            self._summarizer.close(timeout, flush_always=labels_waiting)
            self._final_stats = self.stats()
            self._fast = None  # holds a view of the ring's buffer: must go before the buffer
            ring.release(unlink=True)
        if self.predictions is not None and any(self.predictions.pending()):
            labeled, unmatched = self.predictions.pending()  # no ring: no window to carry them
            log.warning("%d labels (%d unmatched) arrived after the last window of %s and are not "
                        "reported", labeled + unmatched, unmatched, self.model_name)
        if self._exporter is not None:
            self._exporter.close(timeout)

    def __enter__(self) -> "MonitoredSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MonitoredSession({self.model_name!r}, version={self.model_version!r}, summarizer={self._mode!r})"
