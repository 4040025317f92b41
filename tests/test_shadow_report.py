"""Shadow reports: shadow summaries merged through rollups, read by a viewer, shown by the CLI.

A real collector on loopback over a real SQLite file; windows arrive over the agent stream
(a raw stream client); models are registered and staged through the operators' service.
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from agent.sketches import NumericSketch, from_proto
from collector.api.server import serve_collector
from collector.base.auth import AuthConfig
from collector.monitoring.shadow import figures
from collector.store.rollup import RetentionPolicy, WindowMerger, merge_windows
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from protos import summary_pb2
from test_approvals import AUTH_TOML, TOKENS, call, cli, promote, refused, register
from test_collector_server import AgentConn, batch, window

AGENT_TOKEN = "edge-1-token-0123456789"
AUTH = AUTH_TOML + f'[[agent]]\nname = "edge-1"\ntoken = "{AGENT_TOKEN}"\n'
NS = 1_000_000_000
ROLE = summary_pb2.ColumnSummary.PREDICTION


def sketch(values: np.ndarray, name: str) -> summary_pb2.ColumnSummary:
    s = NumericSketch()
    s.update(values)
    return s.to_proto(name, ROLE, "")


def shadow_window(rng: np.random.Generator, seq: int, end_ns: int, shadow: str = "2"):
    """A production window of model churn version 1 with the shadow's comparison; also the raw values."""
    w = window(seq, model="churn", version="1", end_ns=end_ns)
    w.calls = 20
    production_latency = rng.exponential(800.0, 20)
    diff, shadow_latency = rng.normal(0.01, 0.05, 6), rng.exponential(1500.0, 6)
    w.latency.CopyFrom(sketch(production_latency, "latency_us"))
    w.shadow.CopyFrom(summary_pb2.ShadowSummary(
        model_version=shadow, model_sha256="cd" * 32, calls=6, rows=6, skipped=seq % 3, errors=int(seq % 5 == 0),
        label_rows=6, label_agree=5 + seq % 2, score_diff=sketch(diff, "score_diff"),
        latency=sketch(shadow_latency, "latency_us")))
    return w, diff, production_latency, shadow_latency


def assert_sketch_of(column: summary_pb2.ColumnSummary, values: np.ndarray) -> None:
    got = from_proto(column)
    assert got.count == len(values)
    assert got.mean == pytest.approx(values.mean(), rel=1e-9)
    qs = np.array([0.05, 0.5, 0.95])
    # the merged sketch answers the pooled values' quantiles (within its rank error)
    ranks = np.searchsorted(np.sort(values), got.quantiles(qs), side="right") / len(values)
    assert np.all(np.abs(ranks - qs) <= got.rank_error() + 1 / len(values))


def test_shadows_of_one_version_merge_and_a_mixed_bucket_keeps_the_latest_version_in_any_order():
    rng = np.random.default_rng(3)
    t0 = 1_800_000_000 * NS
    made = [shadow_window(rng, seq, t0 + seq * 10 * NS) for seq in range(8)]
    merged = merge_windows([w for w, *_ in made])
    s = merged.shadow
    assert (s.model_version, s.calls, s.rows) == ("2", 48, 48)
    assert s.skipped == sum(w.shadow.skipped for w, *_ in made) and s.errors == 2
    assert (s.label_rows, s.label_agree) == (48, sum(w.shadow.label_agree for w, *_ in made))
    assert_sketch_of(s.score_diff, np.concatenate([d for _, d, _, _ in made]))
    assert_sketch_of(s.latency, np.concatenate([lat for *_, lat in made]))

    # the shadow switched from version 2 to 3 inside the bucket: the bucket keeps 3, whatever the order
    switched = [w for w, *_ in made[:5]] + [shadow_window(rng, seq, t0 + seq * 10 * NS, "3")[0] for seq in (5, 6)]
    results = set()
    for seed in range(5):
        random.Random(seed).shuffle(switched)
        merger = WindowMerger()
        for w in switched:
            merger.add(w)
        results.add((merger.result().shadow.model_version, merger.result().shadow.calls))
    assert results == {("3", 12)}
    assert not merge_windows([window(0)]).HasField("shadow")  # windows without a shadow stay without one


