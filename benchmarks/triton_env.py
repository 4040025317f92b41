"""NVIDIA Triton in a venv of its own: set it up, write a model repository for an ONNX file, start it.

    python benchmarks/triton_env.py --setup     # creates ROOT/.venv-triton (or $OUTRIDER_TRITON_VENV)

The server is the ``tritonserver`` binary (Triton 2.51) that the PyPI wheel ``nvidia-pytriton`` 0.7.0 bundles
with Triton's Python backend and the shared libraries both need; it is started directly, pytriton's own
Python API is not used, so the wheel goes in ``--no-deps`` (its dependencies are that API's). No GPU: the
model runs on CPU instances, and Triton's CUDA parts only log that there is no driver.

The model is a Python-backend model (``_triton_model.py``, one per version folder) running the ONNX file
with onnxruntime, the same version as the project's venv has, as ``mlserver_env`` pins it. Its
``config.pbtxt`` is written from the ONNX file: the same input and output names, datatypes and shapes
(``max_batch_size: 0``, so the batch dimension is the model's own ``-1``). Triton runs with
``--model-control-mode=explicit`` and the model loaded at start, so the OIP model-repository extension
(RepositoryIndex, RepositoryModelLoad/Unload) is live; ``version_policy: all`` loads every version folder.

What the Python backend's stub needs, found out here (the wheel keeps one stub per Python version apart):
the stub built for the venv's Python beside ``libtriton_python.so`` (``start`` links both, with
``triton_python_backend_utils.py``, into a backend directory of its own); that Python's ``libpython``
(``LD_LIBRARY_PATH``: the venv's base interpreter's LIBDIR, then the wheel's ``nvidia_pytriton.libs``);
the venv's ``bin`` first on ``PATH`` (the embedded interpreter finds its prefix by the ``python3`` there,
so the venv's packages); and NumPy 1 (the stubs are built against it: under NumPy 2 they answered every
tensor with no bytes at all, and no error). Shared memory: Python-backend defaults (a 1 MiB region in
/dev/shm per model instance, grown by 1 MiB), named with a UUID, so parallel servers do not collide.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/triton_env.py --setup
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.mlserver_env import PeerServer, free_port, onnxruntime_pin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_PY = Path(__file__).resolve().with_name("_triton_model.py")
VENV_ENV = "OUTRIDER_TRITON_VENV"
PYTRITON = "nvidia-pytriton==0.7.0"
# NumPy 1 for the Python-backend stub (see above); onnxruntime as in the project's venv.
PINS = ("numpy<2",)
# onnxruntime's type strings -> Triton's config datatypes.
ONNX_TO_CONFIG = {"tensor(float)": "TYPE_FP32", "tensor(double)": "TYPE_FP64", "tensor(float16)": "TYPE_FP16",
                  "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(int16)": "TYPE_INT16",
                  "tensor(int8)": "TYPE_INT8", "tensor(uint64)": "TYPE_UINT64", "tensor(uint32)": "TYPE_UINT32",
                  "tensor(uint16)": "TYPE_UINT16", "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL",
                  "tensor(string)": "TYPE_STRING"}
# What the venv's Python says about itself: where its packages and its libpython are.
PROBE = ("import json, sys, sysconfig, numpy, onnxruntime; v = sysconfig.get_config_var; print(json.dumps({"
         "'python': f'{sys.version_info[0]}.{sys.version_info[1]}', 'site': sysconfig.get_paths()['purelib'], "
         "'libdir': v('LIBDIR') or '', 'libpython': v('INSTSONAME') or '', 'numpy': numpy.__version__}))")


def venv_path() -> Path:
    return Path(os.environ.get(VENV_ENV) or ROOT / ".venv-triton")


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_path()) / "bin" / "python"


def pins() -> tuple[str, ...]:
    return (*PINS, onnxruntime_pin())


@dataclass(frozen=True)
class Layout:
    """Where the venv's Triton pieces are."""

    venv: Path
    server: Path     # bin/tritonserver
    backend: Path    # backends/python: libtriton_python.so, triton_python_backend_utils.py (no stub)
    stub: Path       # the Python-backend stub built for the venv's Python
    libs: Path       # nvidia_pytriton.libs: the shared libraries the wheel bundles
    libpython: Path  # the venv's base interpreter's LIBDIR

    def environment(self) -> dict[str, str]:
        """Triton's environment: the stub's Python is the venv's (see the module's docstring)."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(self.libpython), str(self.libs),
                                                       env.get("LD_LIBRARY_PATH", "")) if p)
        return env


def layout(venv: Path | None = None) -> Layout | str:
    """The venv's Layout, or why there is none (one line with the fix)."""
    venv = venv or venv_path()
    fix = f"set it up with: python benchmarks/triton_env.py --setup (venv: {venv}, or set {VENV_ENV})"
    python = venv_python(venv)
    if not python.exists():
        return f"Triton not run: no venv at {venv} ({fix})"
    probe = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"Triton not run: importing numpy and onnxruntime in {venv} fails: {reason} ({fix})"
    found = json.loads(probe.stdout)
    if not found["numpy"].startswith("1."):
        return f"Triton not run: {venv} has numpy {found['numpy']}; the Python-backend stub needs numpy<2 ({fix})"
    site = Path(found["site"])
    tree = site / "pytriton" / "tritonserver"
    pieces = Layout(venv, tree / "bin" / "tritonserver", tree / "backends" / "python",
                    tree / "python_backend_stubs" / found["python"] / "triton_python_backend_stub",
                    site / "nvidia_pytriton.libs", Path(found["libdir"]))
    if not (pieces.server.exists() and (pieces.backend / "libtriton_python.so").exists()):
        return f"Triton not run: {PYTRITON}'s tritonserver and Python backend are not in {venv} ({fix})"
    if not pieces.stub.exists():
        return (f"Triton not run: {PYTRITON} has no Python-backend stub for the venv's Python {found['python']} "
                f"(it has 3.8 to 3.13): make the venv with one of those ({fix})")
    return pieces


