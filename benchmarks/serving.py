"""`agent serve` side by side with the floor (plain grpcio + onnxruntime) and MLServer 1.7.1, in one run.

    python benchmarks/serving.py --setup     # once: MLServer into ROOT/.venv-mlserver ($OUTRIDER_MLSERVER_VENV)
    python benchmarks/serving.py [--models lr,mlp,forest] [--batches 1,64] [--clients 1,4,16]
                                 [--variants floor,agent,agent-no-monitoring,agent-processes-2,floor-processes-2,
                                             mlserver]
                                 [--seconds 3] [--rounds 2] [--client python|cpp] [--json]

Variants, each a real server in processes of its own on 127.0.0.1 (no collector anywhere):
- ``floor``: ``benchmarks/_floor_server.py``, a plain grpcio server on our OIP protos that decodes the
  raw input, runs onnxruntime with ``agent serve``'s default session options and encodes the reply;
- ``agent``: ``outrider agent serve`` with its defaults (monitored: summary helper process), 1 process;
- ``agent-no-monitoring``: the same with ``--no-monitoring``;
- ``agent-processes-2``: ``--processes 2`` (supervisor, 2 serving processes, their helpers);
- ``floor-processes-2``: two floor servers on one port (SO_REUSEPORT), one the other's child: what two
  processes give on this machine with nothing but onnxruntime in them (ratios stay to the one-process floor);
- ``mlserver``: MLServer 1.7.1 with default settings and ``_mlserver_runtime.OnnxRuntime`` (same session
  options), from its own venv (``benchmarks/mlserver_env.py``); skipped with one line when that is missing.

Clients: a pool of ``max(--clients)`` processes started once, each with one ``tritonclient.grpc``
client per server (its own connection), calling ModelInfer back to back with float32 rows; a cell
with k clients uses k of them, all starting at the same instant. ``--client cpp``: instead, per cell
one ``benchmarks/loadgen.py`` process (the compiled client, built on demand) with k connections, the
same request; the server's CPU is read when it starts them all and when they have all ended. Per round and model every variant
is started, runs every (batch, clients) cell, and is stopped; the order of the variants alternates
between rounds. Per cell: requests/s, p50/p99 seen by the clients, CPU per request of the server's
whole process tree (main process and children: the agent's helpers and processes, MLServer's
inference-pool workers) from /proc, its ratio to the floor of the same round, rows dropped (the
agent's ``outrider_agent_rows_dropped`` on /metrics, before vs after the cell; in the JSON, ``skipped_rows``: of
those, the rows its summary worker failed on), the clients' own CPU
per request (what the load cost: Python's is several times the compiled one's), the server tree's voluntary
context switches per request (threads blocking and being woken: they are most of a small model's CPU per
request, and their count moves from run to run of the same server, so read a CPU gap beside it) and the 1-minute load
average (this benchmark's own clients and servers included: compare it with the load before the run). The summary gives medians over rounds (ratios: the median of per-round ratios). Clients
and servers share the machine's cores: the figures compare servers under the same load; they are
not the machine's ceiling.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import examples  # noqa: E402
from benchmarks import loadgen, mlserver_env  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
NAME = "bench"
WIDTH = 20
MODELS = ("lr", "mlp", "forest")
VARIANTS = ("floor", "agent", "agent-no-monitoring", "agent-processes-2", "floor-processes-2", "mlserver")
FLOOR = Path(__file__).resolve().with_name("_floor_server.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# One client process: one tritonclient.grpc client (connection) per server address, kept for the run.
# Reads a JSON command per line, answers with one JSON line of its latencies.
CLIENT = r"""
import json, sys, time
import numpy as np
import tritonclient.grpc as tc
clients, inputs = {}, {}
for line in sys.stdin:
    cmd = json.loads(line)
    address, batch = cmd["address"], cmd["batch"]
    client = clients.get(address) or clients.setdefault(address, tc.InferenceServerClient(address))
    if batch not in inputs:
        x = np.random.default_rng(batch).standard_normal((batch, cmd["width"])).astype(np.float32)
        inputs[batch] = tc.InferInput("X", [batch, cmd["width"]], "FP32")
        inputs[batch].set_data_from_numpy(x)
    request = [inputs[batch]]
    errors, latencies = 0, []
    try:
        client.infer(cmd["model"], request)  # connects and warms up before the timed part
    except Exception as exc:
        errors += 1
        first_error = str(exc)
    else:
        first_error = None
    now = time.time()
    if cmd["start"] > now:
        time.sleep(cmd["start"] - now)
    end = cmd["start"] + cmd["seconds"]
    clock = time.perf_counter
    while time.time() < end:
        t0 = clock()
        try:
            client.infer(cmd["model"], request)
        except Exception as exc:
            errors += 1
            first_error = first_error or str(exc)
            continue
        latencies.append(clock() - t0)
    print(json.dumps({"latencies": latencies, "errors": errors, "first_error": first_error}), flush=True)
