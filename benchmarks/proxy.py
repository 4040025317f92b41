"""What ``outrider agent proxy`` costs: the same clients straight to the upstream and through the proxy.

    python benchmarks/proxy.py [--upstream agent|mlserver|triton] [--protocols grpc,rest] [--clients 1,16]
                               [--batches 1,64] [--seconds 10]
                               [--rounds 2] [--relay] [--client python|cpp] [--json]

The upstream (20-feature logistic regression) is a real ``outrider agent serve`` (monitored, summary
helper process, no collector), a real MLServer 1.7.1 (``benchmarks/mlserver_env.py``: its venv, the
custom ONNX runtime, MLServer's default settings) or a real Triton 2.51 (``benchmarks/triton_env.py``: its venv,
the Python-backend model running onnxruntime, CPU only); the proxy a real ``outrider agent proxy`` in front of it
(monitoring the model: summary helper process, no collector). For each (clients, batch) a client process with
that many threads (each on its own connection) calls ModelInfer back to back for ``--seconds``,
once at the upstream ("direct") and once through the proxy, alternating over ``--rounds``. Reported
per configuration (medians of rounds): requests/s, p50 and p99 latency at the clients, failed
requests, CPU seconds per 1,000 requests of the upstream and of the proxy (each process with its
helpers), and the ratios proxy / direct. ``rest`` rows are the same over HTTP/REST: the upstream's
``--http-listen`` directly and the proxy's ``--http-listen`` (``--upstream-http``), from
``benchmarks/rest.py``'s plain ``http.client`` client (one kept-alive connection per thread) with the
binary tensor extension both ways, or JSON tensors for MLServer (its REST answers the extension with
HTTP 500). ``--relay`` adds ``grpc-relay`` and ``rest-relay`` rows: the same clients through the proxy's
``--relay-listen`` and ``--http-relay-listen`` (byte relays watched off the request path,
``agent/proxy_relay.py``), in the same alternating rounds, against the same direct figures. A client
whose first call fails stops at once saying why; later non-200 replies and broken
connections are counted as failed. ``--client cpp``: the gRPC rows' client is ``benchmarks/loadgen.py``'s
compiled one (built on demand; the same threads, each on its own connection), and the upstream's and the
proxy's CPU are read from its start to its end only. The clients' own CPU per 1,000 requests is reported
too (gRPC rows; the REST client does not measure its own).
Everything shares the machine's cores: the figures are ratios under the same load, not the machine's
ceiling.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import examples  # noqa: E402
from benchmarks import loadgen, mlserver_env, triton_env  # noqa: E402
from benchmarks.processes import CLIENT, tree_cpu  # noqa: E402

UPSTREAMS = ("agent", "mlserver", "triton")


def start(args: list[str], marker: str, found: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, str]:
    """The process, its gRPC address and its REST URL ("" without --http-listen); ``found["relay"]``: the
    address of agent proxy's --relay-listen, when it has one."""
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = ""
    for line in proc.stdout:
        if line.startswith("rest on "):  # agent serve --http-listen says so first
            url = line.split()[-1]
        if line.startswith(marker):
            if "; REST " in line:  # agent proxy --http-listen: on its one line
                url = line.split()[-1]
            for key, marker in (("relay", "; relay on "), ("rest-relay", "; REST relay on ")):
                if marker in line and found is not None:
                    found[key] = line.split(marker, 1)[1].split(";")[0].strip()
            return proc, line.split(" on ", 1)[1].split()[0], url
    raise RuntimeError(f"{args[:2]} did not start")