def missing(venv: Path | None = None) -> str | None:
    """Why Triton cannot be started from the venv (one line with the fix), or None when it can."""
    found = layout(venv)
    if isinstance(found, str):
        return found
    env = found.environment()
    # Each binary run bare: a library the loader cannot find fails it before main (exit 127) saying which.
    for binary, args in ((found.server, ["--help"]), (found.stub, [])):
        ran = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env)
        if "error while loading shared libraries" in ran.stderr or ran.returncode == 127:
            reason = (ran.stderr.strip().splitlines() or [f"exit {ran.returncode}"])[-1]
            hint = " (install the libpython package of the venv's Python, e.g. Debian's libpython3.11)" \
                if "libpython" in reason else ""
            return f"Triton not run: {binary.name} cannot start: {reason}{hint}"
    return None


def setup(venv: Path | None = None) -> int:
    """Create the venv (with this Python: the stub must be built for its version) and install the pinned
    packages and the wheel into it. Holds a lock file beside the venv meanwhile: test workers in parallel
    install one after the other (the later ones find everything installed), never two pips into one venv."""
    import fcntl

    venv = venv or venv_path()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if missing(venv) is None:
            return 0
        return _install(venv)


def _install(venv: Path) -> int:
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "-q"]
    # pytriton last and without its dependencies: pip then has no unmet requirement of its to complain about
    for args in (list(pins()), ["--no-deps", PYTRITON]):
        if subprocess.run([*pip, *args]).returncode != 0:
            print(f"triton_env: pip could not install {' '.join(args)} into {venv} (see pip's output above)",
                  file=sys.stderr)
            return 1
    reason = missing(venv)
    print(reason or f"triton_env: {PYTRITON} (tritonserver, Python backend) and {' '.join(pins())} in {venv}")
    return 1 if reason else 0


def config_pbtxt(name: str, model: bytes | Path) -> str:
    """``config.pbtxt`` of a Python-backend model with the ONNX file's inputs and outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                   providers=["CPUExecutionProvider"])

    def tensors(args: list) -> str:
        return ", ".join(f'{{ name: "{a.name}" data_type: {ONNX_TO_CONFIG.get(a.type, "TYPE_STRING")} '
                         f'dims: [ {", ".join(str(d) if isinstance(d, int) else "-1" for d in a.shape)} ] }}'
                         for a in args)

    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\nversion_policy: {{ all {{ }} }}\n'
            f"input [ {tensors(session.get_inputs())} ]\noutput [ {tensors(session.get_outputs())} ]\n"
            "instance_group [ { kind: KIND_CPU count: 1 } ]\n")


def write_repository(repository: Path, name: str, versions: dict[str, bytes | Path]) -> Path:
    """Model ``name`` in Triton's ``repository``: its config.pbtxt (from the first version's ONNX file) and
    one numbered folder per version. Returns the model's folder."""
    folder = repository / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config_pbtxt(name, next(iter(versions.values()))))
    for version, model in versions.items():
        write_version(repository, name, version, model)
    return folder