@pytest.fixture
def collector(db_url) -> Iterator[tuple]:
    server = serve_collector(db_url, "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH),
                             drift_interval=0, rollup_interval=3600)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, pb_grpc.OpsServiceStub(channel), pb_grpc.AgentServiceStub(channel), f"127.0.0.1:{server.port}"
    finally:
        channel.close()
        server.stop(grace=0)


def send(agents: pb_grpc.AgentServiceStub, windows: list[summary_pb2.WindowSummary]) -> None:
    conn = AgentConn(agents, metadata=(("authorization", f"Bearer {AGENT_TOKEN}"),))
    conn.send(pb.AgentMessage(hello=pb.Hello(agent_id="edge-1", run_id="run-1", host="box", model_name="churn",
                                             model_version="1", started_unix_nano=time.time_ns())))
    conn.send(batch(*windows))
    acks = conn.acks(len(windows))
    assert {a.result for a in acks} == {pb.WindowAck.STORED}
    conn.close()


def production_and_staging(ops) -> None:
    """churn version 1 in production, version 2 in staging (a shadow must be a staging version)."""
    register(ops, 0.90)
    call(ops, "bob", "Approve", pb.DecisionRequest(id=promote(ops, "alice", 1).id))
    register(ops, 0.91)
    call(ops, "alice", "SetStage", pb.SetStageRequest(name="churn", version=2, stage="staging", reason="try it"))


def report(ops, who: str = "dave", **kw) -> pb.ShadowReportResponse:
    return call(ops, who, "ShadowReport", pb.ShadowReportRequest(model_name="churn", **kw))