def clients(address: str, threads: int, seconds: float, batch: int,
            protocol: str = "grpc", tensors: str = "binary") -> tuple[list[float], int, float | None]:
    """``threads`` callers in one process for ``seconds``: sorted latencies, failed calls and the client's CPU
    seconds over its timed part (None: the REST client does not say). Over REST, ``tensors`` is "binary"
    (the binary tensor extension) or "json"."""
    if protocol == "rest":
        from benchmarks.rest import REST_CLIENT

        command = [REST_CLIENT, address, str(threads), str(seconds), str(batch), "20", tensors]
    else:
        command = [CLIENT, address, str(threads), str(seconds), str(batch), "20", "b"]
    done = subprocess.run([sys.executable, "-c", *command],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    first, latencies = done.stdout.split("\n", 1)  # both clients: failed calls (gRPC: and CPU), then latencies
    failed, *cpu = first.split()
    return sorted(float(v) for v in latencies.split()), int(failed), float(cpu[0]) if cpu else None


def cpp_clients(address: str, threads: int, seconds: float, batch: int,
                pids: tuple[int, ...]) -> tuple[list[float], int, float, list[float], list[float]]:
    """``clients`` over gRPC from loadgen: sorted latencies, failed calls, the clients' CPU seconds, and the CPU
    of the processes ``pids`` (each with its children) when the calls start and when they have all ended."""
    request = loadgen.infer_request("bench", batch, 20, request_id="b")
    with loadgen.Load(address, request, connections=threads, seconds=seconds) as load:  # connected, warmed up
        cpu0 = [tree_cpu(pid) for pid in pids]
        load.go()
        result = load.wait()
        cpu1 = [tree_cpu(pid) for pid in pids]
    return result.latencies.tolist(), result.failed, result.client_cpu_s, cpu0, cpu1


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _median(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def start_upstream(kind: str, tmp: Path, model: Path, rest: bool) -> tuple[subprocess.Popen, str, str,
                                                                              Callable[[], None]]:
    """The upstream's process (the root of its tree, for CPU), gRPC address, REST URL ("" without REST)
    and how to stop it."""
    if kind == "mlserver":
        reason = mlserver_env.missing()
        if reason:
            raise RuntimeError(reason)
        server = mlserver_env.start(tmp / "mlserver", model, "bench")
        return server.process, server.grpc_address, f"http://{server.http_address}", server.stop
    if kind == "triton":
        reason = triton_env.missing()
        if reason:
            raise RuntimeError(reason)
        server = triton_env.start(tmp / "triton", model, "bench")
        return server.process, server.grpc_address, f"http://{server.http_address}", server.stop
    upstream, address, url = start(["agent", "serve", "--model", str(model), "--model-name", "bench",
                                    "--listen", "127.0.0.1:0", "--workers", "16", "--spool-dir", str(tmp / "up"),
                                    *(["--http-listen", "127.0.0.1:0"] if rest else [])], "serving ")

    def stop() -> None:
        upstream.send_signal(signal.SIGTERM)
        upstream.wait(60)

    return upstream, address, url, stop


def run(client_counts: list[int], batches: list[int], seconds: float, rounds: int,
        protocols: tuple[str, ...] = ("grpc",), upstream_kind: str = "agent", client: str = "python",
        relay: bool = False) -> list[dict]:
    """Rows of (protocol, clients, batch); with ``relay``, rows come twice: through the proxy's --listen
    ("grpc") or --http-listen ("rest") and through its --relay-listen ("grpc-relay") or --http-relay-listen
    ("rest-relay"), in the same alternating rounds.
    ``client``: the gRPC rows' client, "python" (grpcio) or "cpp" (loadgen, built here when needed)."""
    if client == "cpp" and "grpc" in protocols:
        loadgen.build()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "bench.onnx"
        model.write_bytes(examples.logistic_regression())
        rest = "rest" in protocols
        upstream, upstream_address, upstream_url, stop_upstream = start_upstream(upstream_kind, Path(tmp), model, rest)
        found: dict[str, str] = {}
        try:
            proxy, proxy_address, proxy_url = start(
                ["agent", "proxy", "--upstream", upstream_address, "--model-name", "bench", "--listen", "127.0.0.1:0",
                 "--workers", "16", *(["--relay-listen", "127.0.0.1:0"] if relay else []),
                 *(["--http-relay-listen", "127.0.0.1:0"] if relay and rest else []),
                 *(["--upstream-http", upstream_url.split("//", 1)[1], "--http-listen", "127.0.0.1:0"] if rest
                   else [])],
                "proxying ", found)
        except BaseException:
            stop_upstream()
            raise
        results = []
        try:
            for protocol, threads, batch in itertools.product(protocols, client_counts, batches):
                targets = {"direct": upstream_address, "proxy": proxy_address} if protocol == "grpc" else \
                    {"direct": upstream_url, "proxy": proxy_url}
                if relay:
                    targets["relay"] = found["relay"] if protocol == "grpc" else f"http://{found['rest-relay']}"
                seen: dict[str, list[dict]] = {via: [] for via in targets}
                for _ in range(rounds):
                    for via, address in targets.items():
                        if protocol == "grpc" and client == "cpp":
                            latencies, failed, client_cpu, cpu0, cpu1 = cpp_clients(
                                address, threads, seconds, batch, (upstream.pid, proxy.pid))
                        else:
                            cpu0 = [tree_cpu(upstream.pid), tree_cpu(proxy.pid)]
                            # MLServer 1.7's REST answers the binary tensor extension with HTTP 500: JSON tensors
                            latencies, failed, client_cpu = clients(
                                address, threads, seconds, batch, protocol,
                                "json" if upstream_kind == "mlserver" else "binary")
                            cpu1 = [tree_cpu(upstream.pid), tree_cpu(proxy.pid)]
                        n = max(len(latencies), 1)
                        seen[via].append({"rps": len(latencies) / seconds, "p50": pct(latencies, 0.5) * 1e3,
                                          "p99": pct(latencies, 0.99) * 1e3, "failed": failed,
                                          "upstream_cpu_ms_per_1k": (cpu1[0] - cpu0[0]) / n * 1e6,
                                          "proxy_cpu_ms_per_1k": (cpu1[1] - cpu0[1]) / n * 1e6,
                                          "client_cpu_ms_per_1k": None if client_cpu is None else client_cpu / n * 1e6})
                medians = {}
                for via, runs in seen.items():
                    medians[via] = {k: _median([r[k] for r in runs]) for k in runs[0]}
                    medians[via]["failed"] = sum(r["failed"] for r in runs)
                for via in [v for v in seen if v != "direct"]:
                    way = protocol if via == "proxy" else f"{protocol}-relay"
                    row: dict = {"upstream": upstream_kind, "protocol": way,
                                 "client": client if protocol == "grpc" else "python", "clients": threads,
                                 "batch": batch, "direct": medians["direct"], "proxy": medians[via]}
                    row["ratio_p50"] = row["proxy"]["p50"] / row["direct"]["p50"]
                    row["ratio_rps"] = row["proxy"]["rps"] / row["direct"]["rps"]
                    results.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(60)
            stop_upstream()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", choices=UPSTREAMS, default="agent",
                        help="the inference server behind the proxy (mlserver, triton: their own venvs, see "
                             "mlserver_env.py, triton_env.py)")
    parser.add_argument("--protocols", default="grpc,rest")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--relay", action="store_true",
                        help="also through the proxy's --relay-listen and --http-relay-listen (rows 'grpc-relay', "
                             "'rest-relay', same rounds)")
    parser.add_argument("--client", choices=["python", "cpp"], default="python",
                        help="the gRPC rows' client: python (grpcio) or cpp (the compiled loadgen, "
                             "benchmarks/loadgen.py)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if why := loadgen.unbuildable(args.client):
        print(why, file=sys.stderr)
        return 2
    load = os.getloadavg()
    results = run([int(c) for c in args.clients.split(",")], [int(b) for b in args.batches.split(",")],
                  args.seconds, args.rounds, tuple(args.protocols.split(",")), args.upstream, args.client,
                  args.relay)
    if args.json:
        print(json.dumps({"load_average_before": load, "results": results}, indent=2))
        return 0
    print(f"upstream: {args.upstream}; load average before: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"after: {os.getloadavg()[0]:.1f}")
    print("| protocol | client | clients | batch | direct req/s | proxy req/s | direct p50 ms | proxy p50 ms | "
          "direct p99 ms | proxy p99 ms | failed | upstream CPU ms/1k req (direct, proxied) | proxy CPU ms/1k req | "
          "p50 ratio | throughput ratio | client CPU ms/1k req (direct, proxied) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    for r in results:
        d, p = r["direct"], r["proxy"]
        print(f"| {r['protocol']} | {r['client']} | {r['clients']} | {r['batch']} | {d['rps']:,.0f} | {p['rps']:,.0f} "
              f"| {d['p50']:.2f} | {p['p50']:.2f} "
              f"| {d['p99']:.2f} | {p['p99']:.2f} | {d['failed'] + p['failed']} | {d['upstream_cpu_ms_per_1k']:.0f}, "
              f"{p['upstream_cpu_ms_per_1k']:.0f} | {p['proxy_cpu_ms_per_1k']:.0f} | {r['ratio_p50']:.2f}x | "
              f"{r['ratio_rps']:.2f}x | {fmt(d['client_cpu_ms_per_1k'])}, {fmt(p['client_cpu_ms_per_1k'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
