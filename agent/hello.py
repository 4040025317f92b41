"""What an agent says about itself to the collector, and opening its exporter.

The Hello (ids, host, model, schema, versions) is built here for a
``MonitoredSession`` or a managed agent, and ``open_exporter`` finds a free
spool directory for it; ``agent.exporter`` is the delivery itself, and adds
the spool's part to each Hello it sends (its status, and ``spooled_models``:
the models of earlier runs' windows still waiting to be delivered).
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from agent.exporter import TLS, CollectorExporter
from agent.spool import SpoolBusy
from protos import collector_pb2


def package_version() -> str:
    try:
        return importlib.metadata.version("outrider")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout
        return "0.0.0"


def tensor_info(arg: Any) -> collector_pb2.TensorInfo:
    """An onnxruntime NodeArg as TensorInfo: symbolic or unknown dimensions become -1."""
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
    return collector_pb2.TensorInfo(name=arg.name, type=arg.type, shape=shape)


def hello_for(session: Any) -> collector_pb2.Hello:
    """The Hello describing a ``MonitoredSession``: who we are and what model we serve."""
    import onnxruntime

    ident = session.identity
    return collector_pb2.Hello(
        agent_id=ident.agent_id, run_id=ident.run_id, host=socket.gethostname(),
        model_name=ident.model_name, model_version=ident.model_version, model_sha256=ident.model_sha256,
        inputs=[tensor_info(a) for a in session.get_inputs()],
        outputs=[tensor_info(a) for a in session.get_outputs()],
        agent_version=package_version(), onnxruntime_version=onnxruntime.__version__,
        started_unix_nano=getattr(session, "_started_ns", time.time_ns()),
    )


def exporter_for(session: Any, collector: str, spool_dir: str | os.PathLike | None = None,
                 token: str | None = None, tls: TLS = None, **options: Any) -> CollectorExporter:
    """The session's exporter. Without ``spool_dir``: ``./outrider-spool/<agent_id>-<model_name>``,
    or ``...-2``, ``-3`` ... when another process on this host already uses it. ``options`` go to
    ``CollectorExporter`` (e.g. ``on_command``)."""
    return open_exporter(collector, hello_for(session), spool_dir, token, tls, **options)


def open_exporter(collector: str, hello: collector_pb2.Hello, spool_dir: str | os.PathLike | None = None,
                  token: str | None = None, tls: TLS = None, **options: Any) -> CollectorExporter:
    """An exporter for ``hello``'s agent. Without ``spool_dir``: ``./outrider-spool/<agent_id>-<model_name>``,
    or ``...-2``, ``-3`` ... when another process on this host already uses it."""
    if spool_dir is not None:
        return CollectorExporter(collector, hello=hello, spool_dir=spool_dir, token=token, tls=tls, **options)
    base = Path("outrider-spool") / re.sub(r"[^A-Za-z0-9._-]", "_", f"{hello.agent_id}-{hello.model_name}")
    for n in range(1, 65):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            return CollectorExporter(collector, hello=hello, spool_dir=candidate, token=token, tls=tls, **options)
        except SpoolBusy:
            continue
    raise SpoolBusy(f"every spool directory {base}[-2..-64] is in use; pass spool_dir")