def test_the_report_merges_raw_windows_and_rollups_once_each_and_a_viewer_reads_it(collector):
    server, ops, agents, address = collector
    production_and_staging(ops)
    started = call(ops, "alice", "SetShadow", pb.SetShadowRequest(model_name="churn", version=2, share=0.25,
                                                                  reason="compare v2 with v1"))
    assert (started.kind, started.version, started.share) == ("shadow", 2, 0.25)
    rng = np.random.default_rng(11)
    now = time.time_ns()
    # 30 windows ten minutes apart over five hours; the two newest ran shadow version 3
    made = [shadow_window(rng, i, now - i * 600 * NS, "3" if i < 2 else "2") for i in range(30)]
    send(agents, [w for w, *_ in made])
    v2 = [m for m in made if m[0].shadow.model_version == "2"]
    since = now - 6 * 3600 * NS

    def check(reply: pb.ShadowReportResponse) -> None:
        s = reply.summary
        assert (reply.shadow_version, reply.production_version, s.model_version) == ("2", "1", "2")
        assert (s.calls, s.rows, s.label_rows) == (6 * 28, 6 * 28, 6 * 28)
        assert s.skipped == sum(w.shadow.skipped for w, *_ in v2)
        assert s.errors == sum(w.shadow.errors for w, *_ in v2)
        assert s.label_agree == sum(w.shadow.label_agree for w, *_ in v2)
        assert_sketch_of(s.score_diff, np.concatenate([d for _, d, _, _ in v2]))
        assert_sketch_of(s.latency, np.concatenate([lat for *_, lat in v2]))
        assert_sketch_of(reply.production_latency, np.concatenate([p for _, _, p, _ in v2]))

    check(report(ops, since_unix_nano=since))  # raw windows only
    moved = server.store.rollup(time.time_ns(), RetentionPolicy(raw_seconds=3600, minute_seconds=7200))
    assert moved["raw_merged"] > 0 and moved["minute_merged"] > 0
    levels = {w.level for w in call(ops, "dave", "ListWindows", pb.ListWindowsRequest(model_name="churn")).windows}
    assert levels == {"raw", "minute", "hour"}
    check(report(ops, since_unix_nano=since))  # the same figures across raw, minute and hour rows
    check(report(ops, "dave", version=2, since_unix_nano=since))

    other = report(ops, version=3, since_unix_nano=since)
    assert (other.shadow_version, other.summary.calls) == ("3", 12)
    assert report(ops).shadow_version == "2"  # the shadow set now; since it started: no windows yet
    f = figures(report(ops, since_unix_nano=since))
    assert f.agreement == pytest.approx(sum(w.shadow.label_agree for w, *_ in v2) / (6 * 28))
    assert f.production_calls == 20 * 28 and f.shadow_share == pytest.approx(6 / 20)
    assert f.skipped_share == pytest.approx(f.skipped / (f.shadow_calls + f.shadow_errors + f.skipped))
    assert f.score_diff_p5 < f.score_diff_p50 < f.score_diff_p95
    assert f.production_latency_p50_us < f.production_latency_p99_us

    err = refused(ops, "dave", "SetShadow", pb.SetShadowRequest(model_name="churn", version=2, share=0.5, reason="x"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = refused(ops, "dave", "ShadowReport", pb.ShadowReportRequest(model_name=""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    # the CLI, through its real entry point: side by side, and as JSON
    base = ("--collector", address, "--token", TOKENS["dave"])
    shown = cli("shadow", "report", "churn", "--since", "6h", *base)
    assert shown.returncode == 0, shown.stderr
    assert "churn: shadow version 2 beside production version 1" in shown.stdout
    lines = {line.split("  ")[0]: line for line in shown.stdout.splitlines()}
    assert f"{20 * 28}" in lines["calls"] and f"{6 * 28} (30.0% of production)" in lines["calls"]
    assert f"{f.agreement:.1%} of {6 * 28} rows" in lines["label agreement"]
    assert f"{f.shadow_latency_p99_us / 1000:.3g} ms" in lines["latency p99"]
    want = " / ".join(f"{x:+.4f}" for x in (f.score_diff_p5, f.score_diff_p50, f.score_diff_p95))
    assert lines["score diff p5 / p50 / p95"].endswith(want)
    as_json = json.loads(cli("shadow", "report", "churn", "--since", "6h", "--json", *base).stdout)
    assert as_json["shadow_version"] == "2" and as_json["figures"]["shadow_calls"] == 6 * 28
    assert as_json["figures"]["agreement"] == pytest.approx(f.agreement)
    quiet = cli("shadow", "report", "churn", *base)
    assert quiet.returncode == 0 and "no shadow traffic in that time" in quiet.stdout


def test_shadow_start_and_stop_from_the_cli_and_a_report_without_any_shadow(collector):
    _, ops, _, address = collector
    production_and_staging(ops)
    base = ("--collector", address)
    missing = cli("shadow", "report", "churn", *base, "--token", TOKENS["dave"])
    assert missing.returncode == 1 and "has no shadow version" in missing.stderr
    assert "outrider shadow start churn" in missing.stderr

    started = cli("shadow", "start", "churn", "2", "--share", "0.25", "--reason", "compare", *base,
                  "--token", TOKENS["alice"])
    assert started.returncode == 0, started.stderr
    assert "shadow of churn: version 2 on 25% of requests" in started.stdout
    assert report(ops).shadow_version == "2"
    bad = cli("shadow", "start", "churn", "2", "--share", "1.5", "--reason", "x", *base, "--token", TOKENS["alice"])
    assert bad.returncode == 2 and "at most 1" in bad.stderr
    viewer = cli("shadow", "stop", "churn", "--reason", "x", *base, "--token", TOKENS["dave"])
    assert viewer.returncode == 1 and "refused" in viewer.stderr

    stopped = cli("shadow", "stop", "churn", "--reason", "seen enough", *base, "--token", TOKENS["alice"])
    assert stopped.returncode == 0, stopped.stderr
    assert "shadow of churn (version 2) stopped" in stopped.stdout
    assert report(ops).shadow_version == "2"  # the latest shadow still answers after it stopped
    trail = [e.action for e in call(ops, "dave", "ListAudit", pb.ListAuditRequest(model_name="churn")).entries]
    assert "model.shadow" in trail and "model.unshadow" in trail
