"""Label-free accuracy (CBPE): the calibration fitted at profile time, the estimate the collector
reads from the traffic's ``@confidence`` sketch, its alert kind, and where operators see it.

Scenarios as NannyML describes CBPE's: a model trained on data, a labelled held-out reference,
traffic from a shifted covariate distribution whose labels follow the same conditional. The
agent, the collector, the CLI and the metrics endpoint are the real ones.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import MonitoredSession, sketches
from agent.errors import InvalidArgument
from agent.profile import build_profile
from agent.sinks import InMemorySink
from agent.sketches import joint
from collector.api.metrics import CollectorMetrics
from collector.api.server import serve_collector
from collector.base.ingest import validate_profile
from collector.monitoring import estimate
from collector.monitoring.drift import DriftConfig
from collector.store.rollup import merge_windows
from collector.web.model_plots import performance_plot
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from protos import summary_pb2

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 60
D = 20


def draw(n: int, rng: np.random.Generator, mean: dict[int, float] | None = None,
         scale: dict[int, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features N(mean, scale) per column (default 0, 1); the label depends on the first three
    through the same rule whatever their distribution (covariate shift only)."""
    x = rng.standard_normal((n, D))
    for j, s in (scale or {}).items():
        x[:, j] *= s
    for j, m in (mean or {}).items():
        x[:, j] += m
    y = (x[:, 0] + 0.5 * x[:, 1] - 0.25 * x[:, 2] + 0.3 * rng.standard_normal(n) > 0).astype(np.int64)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x, y = draw(5000, np.random.default_rng(0))
    fitted = LogisticRegression(max_iter=500).fit(x, y)
    path = tmp_path_factory.mktemp("cbpe") / "lr.onnx"
    path.write_bytes(to_onnx(fitted, x[:1], options={id(fitted): {"zipmap": False}},
                             target_opset=17).SerializeToString())
    return path


@pytest.fixture(scope="module")
def profile(model: Path) -> summary_pb2.ReferenceProfile:
    """Held-out labelled reference data: 20,000 rows the model did not train on."""
    x, y = draw(20_000, np.random.default_rng(1))
    np.savez(model.parent / "ref.npz", X=x, label=y)
    return build_profile(model, model.parent / "ref.npz", label_column="label")


# ------------------------------------------------------------------ the map


def test_the_calibration_is_a_monotone_map_into_0_1_with_bounded_points() -> None:
    rng = np.random.default_rng(2)
    conf = rng.uniform(0.5, 1.0, 100_000)
    correct = rng.random(100_000) < conf  # calibrated: P(correct | c) = c
    calibration, note = joint.fit_calibration(conf, correct)
    assert note == "" and calibration is not None
    joint.check_calibration(summary_pb2.Calibration(confidence=calibration.confidence, correct=calibration.correct,
                                                    reference_accuracy=0.5, reference_estimated_accuracy=0.5))
    xs, ys = np.array(calibration.confidence), np.array(calibration.correct)
    assert 2 <= len(xs) <= joint.MAX_CALIBRATION_POINTS and (np.diff(xs) > 0).all() and (np.diff(ys) >= 0).all()
    assert calibration.reference_accuracy == pytest.approx(correct.mean())
    grid = np.linspace(0.55, 0.95, 9)
    np.testing.assert_allclose(joint.calibrate(calibration, grid), grid, atol=0.03)
    assert joint.calibrate(calibration, np.array([2.0, -1.0])).tolist() == [ys[-1], ys[0]]  # flat beyond


def test_tied_confidences_are_one_point_and_too_few_labels_give_none() -> None:
    conf = np.repeat([0.6, 0.8, 0.9], 100)
    correct = np.r_[np.arange(100) < 70, np.arange(100) < 60, np.arange(100) < 95]  # 0.8 is worse than 0.6
    calibration, _ = joint.fit_calibration(conf, correct)
    assert calibration.confidence == pytest.approx([0.7, 0.9]) and calibration.correct == pytest.approx([0.65, 0.95])
    none, note = joint.fit_calibration(np.full(50, 0.9), np.ones(50, bool))
    assert none is None and "50 labelled rows" in note
    nan_only, _ = joint.fit_calibration(np.full(500, np.nan), np.ones(500, bool))
    assert nan_only is None


def test_the_expected_accuracy_from_a_sketch_is_the_maps_mean_over_its_values() -> None:
    rng = np.random.default_rng(3)
    calibration, _ = joint.fit_calibration(rng.uniform(0.5, 1, 20_000), rng.random(20_000) < 0.8)
    values = rng.beta(8, 2, 200_000) * 0.5 + 0.5
    sketch = sketches.NumericSketch()
    sketch.update(np.r_[values, [np.nan] * 100])  # missing confidences do not count
    exact = joint.calibrate(calibration, values).mean()
    assert joint.expected_accuracy(sketch, calibration) == pytest.approx(exact, abs=0.005)
    assert np.isnan(joint.expected_accuracy(sketches.NumericSketch(), calibration))


