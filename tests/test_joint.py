"""Multivariate drift: the reference's PCA projection, the agent's ``@reconstruction_error`` column,
and how agents get the projection (library, CLI, collector pushes to static and managed agents).

Everything is the real path: profiles from ``build_profile`` on files, ``MonitoredSession`` in
thread and helper-process modes, ``collector.monitoring.drift.evaluate`` on what the agent sent, a real
collector on loopback, the CLI as a subprocess.
"""
from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from agent import MonitoredSession, examples, sketches
from agent.errors import InvalidArgument
from agent.profile import build_profile
from agent.reference import command_args, from_command, load_projection
from agent.sinks import InMemorySink
from agent.sketches import joint
from collector.base.ingest import validate_profile
from collector.monitoring import drift
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc, summary_pb2

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 60
D = 20
PAIR = (10, 11)  # the correlated features: the example model barely weighs them, so predictions stay put
RHO = 0.9


def rows(n: int, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Standard-normal features, the pair correlated ``rho``; every marginal N(0, 1) whatever rho."""
    x = rng.standard_normal((n, D))
    a, b = PAIR
    x[:, b] = rho * x[:, a] + np.sqrt(1 - rho ** 2) * x[:, b]
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("joint") / "lr.onnx"
    path.write_bytes(examples.logistic_regression())
    return path


@pytest.fixture(scope="module")
def profile_file(model: Path) -> Path:
    """A 50,000-row reference with the pair correlated 0.9."""
    data = model.parent / "ref.npz"
    np.savez(data, X=rows(50_000, RHO, np.random.default_rng(1)))
    path = model.parent / "ref.pb"
    path.write_bytes(build_profile(model, data).SerializeToString())
    return path


@pytest.fixture(scope="module")
def profile(profile_file: Path) -> summary_pb2.ReferenceProfile:
    return summary_pb2.ReferenceProfile.FromString(profile_file.read_bytes())


def column(window: summary_pb2.WindowSummary, name: str) -> summary_pb2.ColumnSummary | None:
    return next((c for c in window.columns if c.name == name), None)


# ------------------------------------------------------------------ the math


def test_the_fewest_components_that_keep_the_share_orthonormal_and_round_tripped() -> None:
    x = rows(5000, RHO, np.random.default_rng(2)).astype(np.float64)
    x[:, 3] = x[:, 3] * 40 + 7  # standardised first: scale does not decide the components
    names = [f"c{i}" for i in range(D)]
    projection, note = joint.fit_projection(x, names, share=0.9)
    assert note == "" and projection is not None
    k = len(projection.basis)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    explained = np.cumsum(np.linalg.svd(z, compute_uv=False) ** 2) / (z ** 2).sum()
    assert explained[k - 1] >= 0.9 > explained[k - 2]  # the fewest that keep the share
    assert projection.explained_variance == pytest.approx(explained[k - 1])
    np.testing.assert_allclose(projection.basis @ projection.basis.T, np.eye(k), atol=1e-9)
    np.testing.assert_allclose(projection.scale[3], x[:, 3].std(), rtol=1e-9)
    inside = projection.mean + (np.arange(k) @ projection.basis) * projection.scale  # a point of the subspace
    assert projection.errors(inside[None, :])[0] == pytest.approx(0, abs=1e-9)
    assert projection.errors(projection.mean[None, :])[0] == pytest.approx(0, abs=1e-9)
    again = joint.Projection.from_proto(summary_pb2.Projection.FromString(projection.to_proto().SerializeToString()))
    np.testing.assert_array_equal(again.errors(x[:100]), projection.errors(x[:100]))
    assert again.columns == tuple(names)


def test_no_projection_without_two_varying_columns() -> None:
    one, note = joint.fit_projection(np.ones((100, 1)), ["a"])
    assert one is None and "1 numeric feature column: a projection needs at least 2" in note
    flat, note = joint.fit_projection(np.ones((100, 3)), ["a", "b", "c"])
    assert flat is None and "do not vary" in note
    capped, _ = joint.fit_projection(np.random.default_rng(0).standard_normal((500, 4)), list("abcd"), share=1.0)
    assert capped is not None and len(capped.basis) == 3  # never all d: the error would always be 0


def test_a_missing_value_counts_as_the_reference_mean_and_a_row_without_any_has_no_error() -> None:
    x = rows(2000, RHO, np.random.default_rng(3)).astype(np.float64)
    projection, _ = joint.fit_projection(x, [f"c{i}" for i in range(D)])
    row = x[:1].copy()
    filled = row.copy()
    row[0, 4], filled[0, 4] = np.nan, projection.mean[4]
    row[0, 5], filled[0, 5] = np.inf, projection.mean[5]
    assert projection.errors(row)[0] == pytest.approx(projection.errors(filled)[0], rel=1e-12)
    assert np.isnan(projection.errors(np.full((1, D), np.nan))[0])
    huge = x[:3].copy()
    huge[1, :] = 1e300  # finite, but its square is not: an infinite error (counted apart), not a missing one
    errors = projection.errors(huge)
    assert np.isfinite(errors[[0, 2]]).all() and errors[1] == np.inf


def bad(change) -> summary_pb2.Projection:
    projection, _ = joint.fit_projection(rows(500, RHO, np.random.default_rng(4)), [f"c{i}" for i in range(D)])
    msg = projection.to_proto()
    change(msg)
    return msg


@pytest.mark.parametrize("change, words", [
    (lambda m: m.basis.__setitem__(0, m.basis[0] + 0.5), "orthonormal"),
    (lambda m: m.basis.append(0.0), "basis has"),
    (lambda m: setattr(m, "components", D), "components"),
    (lambda m: m.mean.__setitem__(2, float("nan")), "mean must be finite"),
    (lambda m: m.scale.__setitem__(2, 0.0), "scale must be greater than 0"),
    (lambda m: m.scale.pop(), "scale has 19 values"),
    (lambda m: m.columns.__setitem__(1, "c0"), "distinct"),
    (lambda m: m.columns.__setitem__(1, ""), "empty name"),
    (lambda m: setattr(m, "explained_variance", 1.5), "explained_variance"),
    (lambda m: m.columns.extend(f"x{i}" for i in range(joint.MAX_PROJECTION_COLUMNS)), "columns; from 2"),
])
def test_an_inconsistent_projection_is_refused(change, words) -> None:
    with pytest.raises(InvalidArgument, match=words):
        joint.Projection.from_proto(bad(change))


# ------------------------------------------------------------------ the agent's column and the drift engine


def evaluate(profile: summary_pb2.ReferenceProfile, window: summary_pb2.WindowSummary) -> dict[str, pb.ColumnDrift]:
    reference = {c.name: sketches.from_proto(c) for c in profile.columns}
    roles = {c.name: c.role for c in profile.columns}
    current = {c.name: sketches.from_proto(c) for c in window.columns}
    return {c.name: c for c in drift.evaluate(reference, current, drift.DriftConfig(), roles)}


def windows_of(model: Path, x: np.ndarray, summarizer: str, **kw) -> list[summary_pb2.WindowSummary]:
    sink = InMemorySink()
    with MonitoredSession(str(model), sink=sink, summarizer=summarizer, window_seconds=None, window_rows=1000,
                          **kw) as session:
        for start in range(0, len(x), 250):
            session.run(None, {"X": x[start:start + 250]})
    return [w for w in sink.windows if w.rows]


def median_effect(results: list[dict[str, pb.ColumnDrift]], name: str) -> float:
    return float(np.median([r[name].wasserstein for r in results]))


@pytest.mark.parametrize("summarizer", ["thread", "process"])
def test_a_broken_correlation_is_flagged_on_the_reconstruction_error(model, profile, summarizer) -> None:
    """Marginals unchanged, the pair's correlation 0.9 -> 0: every 1,000-row evaluation flags the
    reconstruction error (20 of 20), and the other columns read as clean ones do. (Their flags are
    not asserted one by one: the drift engine flags some clean column in ~3 % of 1,000-row
    evaluations against this reference, with or without the derived columns, measured.)"""
    windows = windows_of(model, rows(20_000, 0.0, np.random.default_rng(5)), summarizer, reference=profile)
    assert len(windows) == 20
    results = [evaluate(profile, w) for w in windows]
    assert all(r[joint.RECONSTRUCTION_ERROR].drifted for r in results)
    assert min(r[joint.RECONSTRUCTION_ERROR].wasserstein for r in results) > 0.3
    others = [name for name in results[0] if name != joint.RECONSTRUCTION_ERROR]
    assert max(median_effect(results, name) for name in others) < 0.07


def test_clean_traffic_leaves_the_reconstruction_error_alone(model, profile) -> None:
    windows = windows_of(model, rows(20_000, RHO, np.random.default_rng(6)), "thread", reference=profile)
    results = [evaluate(profile, w) for w in windows]
    assert median_effect(results, joint.RECONSTRUCTION_ERROR) < 0.07
    assert sum(r[joint.RECONSTRUCTION_ERROR].drifted for r in results) <= 1


def test_a_small_reference_does_not_make_clean_traffic_look_drifted(model, tmp_path) -> None:
    """The profile's error column is over rows its PCA was not fitted on: computed on the fitting
    rows it is biased low, and a 2,000-row reference then flagged ~40 % of clean evaluations."""
    data = tmp_path / "small.npz"
    np.savez(data, X=rows(2000, RHO, np.random.default_rng(17)))
    small = build_profile(model, data)
    results = [evaluate(small, w) for w in windows_of(model, rows(20_000, RHO, np.random.default_rng(18)), "thread",
                                                      reference=small)]
    assert sum(r[joint.RECONSTRUCTION_ERROR].drifted for r in results) <= 1
    assert median_effect(results, joint.RECONSTRUCTION_ERROR) < 0.08


def test_the_agents_error_column_is_the_projections_errors(model, profile) -> None:
    x = rows(3000, 0.3, np.random.default_rng(7))
    x[10, 4] = np.nan
    (window,) = [w for w in windows_of(model, x[:1000], "thread", reference=profile)]
    errors = load_projection(profile).errors(x[:1000])
    sketch = sketches.NumericSketch.from_proto(column(window, joint.RECONSTRUCTION_ERROR))
    assert (sketch.count, sketch.missing) == (1000, 0)  # the gap counts as the mean, not as a missing error
    assert sketch.mean == pytest.approx(errors.mean(), rel=1e-9)
    assert (sketch.min, sketch.max) == pytest.approx((errors.min(), errors.max()), rel=1e-9)
    reference = column(profile, joint.RECONSTRUCTION_ERROR)
    assert reference is not None and reference.role == summary_pb2.ColumnSummary.FEATURE
    assert reference.count == profile.rows - profile.rows // 2  # the rows the PCA was not fitted on
    # the same projection computed both: the source says which
    assert column(window, joint.RECONSTRUCTION_ERROR).source == reference.source == load_projection(profile).fingerprint


def test_columns_read_in_another_order_or_from_several_inputs_are_gathered() -> None:
    from agent.capture import FEATURE, Reduce, Slot
    from agent.worker import Identity, WindowBuilder

    slots = (Slot("a", FEATURE, Reduce.NUMERIC, np.dtype(np.float32), (3,), ["a0", "a1", "a2"]),
             Slot("b", FEATURE, Reduce.NUMERIC, np.dtype(np.float64), (), ["b"]))
    x = rows(2000, RHO, np.random.default_rng(16))[:, :4].astype(np.float64)
    order = ["b", "a2", "a0"]  # another input's column first, one left out, one out of place
    projection, _ = joint.fit_projection(x[:, [3, 2, 0]], order)
    builder = WindowBuilder(slots, Identity("t", "r", "m", "1", ""), projection=projection)
    builder.add_rows([x[:, :3].astype(np.float32), x[:, 3]])
    found = column(builder.close(time.time_ns(), 0, 0), joint.RECONSTRUCTION_ERROR)
    expected = projection.errors(np.c_[x[:, 3], x[:, :3].astype(np.float32)[:, [2, 0]]])
    assert found.mean == pytest.approx(expected.mean(), rel=1e-12) and found.count == 2000


@pytest.mark.parametrize("summarizer", ["thread", "process"])
def test_set_reference_applies_from_a_next_window_on_and_none_removes_it(model, profile_file, summarizer) -> None:
    x = rows(500, RHO, np.random.default_rng(8))
    sink = InMemorySink()
    projection = load_projection(profile_file)

    def feed_until(has_column: bool) -> None:
        deadline = time.monotonic() + HANG_GUARD
        while True:
            session.run(None, {"X": x})
            done = [w for w in sink.windows if w.rows]
            if done and (column(done[-1], joint.RECONSTRUCTION_ERROR) is not None) == has_column:
                return
            assert time.monotonic() < deadline, f"no window with has_column={has_column}"
            time.sleep(0.01)

    with MonitoredSession(str(model), sink=sink, summarizer=summarizer, window_seconds=None,
                          window_rows=500) as session:
        feed_until(False)
        session.set_reference(profile_file)
        feed_until(True)
        session.set_reference(None)
        feed_until(False)
    has = [column(w, joint.RECONSTRUCTION_ERROR) is not None for w in sink.windows if w.rows]
    on = [i for i, h in enumerate(has) if h]
    assert not has[0] and on == list(range(on[0], on[-1] + 1)) and not has[-1]  # on from a window on, until removed
    for window in (w for w in sink.windows if w.rows):
        found = column(window, joint.RECONSTRUCTION_ERROR)
        if found is not None:  # every window holds the same 500 rows
            assert found.mean == pytest.approx(projection.errors(x).mean(), rel=1e-9)


def test_the_helper_killed_the_thread_that_takes_over_keeps_the_projection(model, profile) -> None:
    x = rows(4000, RHO, np.random.default_rng(9))
    sink = InMemorySink()
    with MonitoredSession(str(model), sink=sink, summarizer="process", window_seconds=None, window_rows=500,
                          reference=profile) as session:
        session.run(None, {"X": x[:500]})
        deadline = time.monotonic() + HANG_GUARD
        while not sink.windows:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(session._summarizer.proc.pid, signal.SIGKILL)
        while session._summarizer._fallback is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for start in range(500, 4000, 500):
            session.run(None, {"X": x[start:start + 500]})
    later = [w for w in sink.windows[1:] if w.rows]
    assert later and all(column(w, joint.RECONSTRUCTION_ERROR) is not None for w in later)


def test_a_reference_whose_columns_the_agent_does_not_have_is_refused(model, tmp_path) -> None:
    names = [f"f{i}" for i in range(D)]
    data = tmp_path / "named.npz"
    np.savez(data, X=rows(2000, RHO, np.random.default_rng(10)))
    named = build_profile(model, data, feature_names=names)
    assert list(named.projection.columns) == names
    with pytest.raises(InvalidArgument, match="reads column.*f0.*give the agent the feature names"):
        MonitoredSession(str(model), summarizer="thread", reference=named)
    sink = InMemorySink()
    with MonitoredSession(str(model), sink=sink, summarizer="thread", window_seconds=None,
                          feature_names=names, reference=named) as session:
        session.run(None, {"X": rows(100, RHO, np.random.default_rng(11))})
    assert column(sink.windows[0], joint.RECONSTRUCTION_ERROR) is not None
    with MonitoredSession(str(model), sink=InMemorySink(), summarizer="thread") as session:
        with pytest.raises(InvalidArgument, match="f0"):
            session.set_reference(named)
        with pytest.raises(InvalidArgument, match="not a reference profile"):
            session.set_reference(data)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env.update(PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD)


def test_agent_serve_reference_errors_are_one_line_and_exit_2(model, tmp_path) -> None:
    data = tmp_path / "named.npz"
    np.savez(data, X=rows(500, RHO, np.random.default_rng(12)))
    named = tmp_path / "named.pb"
    named.write_bytes(build_profile(model, data, feature_names=[f"f{i}" for i in range(D)]).SerializeToString())
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff\xff not a profile")
    for reference, words in ((named, "give the agent the feature names"), (junk, "not a reference profile"),
                             (tmp_path / "absent.pb", "cannot read reference profile")):
        result = cli("agent", "serve", "--model", str(model), "--listen", "127.0.0.1:0", "--summarizer", "thread",
                     "--reference", str(reference))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], result.stderr
    managed = cli("agent", "serve", "--model-name", "churn", "--collector", "127.0.0.1:9", "--listen", "127.0.0.1:0",
                  "--reference", str(named))
    assert managed.returncode == 2 and "--reference goes with --model" in managed.stderr


# ------------------------------------------------------------------ the profile and its checks


def test_profile_notes_say_why_there_is_no_projection(tmp_path) -> None:
    (tmp_path / "m.onnx").write_bytes(examples.mixed_inputs_classifier())
    rng = np.random.default_rng(13)
    data = tmp_path / "ref.npz"
    np.savez(data, num=rng.standard_normal((300, 3)).astype(np.float32),
             city=rng.choice(examples.CITIES, (300, 1)))
    assert build_profile(tmp_path / "m.onnx", data).HasField("projection")  # 3 numeric features
    (tmp_path / "img.onnx").write_bytes(examples.image_scorer())
    np.savez(tmp_path / "img.npz", image=rng.standard_normal((50, 3, 8, 8)).astype(np.float32))
    notes: list[str] = []
    image = build_profile(tmp_path / "img.onnx", tmp_path / "img.npz", notes=notes)
    assert not image.HasField("projection") and column(image, joint.RECONSTRUCTION_ERROR) is None
    assert notes == ["no multivariate projection: 0 numeric feature columns: a projection needs at least 2"]


@pytest.mark.parametrize("change, words", [
    (lambda p: p.projection.columns.__setitem__(0, "nope"), "reads 'nope', which is not a numeric column"),
    (lambda p: p.projection.basis.__setitem__(0, 3.0), "orthonormal"),
    (lambda p: p.projection.columns.__setitem__(0, "X\n[0]"), "non-printable"),
])
def test_validate_profile_refuses_a_bad_projection(profile, change, words) -> None:
    broken = summary_pb2.ReferenceProfile()
    broken.CopyFrom(profile)
    change(broken)
    with pytest.raises(InvalidArgument, match=words):
        validate_profile(broken)
    validate_profile(profile)


def test_a_reference_command_round_trips_and_a_bad_one_is_refused(profile) -> None:
    args = command_args("3", profile.projection)
    version, projection = from_command(args)
    assert version == "3" and projection.columns == tuple(profile.projection.columns)
    assert from_command(command_args("3", None)) == ("3", None)
    with pytest.raises(InvalidArgument, match="base64"):
        from_command({"version": "3", "projection": "%%%"})
    with pytest.raises(InvalidArgument, match="names no version"):
        from_command({"projection": ""})
    broken = summary_pb2.Projection()
    broken.CopyFrom(profile.projection)
    broken.components = 0
    with pytest.raises(InvalidArgument, match="components"):
        from_command({"version": "3", "projection": base64.b64encode(broken.SerializeToString()).decode()})


# ------------------------------------------------------------------ agents connected to a collector


def collector_windows(server, version: str) -> list[summary_pb2.WindowSummary]:
    return [i.summary for i in server.store.windows("lr", version, include_summaries=True, limit=10_000)]


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_collector_sends_the_attached_projection_to_static_agents(model, profile, tmp_path) -> None:
    from collector.api.server import serve_collector

    server = serve_collector(tmp_path / "c.db", "127.0.0.1:0", drift_interval=0, rollup_interval=3600)
    address = f"127.0.0.1:{server.port}"
    x = rows(400, RHO, np.random.default_rng(14))
    sessions = []
    try:
        def start(agent_id: str, version: str) -> MonitoredSession:
            sessions.append(MonitoredSession(str(model), model_name="lr", model_version=version, agent_id=agent_id,
                                             collector=address, spool_dir=tmp_path / agent_id, summarizer="process",
                                             window_seconds=0.2))
            return sessions[-1]

        early, other = start("early", "3"), start("other", "4")  # connected before the attach
        wait_until(lambda: len(server.agents.live) == 2, "two agent streams")
        with grpc.insecure_channel(address) as channel:
            collector_pb2_grpc.OpsServiceStub(channel).AttachProfile(
                pb.AttachProfileRequest(model_name="lr", model_version="3", profile=profile), timeout=HANG_GUARD)
        late = start("late", "3")  # told on its hello

        def with_error(agent_id: str, version: str) -> bool:
            for session in sessions:
                session.run(None, {"X": x})
            return any(w.agent_id == agent_id and column(w, joint.RECONSTRUCTION_ERROR) is not None
                       for w in collector_windows(server, version))

        wait_until(lambda: with_error("early", "3") and with_error("late", "3"), "the error column from both")
        assert not any(column(w, joint.RECONSTRUCTION_ERROR) for w in collector_windows(server, "4"))
        stored = [w for w in collector_windows(server, "3") if column(w, joint.RECONSTRUCTION_ERROR) is not None]
        assert {w.agent_id for w in stored} == {"early", "late"}
        assert other is not None and early is not None and late is not None
    finally:
        for session in sessions:
            session.close(5)
        server.stop(grace=0)


def test_the_collector_tells_each_agent_the_reference_of_its_version(tmp_path) -> None:
    """Collector side, with raw stream clients: a plain agent gets its version's projection on its hello,
    a managed one the production version's before its serve command, every live one an attach's."""
    from test_approvals import reference_profile
    from test_rollout_collector import call, make_production, register, running_collector

    with running_collector(tmp_path) as (server, ops, address, connect):
        version = register(ops, 1).version
        plain = connect("plain-1", managed=False, serving=str(version))
        told = plain.references.get(timeout=HANG_GUARD)
        assert from_command(told.args)[0] == "1" and told.id.startswith("reference-")
        assert from_command(told.args)[1].columns == tuple(reference_profile().projection.columns)
        make_production(ops, version)
        managed = connect("managed-1", auto=lambda command: "")
        assert from_command(managed.references.get(timeout=HANG_GUARD).args)[0] == "1"
        without = summary_pb2.ReferenceProfile()
        without.CopyFrom(reference_profile())
        without.ClearField("projection")
        call(ops, "alice", "AttachProfile", pb.AttachProfileRequest(model_name="churn", model_version="1",
                                                                     profile=without))
        for agent in (plain, managed):  # an attach reaches every live agent of the model, "none" included
            pushed = agent.references.get(timeout=HANG_GUARD)
            assert from_command(pushed.args) == ("1", None)


@pytest.mark.slow
def test_a_managed_agent_computes_the_error_from_the_first_window_of_the_version_it_serves(tmp_path) -> None:
    from agent.rollout import RolloutController
    from test_rollout_collector import AGENT_TOKEN, make_production, register, running_collector

    x = rows(200, RHO, np.random.default_rng(15))
    with running_collector(tmp_path) as (server, ops, address, connect):
        make_production(ops, register(ops, 1).version)
        agent = RolloutController("churn", address, agent_id="managed-2", spool_dir=tmp_path / "spool",
                                  token=AGENT_TOKEN, session_options={"summarizer": "process",
                                                                      "window_seconds": 0.2})
        try:
            wait_until(lambda: agent.switch.current is not None, "the production version served")

            def stored() -> list[summary_pb2.WindowSummary]:
                agent.switch.current.session.run(None, {"X": x})
                return [i.summary for i in server.store.windows("churn", "1", include_summaries=True)
                        if i.summary.rows]

            wait_until(lambda: len(stored()) >= 3, "three windows stored")
            assert all(column(w, joint.RECONSTRUCTION_ERROR) is not None for w in stored())
        finally:
            agent.close(5)


def test_a_managed_agent_keeps_references_per_version_and_reports_a_bad_one(tmp_path, profile) -> None:
    from test_rollout_agent import FakeCollector, serve_args, start_agent

    fake = FakeCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    collector_pb2_grpc.add_AgentServiceServicer_to_server(fake, server)
    fake.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    agent = start_agent(fake.target, tmp_path / "spool")
    model = examples.logistic_regression()
    try:
        assert fake.state(fake.command("reference", **command_args("1", profile.projection))).ok  # before serve
        assert fake.state(fake.command("reference", **command_args("2", None))).ok  # another version's: kept
        fake.files[1] = model
        assert fake.state(fake.command("serve", **serve_args(1, model))).ok
        for _ in range(3):
            agent.infer(rows=40)
        wait_until(lambda: len(fake.windows_received()) >= 3, "three windows")
        assert all(column(w, joint.RECONSTRUCTION_ERROR) is not None for w in fake.windows_received() if w.rows)
        refused = fake.state(fake.command("reference", version="1", projection="%%"))
        assert not refused.ok and "base64" in refused.error and refused.model_version == "1"
        assert fake.state(fake.command("reference", **command_args("1", None))).ok  # removes it
        seen = len(fake.windows_received())

        def latest_lacks() -> bool:
            agent.infer(rows=40)
            done = [w for w in fake.windows_received()[seen:] if w.rows]
            return bool(done) and column(done[-1], joint.RECONSTRUCTION_ERROR) is None

        wait_until(latest_lacks, "a window without the error column")
    finally:
        agent.stop()
        agent.ctrl.close(5)
        server.stop(0).wait()


@pytest.mark.parametrize("classes", [1, 2, 5, 16, 17, 40])
def test_confidence_is_each_rows_largest_probability_nan_where_any_is(classes: int) -> None:
    p = np.random.default_rng(classes).random((300, classes)).astype(np.float32)
    p[7, classes - 1] = np.nan
    p[11, 0] = np.nan
    got = joint.confidence(p)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, p.max(axis=1).astype(np.float64))
    assert np.isnan(got[[7, 11]]).all() and not np.isnan(np.delete(got, [7, 11])).any()
