"""The compiled gRPC client of the serving benchmarks (``benchmarks/loadgen/loadgen.cc``), from Python.

    python benchmarks/loadgen.py --install   # apt-get install its build dependencies (Debian's grpc++)
    python benchmarks/loadgen.py --build     # compile it (done on demand by build())

A Python client spends most of a core to keep a server busy; on a 2-core machine that core is the one a
second serving process needs. ``loadgen`` makes the same unary calls for a small share of that CPU.

    request = loadgen.infer_request("bench", batch=1, width=20)
    with loadgen.Load(address, request, processes=2, connections=4, seconds=10) as load:  # all warmed up
        cpu0 = server_cpu()
        load.go()                     # every process starts at this instant
        result = load.wait()          # the merged result; the server is idle from the last call on
        cpu1 = server_cpu()
    result.requests_per_s, result.p99_ms, result.cpu_us_per_request  # the clients' own CPU per request
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protos import open_inference_pb2 as pb  # noqa: E402

SOURCE = Path(__file__).resolve().with_name("loadgen") / "loadgen.cc"
BUILD = SOURCE.parent / "build"  # git-ignored
BINARY = BUILD / "loadgen"
PACKAGES = ("libgrpc++-dev", "protobuf-compiler-grpc", "pkg-config")
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
READY_TIMEOUT = 120.0  # connect and warm up; a hang guard only


class Missing(RuntimeError):
    """grpc++ (or a C++ compiler) is not installed: the message says which packages to install."""


def missing() -> str | None:
    """Why loadgen cannot be built here, in one line, or None."""
    absent = [tool for tool in ("g++", "pkg-config") if shutil.which(tool) is None]
    if not absent and subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode != 0:
        absent = ["grpc++ (pkg-config grpc++)"]
    if not absent:
        return None
    return (f"the C++ load generator needs {' and '.join(absent)}: apt-get install -y {' '.join(_packages())} "
            f"(or python benchmarks/loadgen.py --install)")


def _packages() -> tuple[str, ...]:
    return PACKAGES + (("g++",) if shutil.which("g++") is None else ())


def unbuildable(client: str) -> str | None:
    """For a benchmark's ``--client``: None when it is "python", or "cpp" and loadgen builds; else why not, in
    one line (the benchmark exits 2 with it)."""
    if client != "cpp":
        return None
    try:
        build()
    except Missing as exc:
        return str(exc)
    return None


def build() -> Path:
    """The loadgen binary, compiled into ``benchmarks/loadgen/build/`` when the source is newer than it."""
    BUILD.mkdir(exist_ok=True)
    with open(BUILD / ".lock", "w") as lock:  # parallel test workers build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
            return BINARY
        reason = missing()
        if reason:
            raise Missing(reason)
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True,
                               check=True).stdout
        partial = BUILD / f"loadgen.{os.getpid()}"
        done = subprocess.run(["g++", "-O2", "-std=c++17", "-o", str(partial), str(SOURCE), *shlex.split(flags)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE} failed:\n{done.stderr}")
        partial.replace(BINARY)
        return BINARY


def install() -> int:
    """apt-get install the packages loadgen builds with (sudo when not root)."""
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *_packages()]):
        code = subprocess.run([*sudo, *argv], env=env).returncode
        if code:
            return code
    return 0


def infer_request(model: str, batch: int, width: int, *, seed: int = 0, input_name: str = "X",
                  request_id: str = "") -> pb.ModelInferRequest:
    """A ModelInfer request of ``batch`` standard-normal float32 rows of ``width`` (raw input contents)."""
    x = np.random.default_rng(seed).standard_normal((batch, width)).astype("<f4")
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name=input_name, datatype="FP32", shape=[batch, width])
    request.raw_input_contents.append(x.tobytes())
    return request


@dataclass
class Result:
    """The merged result of every loadgen process: calls answered OK, failures by gRPC status code name,
    the latencies of the OK calls (seconds, sorted), and the clients' own CPU over the timed part."""
    requests: int
    failures: dict[str, int]
    requests_per_s: float
    latencies: np.ndarray = field(repr=False)
    client_cpu_s: float
    wall_s: float
    first_failure: str | None = None

    def percentile_ms(self, q: float) -> float | None:
        n = len(self.latencies)
        return float(self.latencies[min(n - 1, int(q * n))]) * 1e3 if n else None

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def p50_ms(self) -> float | None:
        return self.percentile_ms(0.5)

    @property
    def p90_ms(self) -> float | None:
        return self.percentile_ms(0.9)

    @property
    def p99_ms(self) -> float | None:
        return self.percentile_ms(0.99)

    @property
    def max_ms(self) -> float | None:
        return float(self.latencies[-1]) * 1e3 if len(self.latencies) else None

    @property
    def cpu_us_per_request(self) -> float | None:
        """The clients' CPU per call made (OK or not)."""
        calls = self.requests + self.failed
        return self.client_cpu_s / calls * 1e6 if calls else None

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "failures": self.failures, "requests_per_s": self.requests_per_s,
                "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms,
                "client_cpu_s": self.client_cpu_s, "client_cpu_us_per_request": self.cpu_us_per_request,
                "wall_s": self.wall_s}


