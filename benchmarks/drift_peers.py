"""Evidently and NannyML beside Outrider on drift_quality's data: false alarms, detection, wrong columns.

    python -m benchmarks.drift_peers --setup [--venv .venv-peers]     # installs them into their OWN venv
    python -m benchmarks.drift_peers [--venv .venv-peers] [--runs 20] [--only SCENARIO] [--json]

Evidently and NannyML are not dependencies of Outrider and would pin pandas/numpy versions of their
own, so ``--setup`` installs them (pinned, ``PEER_PINS``) into a separate venv (default
``.venv-peers`` at the repository root), never into the project's. Without that venv, or with a
package missing there, the benchmark prints one line saying so and how to set it up, and exits 0.

The data are drift_quality's (read-only import): its 20 columns (``rows``), its scenarios (clean and
every ``CHANGES`` entry), references of 500 and 50,000 rows, current windows of 1,000 and 10,000 rows,
``--runs`` static evaluations per case (fresh rows per run, fixed seeds). Outrider's verdicts come from
drift_quality's own static-evaluation path (``static`` -> ``decide`` with the shipped ``DriftConfig``);
the very same rows (the same generator, seeds and draw order as ``static``) are written as .npz files
(numpy only on this side) and ONE worker process in the peer venv (``benchmarks/_peer_worker.py``,
which imports nothing from Outrider) evaluates every case with each tool's defaults, returning the
flagged columns as JSON. Its docstring says exactly which calculators and verdicts.

Reported per tool, scenario, reference and window size: flagged evaluations per 100 (clean: any
column flagged = false alarms; a change: one of its changed columns flagged; for the correlation
break, whose marginals do not move, the multivariate verdict: Outrider's "@reconstruction_error"
column (drift_quality computes it as the agent does), NannyML's PCA reconstruction error, Evidently's dataset-level
verdict), wrong columns flagged per evaluation (columns the change did not touch), and the
multivariate / dataset-level verdict per 100.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import drift_quality as dq  # noqa: E402

WORKER = Path(__file__).resolve().with_name("_peer_worker.py")
DEFAULT_VENV = ROOT / ".venv-peers"
# Versions that install together on Python 3.11 here. pandas is held below 3: with pandas 3.1.1 (what
# pip picks for these two) ``import evidently`` fails ("cannot import name 'infer_dtype_from_object'
# from 'pandas.core.dtypes.common'").
PEER_PINS = ("evidently==0.7.23", "nannyml==0.13.1", "pandas==2.2.3", "numpy==2.4.6")
REFERENCE_ROWS = (500, 50_000)
WINDOW_ROWS = (1_000, 10_000)
SEED = 11  # drift_quality's Suite seed: its static runs use reference(seed) and currents from seed + 300
TOOLS = ("outrider", "evidently", "nannyml")
MULTIVARIATE = "@reconstruction_error"


def scenarios() -> list[str]:
    return ["clean", *dq.CHANGES]


def changed_columns(scenario: str) -> frozenset[str]:
    return dq.CHANGES[scenario].columns if scenario in dq.CHANGES else frozenset()


# ------------------------------------------------------------------ the peer venv


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def missing(venv: Path) -> str | None:
    """Why the peers cannot run from ``venv`` (one line, with the fix), or None when they can."""
    fix = f"set it up with: python -m benchmarks.drift_peers --setup --venv {venv}"
    python = venv_python(venv)
    if not python.exists():
        return f"Evidently/NannyML not run: no peer venv at {venv} ({fix})"
    probe = subprocess.run([str(python), "-c", "import evidently, nannyml"], capture_output=True, text=True,
                           env={**os.environ, "NML_DISABLE_USAGE_LOGGING": "1", "DO_NOT_TRACK": "1"})
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"Evidently/NannyML not run: importing them in {venv} fails: {reason} ({fix})"
    return None


def setup(venv: Path) -> int:
    """Create ``venv`` (python3 -m venv) and install the pinned peers into it."""
    if not venv_python(venv).exists():
        subprocess.run(["python3", "-m", "venv", str(venv)],
                       check=True)
    done = subprocess.run([str(venv_python(venv)), "-m", "pip", "install", *PEER_PINS])
    if done.returncode != 0:
        print(f"drift_peers: pip could not install {' '.join(PEER_PINS)} into {venv} (see pip's output above)",
              file=sys.stderr)
        return 1
    reason = missing(venv)
    print(reason or f"drift_peers: {' '.join(PEER_PINS)} installed into {venv}")
    return 1 if reason else 0


# ------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class Case:
    scenario: str
    reference: int
    rows: int
    run: int

    @property
    def id(self) -> str:
        return f"{self.scenario}|{self.reference}|{self.rows}|{self.run}"


@dataclass
class Verdict:
    columns: set[str]
    multivariate: bool | None  # None: the tool gives no such verdict here


def current_rows(scenario: str, n: int, runs: int, seed: int = SEED + 300) -> list[dict[str, np.ndarray]]:
    """The rows of drift_quality.static's evaluations of ``scenario`` at ``n`` rows: its generator,
    seed and draw order (the draws do not depend on the reference)."""
    rng = np.random.default_rng([seed, n, 3])
    change = dq.CHANGES.get(scenario)
    return [dq.rows(rng, n, change) for _ in range(runs)]


def write_cases(folder: Path, picked: Sequence[str], runs: int,
                references: dict[int, dict[str, np.ndarray]]) -> tuple[Path, list[Case]]:
    """The reference and current frames as .npz files, and the worker's manifest."""
    cases, manifest = [], []
    for size, raw in references.items():
        np.savez(folder / f"reference-{size}.npz", **raw)
    for index, scenario in enumerate(picked):
        for n in WINDOW_ROWS:
            for run, data in enumerate(current_rows(scenario, n, runs)):
                path = folder / f"current-{index}-{n}-{run}.npz"
                np.savez(path, **data)
                for size in references:
                    case = Case(scenario, size, n, run)
                    cases.append(case)
                    manifest.append({"id": case.id, "reference": str(folder / f"reference-{size}.npz"),
                                     "current": str(path), "chunk_size": n})
    path = folder / "manifest.json"
    path.write_text(json.dumps({"numeric": dq.NUMERIC, "categorical": dq.CATEGORICAL, "cases": manifest}))
    return path, cases


