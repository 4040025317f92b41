"""MLServer 1.7.1 in a venv of its own: set it up, write a model folder for an ONNX file, start it.

    python benchmarks/serving.py --setup        # creates ROOT/.venv-mlserver (or $OUTRIDER_MLSERVER_VENV)

MLServer pins its own versions of FastAPI, uvicorn, grpcio and protobuf, so it never goes into the
project's venv. The model is served by ``_mlserver_runtime.OnnxRuntime`` (a small custom runtime:
MLServer 1.7 ships none for ONNX) with MLServer's default settings: only the ports are chosen here.
Benchmarks (``benchmarks/serving.py``) and issue 13's proxy tests start an upstream with ``start``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = Path(__file__).resolve().with_name("_mlserver_runtime.py")
VENV_ENV = "OUTRIDER_MLSERVER_VENV"
# uvloop 0.22 does not build against MLServer 1.7.1's pins here; onnxruntime as in the project's venv,
# so both servers run the same kernels.
PINS = ("mlserver==1.7.1", "uvloop<0.22")


def venv_path() -> Path:
    return Path(os.environ.get(VENV_ENV) or ROOT / ".venv-mlserver")


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_path()) / "bin" / "python"


def onnxruntime_pin() -> str:
    """onnxruntime as in the project's venv, so a peer server runs the same kernels."""
    try:
        return f"onnxruntime=={metadata.version('onnxruntime')}"
    except metadata.PackageNotFoundError:
        return "onnxruntime"


def pins() -> tuple[str, ...]:
    return (*PINS, onnxruntime_pin())


def missing(venv: Path | None = None) -> str | None:
    """Why MLServer cannot be started from the venv (one line with the fix), or None when it can."""
    venv = venv or venv_path()
    fix = f"set it up with: python benchmarks/serving.py --setup (venv: {venv}, or set {VENV_ENV})"
    python = venv_python(venv)
    if not python.exists():
        return f"MLServer not run: no venv at {venv} ({fix})"
    probe = subprocess.run([str(python), "-c", "import mlserver, onnxruntime; print(mlserver.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"MLServer not run: importing it in {venv} fails: {reason} ({fix})"
    return None


def setup(venv: Path | None = None) -> int:
    """Create the venv (python3 -m venv) and install the pinned MLServer and onnxruntime into it. Holds a
    lock file beside the venv meanwhile: test workers in parallel install one after the other (the later
    ones find everything installed), never two pips into one venv at once."""
    import fcntl

    venv = venv or venv_path()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _install(venv)


def _install(venv: Path) -> int:
    if not venv_python(venv).exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    wanted = pins()
    done = subprocess.run([str(venv_python(venv)), "-m", "pip", "install", *wanted])
    if done.returncode != 0:
        print(f"mlserver_env: pip could not install {' '.join(wanted)} into {venv} (see pip's output above)",
              file=sys.stderr)
        return 1
    reason = missing(venv)
    print(reason or f"mlserver_env: {' '.join(wanted)} installed into {venv}")
    return 1 if reason else 0


def free_port() -> int:
    """A port free now (MLServer takes fixed ports, not 0; a race with another process is unlikely here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_model_folder(folder: Path, model: bytes | Path | None, name: str, *, grpc_port: int, http_port: int,
                       metrics_port: int) -> Path:
    """``folder`` with settings.json (ports only: everything else MLServer's defaults), the model's
    model-settings.json (our runtime) and the model file (none when ``model`` is None). Returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RUNTIME, folder / RUNTIME.name)
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port}))
    if model is not None:
        _write_settings(folder, model, name, {})
    return folder


def write_version(folder: Path, model: bytes | Path, name: str, version: str) -> Path:
    """Version ``version`` of model ``name`` in MLServer's repository ``folder``: a folder of its own with a
    model-settings.json naming the version (``parameters.version``), as MLServer reads several versions of
    one model. MLServer's RepositoryModelLoad of ``name`` reads the repository again. Returns that folder."""
    return _write_settings(folder / f"{name}-v{version}", model, name, {"version": version})


def _write_settings(folder: Path, model: bytes | Path, name: str, parameters: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.onnx"
    if isinstance(model, bytes):
        target.write_bytes(model)
    else:
        shutil.copyfile(model, target)
    (folder / "model-settings.json").write_text(json.dumps({
        "name": name, "implementation": f"{RUNTIME.stem}.OnnxRuntime",
        "parameters": {"uri": f"./{target.name}", **parameters}}))
    return folder


@dataclass
class PeerServer:
    """A peer inference server started in a process group of its own: the process, its gRPC and HTTP
    addresses and its log (MLServer here; Triton in ``triton_env``)."""

    process: subprocess.Popen
    grpc_address: str
    http_address: str
    log: Path

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to its whole group (MLServer's inference-pool workers, Triton's backend stubs),
        SIGKILL after ``timeout``."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


class MLServer(PeerServer):
    """A running ``mlserver start``."""


def start(folder: Path, model: bytes | Path | None, name: str, *, venv: Path | None = None,
          timeout: float = 120.0, versions: dict[str, bytes | Path] | None = None) -> MLServer:
    """Write the model folder and start MLServer on it; returns once the model answers ModelReady over
    gRPC. ``versions``: versions of ``name`` to serve (``write_version``), instead of or beside ``model``.
    Raises RuntimeError (with the log's tail) when it exits or is not ready within ``timeout``."""
    python = venv_python(venv)
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    write_model_folder(folder, model, name, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port)
    for version, data in (versions or {}).items():
        write_version(folder, data, name, version)
    log = folder / "mlserver.log"
    env = {**os.environ, "PYTHONPATH": str(folder)}  # the runtime module, for the pool workers as well
    with log.open("wb") as out:
        process = subprocess.Popen([str(python.parent / "mlserver"), "start", str(folder)], cwd=folder,
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = MLServer(process, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", log)
    try:
        _wait_ready(server, name, timeout)
    except BaseException:
        server.stop(5)
        raise
    return server


def _wait_ready(server: MLServer, name: str, timeout: float) -> None:
    import grpc

    from protos import open_inference_pb2 as pb
    from protos import open_inference_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                break
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    tail = server.log.read_text(errors="replace").strip().splitlines()[-15:]
    state = f"exited with {server.process.returncode}" if server.process.poll() is not None else "not ready"
    raise RuntimeError(f"MLServer {state} after start (log {server.log}):\n" + "\n".join(tail))