def write_version(repository: Path, name: str, version: str, model: bytes | Path) -> Path:
    """Version ``version`` of ``name``: a numbered folder with model.py and model.onnx. Triton reads the
    repository again on a RepositoryModelLoad of ``name``. Returns that folder."""
    folder = repository / name / version
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MODEL_PY, folder / "model.py")
    if isinstance(model, bytes):
        (folder / "model.onnx").write_bytes(model)
    else:
        shutil.copyfile(model, folder / "model.onnx")
    return folder


def backend_directory(folder: Path, found: Layout) -> Path:
    """A backend directory of our own whose ``python`` holds the wheel's backend and the stub for the venv's
    Python (the Python backend looks for the stub beside itself). Links: the stub keeps its RPATH."""
    python = folder / "python"
    python.mkdir(parents=True, exist_ok=True)
    for target in (found.backend / "libtriton_python.so", found.backend / "triton_python_backend_utils.py",
                   found.stub):
        link = python / target.name
        if not link.exists():
            link.symlink_to(target)
    return folder


@dataclass
class Triton(PeerServer):
    """A running ``tritonserver`` (its group holds the Python-backend stubs too) and its model repository."""

    repository: Path


def start(folder: Path, model: bytes | Path | None, name: str, *, venv: Path | None = None,
          timeout: float = 120.0, versions: dict[str, bytes | Path] | None = None) -> Triton:
    """Write the repository (``model`` as version 1, or ``versions``) under ``folder`` and start Triton on it,
    CPU only, gRPC and HTTP on free loopback ports, ``name`` loaded at start; returns once every version is
    ready over gRPC and HTTP. Raises RuntimeError (with the log's tail) when it exits or is not ready within
    ``timeout``, or with ``missing()``'s line when the venv cannot run it."""
    found = layout(venv)
    if isinstance(found, str):
        raise RuntimeError(found)
    served = {**({"1": model} if model is not None else {}), **(versions or {})}
    repository = folder / "models"
    write_repository(repository, name, served)
    grpc_port, http_port = free_port(), free_port()
    log = folder / "triton.log"
    command = [str(found.server), f"--model-repository={repository}",
               f"--backend-directory={backend_directory(folder / 'backends', found)}",
               "--model-control-mode=explicit", f"--load-model={name}", "--disable-auto-complete-config",
               "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}", "--http-address=127.0.0.1",
               f"--http-port={http_port}", "--allow-metrics=false",
               # no CUDA: a pinned-memory pool could not be allocated anyway (it would only log so)
               "--pinned-memory-pool-byte-size=0", "--exit-timeout-secs=5"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                                   env=found.environment(), start_new_session=True)
    server = Triton(process, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", log, repository)
    try:
        _wait_ready(server, name, list(served), timeout)
    except BaseException:
        server.stop(5)
        raise
    return server


def _wait_ready(server: Triton, name: str, versions: list[str], timeout: float) -> None:
    import grpc

    from protos import open_inference_pb2 as pb
    from protos import open_inference_pb2_grpc as pb_grpc

    def http_ready(version: str) -> bool:
        url = f"http://{server.http_address}/v2/models/{name}/versions/{version}/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def grpc_ready(version: str) -> bool:
            try:
                return stub.ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=2).ready
            except grpc.RpcError:
                return False

        while time.monotonic() < deadline and server.process.poll() is None:
            if all(grpc_ready(v) and http_ready(v) for v in versions):
                return
            time.sleep(0.2)
    tail = server.log.read_text(errors="replace").strip().splitlines()[-15:]
    state = f"exited with {server.process.returncode}" if server.process.poll() is not None else "not ready"
    raise RuntimeError(f"Triton {state} after start (log {server.log}):\n" + "\n".join(tail))


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help=f"create {venv_path()} and install Triton into it")
    args = parser.parse_args()
    if args.setup:
        return setup()
    reason = missing()
    print(reason or f"Triton can be started from {venv_path()}")
    return 1 if reason else 0


if __name__ == "__main__":
    sys.exit(main())