def start_worker(venv: Path, manifest: Path, log: Path) -> subprocess.Popen:
    # absolute: the worker runs in the cases' folder, where a relative --venv means nothing
    env = {**os.environ, "NML_DISABLE_USAGE_LOGGING": "1", "DO_NOT_TRACK": "1", "PYTHONPATH": ""}
    with open(log, "w") as err:
        return subprocess.Popen([str(venv_python(venv.absolute())), str(WORKER), str(manifest)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=manifest.parent)


def peer_verdicts(answer: dict, cases: Sequence[Case]) -> dict[str, dict[Case, Verdict]]:
    out: dict[str, dict[Case, Verdict]] = {"evidently": {}, "nannyml": {}}
    for case in cases:
        got = answer["cases"][case.id]
        out["evidently"][case] = Verdict(set(got["evidently"]["columns"]), bool(got["evidently"]["dataset"]))
        out["nannyml"][case] = Verdict(set(got["nannyml"]["columns"]), got["nannyml"]["multivariate"])
    return out


def outrider_verdicts(picked: Sequence[str], runs: int, references: dict[int, dq.Reference],
                      log: Callable[[str], None]) -> dict[Case, Verdict]:
    """drift_quality's static evaluations (same seeds as write_cases), decided with the shipped defaults."""
    out = {}
    for scenario in picked:
        for size, ref in references.items():
            for n in WINDOW_ROWS:
                evaluations = dq.static(ref, n, SEED + 300, dq.CHANGES.get(scenario), runs, with_scipy=False)
                for run, evaluation in enumerate(evaluations):
                    names = set(dq.decide(evaluation, dq.SHIPPED))
                    multivariate = MULTIVARIATE in names  # drift_quality's windows carry the column
                    out[Case(scenario, size, n, run)] = Verdict({c for c in names if not c.startswith("@")},
                                                                multivariate)
        log(f"outrider: {scenario}")
    return out


# ------------------------------------------------------------------ scoring


@dataclass
class Tally:
    evaluations: int = 0
    flagged: int = 0  # clean: any column flagged; a change: detected
    wrong: int = 0  # columns flagged that the change did not touch, summed over evaluations
    multivariate: int = 0
    multivariate_known: int = 0
    wrong_columns: dict[str, int] = field(default_factory=dict)

    def add(self, verdict: Verdict, scenario: str) -> None:
        changed = changed_columns(scenario)
        self.evaluations += 1
        if verdict.multivariate is not None:
            self.multivariate_known += 1
            self.multivariate += verdict.multivariate
        if not changed:
            self.flagged += bool(verdict.columns)
        elif changed == {MULTIVARIATE}:
            self.flagged += bool(verdict.multivariate)
        else:
            self.flagged += bool(verdict.columns & changed)
        for name in verdict.columns - changed:
            self.wrong += 1
            self.wrong_columns[name] = self.wrong_columns.get(name, 0) + 1

    def row(self) -> dict:
        n = max(self.evaluations, 1)
        return {"evaluations": self.evaluations, "flagged": self.flagged, "flagged_per_100": 100 * self.flagged / n,
                "wrong_columns_per_evaluation": self.wrong / n,
                "multivariate_per_100": (100 * self.multivariate / self.multivariate_known
                                         if self.multivariate_known else None),
                "wrong_columns": dict(sorted(self.wrong_columns.items(), key=lambda kv: (-kv[1], kv[0])))}


def report(verdicts: dict[str, dict[Case, Verdict]]) -> list[dict]:
    tallies: dict[tuple, Tally] = {}
    for tool, per_case in verdicts.items():
        for case, verdict in per_case.items():
            key = (case.scenario, case.reference, case.rows, tool)
            tallies.setdefault(key, Tally()).add(verdict, case.scenario)
    order = {name: i for i, name in enumerate(scenarios())}
    return [{"scenario": s, "reference": ref, "rows": n, "tool": tool, **tallies[(s, ref, n, tool)].row()}
            for s, ref, n, tool in sorted(tallies, key=lambda k: (order[k[0]], k[1], k[2], TOOLS.index(k[3])))]


def print_table(rows_out: list[dict]) -> None:
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows_out:
        by_key.setdefault((r["scenario"], r["reference"], r["rows"]), {})[r["tool"]] = r
    print("| scenario | reference | rows | flagged per 100 (clean: false alarms; change: detected): Outrider / "
          "Evidently / NannyML | wrong columns per evaluation: O / E / N | multivariate verdict per 100: "
          "O / E (dataset) / N (PCA) | columns most often wrongly flagged: E; N |")
    print("|---|---:|---:|---|---|---|---|")
    for (scenario, ref, n), tools in by_key.items():
        def cell(key: str, fmt: str) -> str:
            return " / ".join("-" if t not in tools or tools[t][key] is None else format(tools[t][key], fmt)
                              for t in TOOLS)

        def worst(tool: str) -> str:
            counts = tools.get(tool, {}).get("wrong_columns", {})
            return ", ".join(f"{name} {count}" for name, count in list(counts.items())[:3]) or "-"

        print(f"| {scenario} | {ref:,} | {n:,} | {cell('flagged_per_100', '.0f')} | "
              f"{cell('wrong_columns_per_evaluation', '.2f')} | {cell('multivariate_per_100', '.0f')} | "
              f"{worst('evidently')}; {worst('nannyml')} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the peers' own venv (default: %(default)s)")
    parser.add_argument("--setup", action="store_true", help="create --venv and install the pinned peers into it")
    parser.add_argument("--runs", type=int, default=20, help="static evaluations per case (default: %(default)s)")
    parser.add_argument("--only", metavar="SCENARIO", help=f"one scenario of: {', '.join(scenarios())}")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--save", metavar="FILE", type=Path, help="keep every case's verdicts in FILE (JSON)")
    parser.add_argument("--load", metavar="FILE", type=Path, help="report from verdicts kept by --save")
    args = parser.parse_args(argv)
    if args.setup:
        return setup(args.venv)
    if args.only is not None and args.only not in scenarios():
        print(f"drift_peers: no scenario {args.only!r}; pick one of: {', '.join(scenarios())}", file=sys.stderr)
        return 2
    if args.runs < 1:
        print("drift_peers: --runs must be at least 1", file=sys.stderr)
        return 2
    if args.load:
        saved = json.loads(args.load.read_text())
        return _print(args, saved["conditions"], _verdicts_from_json(saved["verdicts"]))
    reason = missing(args.venv)
    if reason:
        print(reason)
        return 0
    picked = [args.only] if args.only else scenarios()
    started = time.perf_counter()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    references = {size: dq.reference(SEED, size) for size in REFERENCE_ROWS}
    with tempfile.TemporaryDirectory(prefix="drift-peers-") as tmp:
        folder = Path(tmp)
        manifest, cases = write_cases(folder, picked, args.runs, {s: r.raw for s, r in references.items()})
        log(f"{len(cases)} cases written ({time.perf_counter() - started:.0f} s); peers running")
        worker = start_worker(args.venv, manifest, folder / "worker.log")
        try:
            # Outrider's side runs meanwhile, in this process.
            verdicts = {"outrider": outrider_verdicts(picked, args.runs, references, log)}
            stdout, _ = worker.communicate()
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        if worker.returncode != 0:
            tail = (folder / "worker.log").read_text().strip().splitlines()[-1:] or ["no output"]
            print(f"drift_peers: the peer worker failed (exit {worker.returncode}): {tail[0]}", file=sys.stderr)
            return 1
        answer = json.loads(stdout)
    verdicts.update(peer_verdicts(answer, cases))
    conditions = {"runs": args.runs, "seed": SEED, "versions": answer["versions"], "cpus": os.cpu_count(),
                  "load_average": os.getloadavg()[0], "seconds": round(time.perf_counter() - started),
                  "outrider_defaults": dq.SHIPPED.to_dict()}
    if args.save:
        args.save.write_text(json.dumps({"conditions": conditions, "verdicts": _verdicts_to_json(verdicts)}))
    return _print(args, conditions, verdicts)


def _print(args: argparse.Namespace, conditions: dict, verdicts: dict[str, dict[Case, Verdict]]) -> int:
    rows_out = report(verdicts)
    if args.json:
        print(json.dumps({"conditions": conditions, "rows": rows_out}, indent=1))
        return 0
    print(f"drift peers: {conditions['seconds']} s on {conditions['cpus']} CPUs, load average "
          f"{conditions['load_average']:.2f}; {conditions['runs']} evaluations per case; "
          + ", ".join(f"{k} {v}" for k, v in conditions["versions"].items()))
    print_table(rows_out)
    return 0


def _verdicts_to_json(verdicts: dict[str, dict[Case, Verdict]]) -> dict:
    return {tool: [[c.scenario, c.reference, c.rows, c.run, sorted(v.columns), v.multivariate]
                   for c, v in per_case.items()] for tool, per_case in verdicts.items()}


def _verdicts_from_json(saved: dict) -> dict[str, dict[Case, Verdict]]:
    return {tool: {Case(s, ref, n, run): Verdict(set(columns), multivariate)
                   for s, ref, n, run, columns, multivariate in items} for tool, items in saved.items()}


if __name__ == "__main__":
    raise SystemExit(main())
