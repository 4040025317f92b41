"""Shadow versions (agent/shadow.py) on a managed agent, against the fake collector of test_rollout_agent."""
from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest

from agent import examples
from agent.shadow import ShadowRunner
from agent.sketches import NumericSketch
from test_exporter import wait_until
from test_rollout_agent import agent, collector, models, serve_args, serve_v1  # noqa: F401  (fixtures)


def shadow_on(collector, version: int, model: bytes, share: str = "1.0"):
    collector.files[version] = model
    state = collector.state(collector.command("shadow", share=share, **serve_args(version, model)))
    assert state.ok, state.error
    return state


def traffic(agent, requests: int, rows: int = 5) -> int:
    for i in range(requests):
        assert agent.infer(rows, seed=100 + i).model_version == "1"
    return requests * rows


def shadow_of(windows) -> dict:
    """The windows' shadow summaries added up (counts) and merged (sketches), as the collector would."""
    total = {"calls": 0, "rows": 0, "skipped": 0, "errors": 0, "label_rows": 0, "label_agree": 0}
    diff, latency = NumericSketch(), NumericSketch()
    versions = set()
    for w in windows:
        if w.HasField("shadow"):
            versions.add(w.shadow.model_version)
            for key in total:
                total[key] += getattr(w.shadow, key)
            diff.merge(NumericSketch.from_proto(w.shadow.score_diff))
            latency.merge(NumericSketch.from_proto(w.shadow.latency))
    return {**total, "versions": versions, "diff": diff, "latency": latency}


def test_an_identical_shadow_agrees_on_every_row(collector, agent, models):
    serve_v1(collector, models)
    state = shadow_on(collector, 2, models["v1"])
    assert (state.shadow_version, state.shadow_share, state.model_version) == ("2", 1.0, "1")
    assert agent.ctrl.exporter.hello().model_state.shadow_version == "2"
    rows = traffic(agent, 40)
    assert agent.ctrl.switch.shadow.flush(30)
    agent.stop()  # the last window carries what the shadow did since the one before
    got = shadow_of(collector.windows_received())
    assert got["versions"] == {"2"}
    assert (got["calls"], got["rows"], got["skipped"], got["errors"]) == (40, rows, 0, 0)
    assert got["label_rows"] == got["label_agree"] == rows
    assert got["diff"].count == rows and abs(got["diff"].min) < 1e-6 and abs(got["diff"].max) < 1e-6
    assert got["latency"].count == 40 and got["latency"].min > 0


def test_a_different_shadow_disagrees_sometimes(collector, agent, models):
    serve_v1(collector, models)
    shadow_on(collector, 2, models["v2"])
    rows = traffic(agent, 40, rows=10)
    assert agent.ctrl.switch.shadow.flush(30)
    agent.stop()
    got = shadow_of(collector.windows_received())
    assert got["label_rows"] == rows and 0 < got["label_agree"] < rows
    assert got["diff"].count == rows and got["diff"].std > 0.01


class Stalled:
    """A shadow session that blocks in run() until released."""

    def __init__(self, session) -> None:
        self.session, self.release, self.entered = session, threading.Event(), threading.Event()

    def run(self, names, feed):
        self.entered.set()
        self.release.wait(60)
        return self.session.run(names, feed)

    def get_outputs(self):
        return self.session.get_outputs()


def test_a_stalled_shadow_skips_requests_and_production_keeps_answering(collector, tmp_path, models):
    from test_rollout_agent import start_agent

    running = start_agent(collector.target, tmp_path / "spool", shadow_queue=1)
    try:
        serve_v1(collector, models)
        shadow_on(collector, 2, models["v2"])
        runner = running.ctrl.switch.shadow
        stalled = Stalled(runner.session)
        runner.session = stalled
        traffic(running, 1)
        assert stalled.entered.wait(30)  # the shadow thread is stuck in that first call
        traffic(running, 20)             # one waits in the queue, the rest are skipped; all answered
        stalled.release.set()
        assert runner.flush(30)
    finally:
        running.stop()
    got = shadow_of(collector.windows_received())  # windows closed meanwhile took their share
    assert (got["calls"], got["skipped"]) == (2, 19)


def test_unshadow_stops_it_and_its_last_counts_still_go_out(collector, agent, models):
    serve_v1(collector, models)
    shadow_on(collector, 2, models["v1"])
    runner = agent.ctrl.switch.shadow
    traffic(agent, 3)
    assert runner.flush(30)
    state = collector.state(collector.command("unshadow"))
    assert state.ok and state.shadow_version == "" and state.shadow_share == 0
    assert agent.ctrl.switch.shadow is None and not runner.alive
    traffic(agent, 5)
    assert runner.take() is None  # saw none of the later requests
    agent.stop()
    got = shadow_of(collector.windows_received())
    assert got["calls"] == 3 and got["versions"] == {"2"}


def test_a_shadow_that_fails_to_load_changes_nothing(collector, agent, models):
    serve_v1(collector, models)
    collector.files[3] = models["narrow"]
    args = serve_args(3, models["narrow"], schema_from=models["v1"])
    state = collector.state(collector.command("shadow", share="0.5", **args))
    assert not state.ok and "does not match its registry schema" in state.error
    assert state.shadow_version == "" and agent.ctrl.switch.shadow is None
    bad = collector.state(collector.command("shadow", share="2", **serve_args(1, models["v1"])))
    assert not bad.ok and "share" in bad.error


def test_share_changes_in_place_for_the_same_version(collector, agent, models):
    serve_v1(collector, models)
    shadow_on(collector, 2, models["v1"])
    runner = agent.ctrl.switch.shadow
    state = shadow_on(collector, 2, models["v1"], share="0.25")
    assert state.shadow_share == 0.25 and agent.ctrl.switch.shadow is runner and runner.share == 0.25


# --- the runner alone ----------------------------------------------------------------

def test_a_regressor_shadow_compares_predictions_and_has_no_labels():
    model = examples.linear_regression()
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    runner = ShadowRunner(sess, "7", share=1.0)
    x = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    names = [o.name for o in sess.get_outputs()]
    production = [out + 0.5 for out in sess.run(None, {"X": x})]  # production predicts 0.5 more
    runner.offer({"X": x}, names, production)
    assert runner.flush(30)
    summary = runner.take()
    runner.stop()
    assert (summary.calls, summary.rows, summary.label_rows, summary.label_agree) == (1, 6, 0, 0)
    diff = NumericSketch.from_proto(summary.score_diff)
    assert diff.count == 6 and diff.mean == pytest.approx(-0.5, abs=1e-5)
    assert runner.take() is None  # taken and reset


def test_shadow_errors_are_counted_and_never_raised():
    class Broken:
        def run(self, names, feed):
            raise RuntimeError("boom")

        def get_outputs(self):
            return []

    runner = ShadowRunner(Broken(), "9")
    runner.offer({"X": np.zeros((2, 3), np.float32)}, [], [])
    assert runner.flush(30)
    summary = runner.take()
    runner.stop()
    assert (summary.calls, summary.errors) == (0, 1)
    wait_until(lambda: not runner.alive, what="the shadow thread to stop")