class Load:
    """``processes`` loadgen processes with ``connections`` threads each (every one its own connection)
    calling ``method`` on ``address`` with ``request`` for ``seconds``. Constructing starts them and
    returns once every one has warmed up (a failed warm-up: RuntimeError with its reason); ``go()``
    starts the timed part in all of them at one instant; ``wait()`` merges their results."""

    def __init__(self, address: str, request: pb.ModelInferRequest | bytes, *, processes: int = 1,
                 connections: int = 1, seconds: float = 5.0, warmup: int = 1, method: str = MODEL_INFER) -> None:
        binary = build()
        self.seconds = seconds
        self._dir = tempfile.TemporaryDirectory(prefix="outrider-loadgen-")
        work = Path(self._dir.name)
        body = request if isinstance(request, bytes) else request.SerializeToString()
        (work / "request.bin").write_bytes(body)
        self._latency_files = [work / f"latencies.{i}" for i in range(processes)]
        self._errors = [tempfile.TemporaryFile(mode="w+") for _ in range(processes)]
        self.procs = [subprocess.Popen([str(binary), "--target", address, "--method", method,
                                        "--request", str(work / "request.bin"), "--connections", str(connections),
                                        "--warmup", str(warmup), "--seconds", str(seconds),
                                        "--latencies", str(path)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
                      for path, err in zip(self._latency_files, self._errors)]
        try:
            for proc, err in zip(self.procs, self._errors):
                line = _read_line(proc, READY_TIMEOUT)
                if line != "ready\n":
                    raise RuntimeError(self._why(proc, err, line))
        except BaseException:
            self.close()
            raise

    def go(self) -> None:
        for proc in self.procs:
            proc.stdin.write("go\n")  # type: ignore[union-attr]
        for proc in self.procs:
            proc.stdin.flush()  # type: ignore[union-attr]

    def wait(self) -> Result:
        answers = []
        for proc, err in zip(self.procs, self._errors):
            line = _read_line(proc, self.seconds + READY_TIMEOUT)
            if not line.startswith("{"):
                raise RuntimeError(self._why(proc, err, line))
            answers.append(json.loads(line))
            proc.wait(30)
        latencies = np.sort(np.concatenate([np.fromfile(path, dtype="<f8") for path in self._latency_files]))
        failures: dict[str, int] = {}
        for answer in answers:
            for code, n in answer["failures"].items():
                failures[code] = failures.get(code, 0) + n
        return Result(requests=sum(a["requests"] for a in answers), failures=failures,
                      requests_per_s=sum(a["requests_per_s"] for a in answers), latencies=latencies,
                      client_cpu_s=sum(a["cpu_s"] for a in answers), wall_s=max(a["wall_s"] for a in answers),
                      first_failure=next((a["first_failure"] for a in answers if a["first_failure"]), None))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                stream.close()  # type: ignore[union-attr]
        for err in self._errors:
            err.close()
        self._dir.cleanup()

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _why(proc: subprocess.Popen, err: Any, line: str) -> str:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.seek(0)
        said = err.read().strip() or line.strip() or "no output"
        return f"loadgen exited ({proc.returncode}): {said}"


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One stdout line, or '' when the process ends or ``timeout`` passes first (a hang guard)."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        if not selector.select(timeout):
            proc.kill()
            return ""
    return proc.stdout.readline()  # type: ignore[union-attr]


def run(address: str, request: pb.ModelInferRequest | bytes, **options: Any) -> Result:
    """Start, go and wait in one call (when nothing is to be read between go and the end)."""
    with Load(address, request, **options) as load:
        load.go()
        return load.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help=f"apt-get install {' '.join(PACKAGES)}")
    parser.add_argument("--build", action="store_true", help="compile loadgen (when its source is newer)")
    args = parser.parse_args()
    if args.install:
        return install()
    try:
        print(build())
    except Missing as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