@pytest.mark.parametrize("change, words", [
    (lambda c: c.correct.__setitem__(len(c.correct) - 1, 0.0), "must not decrease"),
    (lambda c: c.correct.__setitem__(-1, 1.5), r"lie in \[0, 1\]"),
    (lambda c: c.confidence.__setitem__(1, c.confidence[0]), "strictly increasing"),
    (lambda c: c.confidence.append(1.0), "P\\(correct\\) values"),
    (lambda c: c.confidence.__setitem__(0, float("nan")), "finite"),
    (lambda c: setattr(c, "reference_accuracy", -0.1), "reference_accuracy"),
    (lambda c: c.ClearField("confidence") or c.ClearField("correct"), "0 points"),
])
def test_an_inconsistent_calibration_is_refused_by_the_collector(profile, change, words) -> None:
    broken = summary_pb2.ReferenceProfile()
    broken.CopyFrom(profile)
    change(broken.calibration)
    with pytest.raises(InvalidArgument, match=words):
        validate_profile(broken)
    no_column = summary_pb2.ReferenceProfile()
    no_column.CopyFrom(profile)
    del no_column.columns[[c.name for c in no_column.columns].index(joint.CONFIDENCE)]
    with pytest.raises(InvalidArgument, match="no numeric '@confidence' column"):
        validate_profile(no_column)
    validate_profile(profile)


# ------------------------------------------------------------------ the estimate against realised accuracy


def traffic(model: Path, x: np.ndarray, **kw) -> tuple[summary_pb2.WindowSummary, np.ndarray]:
    """The agent's windows of ``x`` merged as the collector merges a span, and the predicted labels."""
    sink = InMemorySink()
    with MonitoredSession(str(model), sink=sink, summarizer="thread", window_seconds=None, window_rows=1000,
                          **kw) as session:
        labels = [session.run(None, {"X": x[i:i + 500]})[0] for i in range(0, len(x), 500)]
    return merge_windows(sink.windows), np.concatenate(labels)


SHIFTS = {  # covariate shifts: the features' distribution moves, P(label | features) does not
    "none": {},
    "x0 + 1 (away from the boundary)": {"mean": {0: 1.0}},
    "x0, x1 x 0.5 (towards it)": {"scale": {0: 0.5, 1: 0.5}},
    "x0 x 2": {"scale": {0: 2.0}},
    "x1 - 1.5": {"mean": {1: -1.5}},
    "x0 + 0.5, x2 + 1": {"mean": {0: 0.5, 2: 1.0}},
    "x5 + 2 (a feature the label ignores)": {"mean": {5: 2.0}},
}


@pytest.mark.parametrize("shift", SHIFTS)
def test_the_estimate_is_within_0_03_of_realised_accuracy_under_covariate_shift(model, profile, shift) -> None:
    x, y = draw(20_000, np.random.default_rng(hash(shift) % 2**32), **SHIFTS[shift])
    current, predicted = traffic(model, x)
    realised = float((predicted == y).mean())
    estimated, reference, column = estimate.estimated_performance(current, profile, DriftConfig())
    assert abs(estimated - realised) <= 0.03, (shift, estimated, realised)
    assert reference == profile.calibration.reference_estimated_accuracy
    assert abs(reference - profile.calibration.reference_accuracy) <= 0.01  # like for like on the reference
    assert column.drifted == (reference - estimated >= DriftConfig().accuracy_drop)
    assert column.p_adjusted == 0.0 and column.rows == 20_000


def test_no_estimate_without_calibration_or_with_too_few_rows(model, profile) -> None:
    current, _ = traffic(model, draw(600, np.random.default_rng(4))[0])
    estimated, reference, column = estimate.estimated_performance(current, profile, DriftConfig())
    assert np.isfinite(estimated) and np.isnan(column.p_adjusted) and "600 predictions" in column.reason
    unlabelled = summary_pb2.ReferenceProfile()
    unlabelled.CopyFrom(profile)
    unlabelled.ClearField("calibration")
    got = estimate.estimated_performance(current, unlabelled, DriftConfig())
    assert np.isnan(got[0]) and np.isnan(got[1]) and got[2] is None


def test_profile_cli_says_what_the_calibration_holds(model, tmp_path) -> None:
    x, y = draw(2000, np.random.default_rng(5))
    np.savez(tmp_path / "ref.npz", X=x, label=y)
    result = run_cli("profile", "--model", str(model), "--data", str(tmp_path / "ref.npz"), "--label", "label",
                     "--out", str(tmp_path / "p.pb"), "--json")
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["calibration"]["points"] >= 2 and described["projection"]["columns"] == D
    assert described["calibration"]["reference_accuracy"] == pytest.approx(described["accuracy"])
    assert described["notes"] == []
    text = run_cli("profile", "--model", str(model), "--data", str(tmp_path / "ref.npz"), "--label", "label",
                   "--out", str(tmp_path / "p.pb")).stdout
    assert "label-free accuracy: confidence calibrated on 2000 labels" in text and "multivariate drift" in text
    np.savez(tmp_path / "unlabelled.npz", X=x)
    unlabelled = run_cli("profile", "--model", str(model), "--data", str(tmp_path / "unlabelled.npz"),
                         "--out", str(tmp_path / "q.pb"), "--json")
    assert json.loads(unlabelled.stdout)["calibration"] is None


