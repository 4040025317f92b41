"""Smoke tests of the request-path benchmarks (benchmarks/*.py): they run and measure what they say.

Behaviour only, never speed: tiny runs, no timing asserted.
"""
from __future__ import annotations

import pytest

from agent import examples
from benchmarks import metrics_overhead, shadow, swap


@pytest.fixture(scope="module")
def model() -> bytes:
    return examples.logistic_regression()


def test_swap_benchmark_swaps_under_load_and_no_request_fails():
    result = swap.run(swaps=2, interval=2.5, steady=2.0, threads=2, summarizer="thread")
    assert result["failed_requests"] == 0 and not result["refused_swaps"], result
    assert result["served_by_version"]["1"] > 0 and result["served_by_version"]["2"] > 0
    assert result["steady"]["requests"] > 0 and result["swap_windows"]["requests"] > 0
    assert result["ratio_p99"] is not None and result["swap_ms_max"] is not None


@pytest.mark.parametrize("mode", ["in_process", "oip"])
def test_shadow_benchmark_measures_each_configuration(model, mode):
    rows = {r["config"]: r for r in getattr(shadow, mode)(model, batch=1, block=50, rounds=1)}
    assert list(rows) == ["no shadow", "share 0.1", "share 1.0, queue 64", "share 1.0, queue never full"]
    assert rows["no shadow"]["ratio_p50"] == 1.0 and rows["no shadow"]["queued_share"] == 0
    never_full = rows["share 1.0, queue never full"]
    assert never_full["queued_share"] == 1.0 and never_full["skipped_share"] == 0
    full = rows["share 1.0, queue 64"]
    assert full["queued_share"] + full["skipped_share"] == pytest.approx(1.0)
    assert 0 <= rows["share 0.1"]["queued_share"] < 1
    assert shadow.shadow_alone(model, batch=1, n=20) > 0


def test_metrics_benchmark_counts_every_measured_call(model):
    result = metrics_overhead.end_to_end(model, calls=40, warmup=10)
    assert result["counted_by_metrics"] == 100  # only the two servers with the interceptor count
    assert result["without_p50_us"] > 0 and result["with_p50_us"] > 0
    assert metrics_overhead.in_process(calls=200)["calls"] == 200
