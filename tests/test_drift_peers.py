"""benchmarks/drift_peers.py: skipped cleanly without the peers' venv, the same rows as drift_quality's
static evaluations, its scoring, and the peer worker's input/output contract (only where the peer venv
exists: CI does not install Evidently or NannyML)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import drift_peers as dp
from benchmarks import drift_quality as dq

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.drift_peers", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_without_the_peer_venv_it_says_how_to_set_it_up_and_exits_0(tmp_path):
    done = _run("--venv", str(tmp_path / "nowhere"), "--runs", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "no peer venv" in lines[0] and "--setup --venv" in lines[0], done.stdout
    assert not (tmp_path / "nowhere").exists()  # nothing installed or created


def test_a_venv_without_the_packages_is_skipped_with_the_import_error(tmp_path):
    # A "venv" whose python is ours: it has no evidently/nannyml.
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    done = _run("--venv", str(tmp_path / "venv"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "fails" in lines[0] and "ModuleNotFoundError" in lines[0], done.stdout


def test_an_unknown_scenario_is_bad_usage(tmp_path):
    done = _run("--venv", str(tmp_path / "nowhere"), "--only", "no such change")
    assert done.returncode == 2 and "pick one of" in done.stderr and not done.stdout


def test_peers_get_the_very_rows_of_drift_quality_static_evaluations(monkeypatch):
    seen = []
    real = dq.rows

    def recording(rng, n, change=None):
        out = real(rng, n, change)
        seen.append(out)
        return out

    ref = dq.reference(dp.SEED, 500)
    monkeypatch.setattr(dq, "rows", recording)
    dq.static(ref, 1_000, dp.SEED + 300, dq.CHANGES["row selection"], 2, with_scipy=False)
    monkeypatch.setattr(dq, "rows", real)
    ours = dp.current_rows("row selection", 1_000, 2)
    assert len(seen) == len(ours) == 2
    for a, b in zip(seen, ours):
        for name in dq.COLUMNS:
            np.testing.assert_array_equal(a[name], b[name])


def test_scoring_detection_false_alarms_wrong_columns_and_multivariate():
    case = lambda s, run: dp.Case(s, 500, 1_000, run)  # noqa: E731
    verdicts = {"evidently": {
        case("clean", 0): dp.Verdict(set(), False),
        case("clean", 1): dp.Verdict({"product"}, False),
        case("mean +0.5 sd", 0): dp.Verdict({"normal", "product", "age"}, False),
        case("mean +0.5 sd", 1): dp.Verdict({"age"}, True),
        case("correlation 0.9 -> 0", 0): dp.Verdict({"corr_b"}, False),
        case("correlation 0.9 -> 0", 1): dp.Verdict(set(), True),
    }}
    rows = {r["scenario"]: r for r in dp.report(verdicts)}
    assert rows["clean"]["flagged"] == 1 and rows["clean"]["wrong_columns_per_evaluation"] == 0.5
    assert rows["mean +0.5 sd"]["flagged"] == 1  # "age" alone is not the changed column
    assert rows["mean +0.5 sd"]["wrong_columns_per_evaluation"] == 1.5
    assert rows["mean +0.5 sd"]["multivariate_per_100"] == 50
    # The correlation break is detected by the multivariate verdict; corr_b's marginal did not move.
    assert rows["correlation 0.9 -> 0"]["flagged"] == 1
    assert rows["correlation 0.9 -> 0"]["wrong_columns"] == {"corr_b": 1}


def test_peer_worker_contract_on_a_tiny_case(tmp_path):
    if dp.missing(dp.DEFAULT_VENV):
        pytest.skip(f"no peer venv at {dp.DEFAULT_VENV} (python -m benchmarks.drift_peers --setup)")
    rng = np.random.default_rng(0)
    reference = dq.clean_rows(rng, 2_000)
    current = dq.clean_rows(rng, 500)
    current["normal"] = current["normal"] + 50.0  # 5 standard deviations: every tool must see it
    np.savez(tmp_path / "ref.npz", **reference)
    np.savez(tmp_path / "cur.npz", **current)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"numeric": dq.NUMERIC, "categorical": dq.CATEGORICAL, "cases": [
        {"id": "shifted", "reference": str(tmp_path / "ref.npz"), "current": str(tmp_path / "cur.npz"),
         "chunk_size": 500}]}))
    done = subprocess.run([str(dp.venv_python(dp.DEFAULT_VENV)), str(dp.WORKER), str(manifest)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout)  # stdout holds the one JSON answer, whatever the libraries print
    assert set(answer["versions"]) == {"evidently", "nannyml", "pandas", "numpy"}
    got = answer["cases"]["shifted"]
    assert "normal" in got["evidently"]["columns"] and set(got["evidently"]["columns"]) <= set(dq.COLUMNS)
    assert isinstance(got["evidently"]["dataset"], bool)
    assert "normal" in got["nannyml"]["columns"] and set(got["nannyml"]["columns"]) <= set(dq.COLUMNS)
    assert got["nannyml"]["multivariate"] in (True, False, None)


def test_outriders_side_judges_the_correlation_break_by_its_multivariate_column():
    scenario = next(s for s in dq.CHANGES if s.startswith("correlation"))
    verdicts = dp.outrider_verdicts([scenario], 2, {50_000: dq.reference(dp.SEED, 50_000)}, lambda _: None)
    assert len(verdicts) == 2 * len(dp.WINDOW_ROWS)
    assert all(v.multivariate is True for v in verdicts.values()), verdicts
    assert not any(v.columns for v in verdicts.values())  # the marginals did not move