# ------------------------------------------------------------------ the collector: alert kind, CLI, metrics, web


def run_cli(*args: str, collector: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8")
    if collector:
        env["OUTRIDER_COLLECTOR"] = collector
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD * 2)


def scrape(url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(url, timeout=30) as reply:
        text = reply.read().decode()
    return {(s.labels["kind"], s.labels["version"]): s.value for family in text_string_to_metric_families(text)
            if family.name == "outrider_collector_accuracy" for s in family.samples}


@pytest.mark.slow
def test_a_drop_in_estimated_accuracy_opens_an_alert_and_is_shown_beside_realised(model, profile, tmp_path,
                                                                                  db_url) -> None:
    metrics = CollectorMetrics()
    server = serve_collector(db_url, "127.0.0.1:0", drift_interval=0, rollup_interval=3600,
                             metrics=metrics)
    url = metrics.start_http("127.0.0.1:0").url
    try:
        with grpc.insecure_channel(server.address) as channel:
            ops = pb_grpc.OpsServiceStub(channel)
            ops.AttachProfile(pb.AttachProfileRequest(model_name="cbpe", model_version="1", profile=profile),
                              timeout=HANG_GUARD)
            ops.SetDriftConfig(pb.DriftConfigRequest(model_name="cbpe", config_json='{"consecutive": 2}'),
                               timeout=HANG_GUARD)
        # towards the decision boundary: the model is right less often, and its confidence says so
        x, y = draw(6000, np.random.default_rng(6), scale={0: 0.5, 1: 0.5})
        session = MonitoredSession(str(model), model_name="cbpe", model_version="1", agent_id="edge",
                                   collector=server.address, spool_dir=tmp_path / "spool", summarizer="thread",
                                   window_rows=1000, window_seconds=None)
        try:
            predicted = []
            for i in range(0, len(x), 200):
                predicted.append(session.run(None, {"X": x[i:i + 200]}, request_id=f"r{i}")[0])
                for j in range(200):
                    session.feedback(f"r{i}", str(y[i + j]), row=j)
        finally:
            session.close(HANG_GUARD)
        realised = float((np.concatenate(predicted) == y).mean())
        drift = run_cli("drift", "cbpe", "--now", collector=server.address)
        assert drift.returncode == 0, drift.stderr
        line = next(ln for ln in drift.stdout.splitlines() if ln.startswith("estimated accuracy"))
        assert f"realised {realised:.3g}" in line, drift.stdout
        assert "estimated_performance" in drift.stdout and "DRIFT" in drift.stdout
        evaluation = json.loads(run_cli("drift", "cbpe", "--now", "--json", collector=server.address).stdout)
        latest = evaluation["latest"][0]
        assert abs(latest["estimated_accuracy"] - realised) <= 0.03
        assert latest["reference_estimated_accuracy"] == pytest.approx(profile.calibration.reference_estimated_accuracy)
        alerts = json.loads(run_cli("alerts", "--json", collector=server.address).stdout)["alerts"]
        kinds = {a["kind"]: a["column"] for a in alerts}
        assert kinds["estimated_performance"] == "estimated_performance" and kinds["performance"] == "performance"
        gauges = scrape(url)
        assert gauges[("estimated", "1")] == pytest.approx(latest["estimated_accuracy"])
        assert gauges[("realised", "1")] == pytest.approx(realised)
        assert ("reference_estimated", "1") in gauges and ("reference", "1") in gauges
        history = [pb.DriftEvaluation.FromString(e) for e in [r[0] for r in server.store.read().execute(
            "SELECT body FROM evaluations WHERE model_name = 'cbpe' ORDER BY id")]]
        page = str(performance_plot(history, [], DriftConfig()))
        assert "estimated (no labels)" in page and "realised accuracy" in page
    finally:
        metrics.close()
        server.stop(grace=0)


def test_the_web_plot_shows_the_estimate_before_any_label() -> None:
    evaluation = pb.DriftEvaluation(evaluated=True, evaluated_unix_nano=time.time_ns(), accuracy=float("nan"),
                                    reference_accuracy=float("nan"), mae=float("nan"), reference_mae=float("nan"),
                                    estimated_accuracy=0.81, reference_estimated_accuracy=0.9)
    evaluation.columns.add(name=estimate.ESTIMATED_PERFORMANCE, drifted=True, p_adjusted=0.0)
    page = str(performance_plot([evaluation], [], DriftConfig()))
    assert "estimated (no labels)" in page and "0.81" in page
    old = pb.DriftEvaluation(evaluated=True, evaluated_unix_nano=time.time_ns(), accuracy=float("nan"),
                             mae=float("nan"))  # stored before the estimate existed: its 0.0 means "none"
    assert "estimated" not in str(performance_plot([old], [], DriftConfig()))