"""


# ------------------------------------------------------------------ measuring processes

def tree_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of ``pid`` and of all its live descendants."""
    own, children, stack = 0.0, 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / TICKS
            if p == pid:
                own += cpu
            else:
                children += cpu
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return own, children


def tree_switches(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` and of its live descendants: a thread that
    blocks (the GIL, a lock, a queue, the completion queue) and is woken again. Each costs the serving
    process CPU (~17 us on the 2-core VM of benchmarks/README), and their count per request varies from
    run to run of the same server, so a CPU-per-request gap is read beside it."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ------------------------------------------------------------------ the models

def model_bytes(name: str) -> bytes:
    if name == "lr":
        return examples.logistic_regression(WIDTH)
    if name == "forest":
        return examples.random_forest(WIDTH)
    if name == "mlp":
        from sklearn.neural_network import MLPClassifier

        x, y = examples.tabular_data(n_features=WIDTH)
        mlp = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=200, random_state=0).fit(x, y)
        return examples._to_onnx(mlp, x[:1], zipmap=False)
    raise ValueError(f"unknown model {name!r}: one of {', '.join(MODELS)}")


# ------------------------------------------------------------------ the servers

@dataclass
class Server:
    variant: str
    address: str
    pid: int
    stop: Callable[[], None]
    metrics_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def dropped_rows(self) -> tuple[int, int] | None:
        """Rows the agent did not summarise over its life, and of those the ones its summary worker
        failed on (the rest were never copied); None: no monitoring, or no /metrics."""
        if self.metrics_url is None:
            return None
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()

        def counter(name: str) -> int | None:
            values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
            return int(sum(values)) if values else None

        dropped, skipped = counter("outrider_agent_rows_dropped"), counter("outrider_agent_rows_skipped")
        return None if dropped is None else (dropped, skipped or 0)


def _popen(argv: list[str], cwd: Path) -> subprocess.Popen:
    """The server in its own session, its stderr kept in ``cwd/stderr.log`` (what a failed cell shows)."""
    with open(cwd / "stderr.log", "w") as err:
        return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True, env=ENV,
                                start_new_session=True)


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _read_until(proc: subprocess.Popen, patterns: dict[str, str], what: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in proc.stdout:  # type: ignore[union-attr]
        for key, pattern in patterns.items():
            match = re.search(pattern, line)
            if match:
                found[key] = match.group(1)
        if "address" in found:
            break
    if "address" not in found:
        _terminate(proc)
        raise RuntimeError(f"{what} exited before it served")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
    return found


def _state(server: Server, work: Path) -> str:
    """Whether ``server``'s process is alive and listening, and the end of its stderr: what a failed cell says."""
    alive = Path(f"/proc/{server.pid}").exists()
    port = server.address.rsplit(":", 1)[1]
    if shutil.which("ss"):
        found = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout.strip()
        listening = "listening" if found else "not listening"
    else:
        listening = "(ss is not installed to tell whether it listens)"
    log_file = work / "stderr.log"
    tail = log_file.read_text()[-2000:].strip() if log_file.exists() else ""
    return f"process {server.pid} {'alive' if alive else 'gone'}, port {port} {listening}; stderr: {tail or '(empty)'}"


def start_server(variant: str, model: Path, tmp: Path) -> Server:
    if variant in ("floor", "floor-processes-2"):
        proc = _popen([sys.executable, str(FLOOR), str(model), NAME,
                       *(["--processes", "2"] if variant == "floor-processes-2" else [])], tmp)
        found = _read_until(proc, {"address": r"listening on (\S+)"}, "the floor server")
        return Server(variant, found["address"], proc.pid, lambda: _terminate(proc))
    if variant == "mlserver":
        ml = mlserver_env.start(tmp / "mlserver", model, NAME)
        return Server(variant, ml.grpc_address, ml.process.pid, ml.stop)
    argv = [sys.executable, "-m", "agent.cli", "agent", "serve", "--model", str(model), "--model-name", NAME,
            "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--spool-dir", str(tmp / "spool")]
    argv += {"agent": [], "agent-no-monitoring": ["--no-monitoring"],
             "agent-processes-2": ["--processes", "2"]}[variant]
    proc = _popen(argv, tmp)
    found = _read_until(proc, {"address": rf"serving {NAME} version \S+ on (\S+)", "metrics": r"metrics on (\S+)"},
                        f"agent serve ({variant})")
    monitored = variant != "agent-no-monitoring"
    return Server(variant, found["address"], proc.pid, lambda: _terminate(proc),
                  metrics_url=found.get("metrics") if monitored else None)


# ------------------------------------------------------------------ the clients

class Clients:
    """``n`` client processes, started once for the whole run."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=ENV) for _ in range(n)]

    def run(self, k: int, address: str, batch: int, seconds: float,
            start: float) -> tuple[list[float], int, str | None]:
        """k clients call ``address`` for ``seconds`` from ``start`` (time.time()) on; (latencies, errors,
        first error)."""
        command = json.dumps({"address": address, "model": NAME, "batch": batch, "width": WIDTH, "start": start,
                              "seconds": seconds}) + "\n"
        for proc in self.procs[:k]:
            proc.stdin.write(command)  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        return self._collect(k)

    def _collect(self, k: int) -> tuple[list[float], int, str | None]:
        latencies: list[float] = []
        errors, first = 0, None
        for proc in self.procs[:k]:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError("a client process died")
            answer = json.loads(line)
            latencies += answer["latencies"]
            errors += answer["errors"]
            first = first or answer["first_error"]
        return latencies, errors, first

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.close()  # type: ignore[union-attr]
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def measure(server: Server, clients: Clients | None, k: int, batch: int, seconds: float) -> dict[str, Any]:
    """One cell: ``clients`` (None: one loadgen process with k connections)."""
    dropped0 = server.dropped_rows()
    if clients is None:
        latencies, errors, first_error, result = _measure_cpp(server, k, batch, seconds)
    else:
        latencies, errors, first_error, result = _measure_python(server, clients, k, batch, seconds)
    n = len(latencies)
    own = result["cpu1"][0] - result["cpu0"][0]
    children = result["cpu1"][1] - result["cpu0"][1]
    dropped1 = server.dropped_rows()
    return {
        "requests": n, "errors": errors, "first_error": first_error,
        "requests_per_s": n / seconds,
        "p50_ms": latencies[n // 2] * 1e3 if n else None,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1e3 if n else None,
        "cpu_us_per_request": (own + children) / n * 1e6 if n else None,
        "cpu_us_per_request_children": children / n * 1e6 if n else None,
        "server_cores_busy": (own + children) / seconds,
        "switches_per_request": (result["switches1"] - result["switches0"]) / n if n else None,
        "client_cpu_us_per_request": result["client_cpu"] / n * 1e6 if n else None,
        "dropped_rows": None if dropped0 is None or dropped1 is None else dropped1[0] - dropped0[0],
        "skipped_rows": None if dropped0 is None or dropped1 is None else dropped1[1] - dropped0[1],
        "load_average": round(os.getloadavg()[0], 2),
    }


def _measure_python(server: Server, clients: Clients, k: int, batch: int,
                    seconds: float) -> tuple[list[float], int, str | None, dict[str, Any]]:
    result: dict[str, Any] = {}
    start = time.time() + 0.5 + 0.05 * k  # every client connected (one warm-up call) by then
    pids = [proc.pid for proc in clients.procs[:k]]

    def sample() -> None:  # CPU at the clients' start and end instants
        time.sleep(max(0.0, start - time.time()))
        result["cpu0"], client0 = tree_cpu(server.pid), sum(sum(tree_cpu(p)) for p in pids)
        result["switches0"] = tree_switches(server.pid)
        time.sleep(max(0.0, start + seconds - time.time()))
        result["cpu1"] = tree_cpu(server.pid)
        result["switches1"] = tree_switches(server.pid)
        result["client_cpu"] = sum(sum(tree_cpu(p)) for p in pids) - client0

    sampler = threading.Thread(target=sample)
    sampler.start()
    latencies, errors, first_error = clients.run(k, server.address, batch, seconds, start)
    sampler.join()
    return sorted(latencies), errors, first_error, result


def _measure_cpp(server: Server, k: int, batch: int,
                 seconds: float) -> tuple[list[float], int, str | None, dict[str, Any]]:
    request = loadgen.infer_request(NAME, batch, WIDTH, seed=batch)  # the Python clients' rows
    with loadgen.Load(server.address, request, connections=k, seconds=seconds) as load:  # connected, warmed up
        cpu0, switches0 = tree_cpu(server.pid), tree_switches(server.pid)
        load.go()
        done = load.wait()
        cpu1, switches1 = tree_cpu(server.pid), tree_switches(server.pid)
    return (done.latencies.tolist(), done.failed, done.first_failure,
            {"cpu0": cpu0, "cpu1": cpu1, "switches0": switches0, "switches1": switches1,
             "client_cpu": done.client_cpu_s})


# ------------------------------------------------------------------ the run

def run(models: list[str], batches: list[int], client_counts: list[int], variants: list[str], seconds: float,
        rounds: int, log: Callable[[str], None] = print, client: str = "python") -> dict[str, Any]:
    """Every cell of the grid, ``rounds`` times with the variants' order alternating; rows and summary.
    ``client``: "python" (tritonclient processes) or "cpp" (loadgen, built here when needed)."""
    skipped: dict[str, str] = {}
    if "mlserver" in variants:
        reason = mlserver_env.missing()
        if reason:
            log(reason)
            skipped["mlserver"] = reason
            variants = [v for v in variants if v != "mlserver"]
    rows: list[dict[str, Any]] = []
    retried = 0  # cells measured again after a failure (said in the log and the conditions)
    if client == "cpp":
        loadgen.build()
    clients = Clients(max(client_counts)) if client == "python" else None
    try:
        with tempfile.TemporaryDirectory(prefix="outrider-serving-") as tmp:
            paths = {}
            for m in models:
                paths[m] = Path(tmp) / f"{m}.onnx"
                paths[m].write_bytes(model_bytes(m))
            for r in range(rounds):
                for m in models:
                    for v in (variants if r % 2 == 0 else variants[::-1]):
                        work = Path(tempfile.mkdtemp(prefix=f"{v}-", dir=tmp))
                        server = start_server(v, paths[m], work)
                        try:
                            for b in batches:
                                for k in client_counts:
                                    try:
                                        measured = measure(server, clients, k, b, seconds)
                                    except RuntimeError as exc:  # e.g. a client that could not connect
                                        log(f"{v} {m} batch {b} x {k}: {exc} ({_state(server, work)}); "
                                            "measuring the cell again")
                                        retried += 1
                                        measured = measure(server, clients, k, b, seconds)
                                    row = {"round": r, "model": m, "batch": b, "clients": k, "variant": v,
                                           **measured}
                                    rows.append(row)
                                    log(json.dumps(row))
                        finally:
                            server.stop()
    finally:
        if clients is not None:
            clients.close()
    return {"conditions": {**conditions(seconds, rounds), "client": client, "cells_measured_again": retried},
            "skipped": skipped, "rows": rows,
            "summary": summarise(rows)}


def conditions(seconds: float, rounds: int) -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "seconds_per_cell": seconds, "rounds": rounds,
            "python": platform.python_version(), "load_average_at_end": [round(v, 2) for v in os.getloadavg()]}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    floor = {(r["round"], r["model"], r["batch"], r["clients"]): r for r in rows if r["variant"] == "floor"}
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["batch"], r["clients"], r["variant"]), []).append(r)
    out = []
    for (m, b, k, v), mine in cells.items():
        def median(key: str, rs: list[dict[str, Any]] = mine) -> float | None:
            values = [r[key] for r in rs if r[key] is not None]
            return statistics.median(values) if values else None

        ratios = []
        for r in mine:
            base = floor.get((r["round"], m, b, k))
            if base and base["requests_per_s"]:
                ratios.append(r["requests_per_s"] / base["requests_per_s"])
        dropped = [r["dropped_rows"] for r in mine if r["dropped_rows"] is not None]
        out.append({"model": m, "batch": b, "clients": k, "variant": v,
                    **{key: median(key) for key in ("requests_per_s", "p50_ms", "p99_ms", "cpu_us_per_request",
                                                    "cpu_us_per_request_children", "client_cpu_us_per_request",
                                                    "switches_per_request", "load_average")},
                    "ratio_to_floor": statistics.median(ratios) if ratios else None,
                    "dropped_rows": sum(dropped) if dropped else None,
                    "errors": sum(r["errors"] for r in mine)})
    return out


def table(result: dict[str, Any]) -> str:
    c = result["conditions"]
    lines = [f"{c['cpu']}, {c['cores']} cores; {c['seconds_per_cell']:g} s per cell, {c['rounds']} rounds "
             f"(medians); {c.get('client', 'python')} clients; load average at the end {c['load_average_at_end']}",
             f"{'model':>6} {'batch':>5} {'clients':>7} {'variant':>19} {'req/s':>8} {'vs floor':>8} {'p50 ms':>7} "
             f"{'p99 ms':>7} {'CPU µs/req':>10} {'(children)':>10} {'dropped':>7} {'errors':>6} {'load':>5} "
             f"{'client µs/req':>13} {'switches/req':>12}"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for s in result["summary"]:
        lines.append(f"{s['model']:>6} {s['batch']:>5} {s['clients']:>7} {s['variant']:>19} "
                     f"{fmt(s['requests_per_s'], '8.0f')} {fmt(s['ratio_to_floor'], '8.2f')} "
                     f"{fmt(s['p50_ms'], '7.2f')} {fmt(s['p99_ms'], '7.2f')} {fmt(s['cpu_us_per_request'], '10.0f')} "
                     f"{fmt(s['cpu_us_per_request_children'], '10.0f')} {fmt(s['dropped_rows'], '>7')} "
                     f"{s['errors']:>6} {fmt(s['load_average'], '5.2f')} "
                     f"{fmt(s['client_cpu_us_per_request'], '13.0f')} {fmt(s['switches_per_request'], '12.1f')}")
    for reason in result["skipped"].values():
        lines.append(reason)
    return "\n".join(lines)


def _list(kind: Callable[[str], Any], allowed: tuple | None = None) -> Callable[[str], list]:
    def parse(text: str) -> list:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(allowed or ('numbers',))}")
        return values
    return parse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create the MLServer venv and exit")
    parser.add_argument("--models", type=_list(str, MODELS), default=list(MODELS))
    parser.add_argument("--batches", type=_list(int), default=[1, 64])
    parser.add_argument("--clients", type=_list(int), default=[1, 4, 16])
    parser.add_argument("--variants", type=_list(str, VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seconds", type=float, default=3.0, help="timed part of each cell")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client", choices=["python", "cpp"], default="python",
                        help="python: tritonclient processes; cpp: the compiled loadgen (benchmarks/loadgen.py)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.setup:
        return mlserver_env.setup()
    if why := loadgen.unbuildable(args.client):
        print(why, file=sys.stderr)
        return 2
    quiet = (lambda _: None) if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    result = run(args.models, args.batches, args.clients, args.variants, args.seconds, args.rounds, log=quiet,
                 client=args.client)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
