"""A managed agent's model files and the checks a loaded version passes before it serves.

``ArtifactCache`` keeps verified model files by sha256 (written whole or not
at all, checked again when read back); ``check_schema`` compares a loaded
model's inputs and outputs with the registry's schema; ``warm_up`` makes a
few unmonitored calls on synthetic inputs (``synthetic_feed``) so the first
real request does not pay for lazy initialisation. Used by
``agent.rollout.RolloutController``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from agent import tensors
from agent.errors import FailedPrecondition, InvalidArgument
from protos import collector_pb2

log = logging.getLogger(__name__)

KEEP_ARTIFACTS = 3        # cached versions kept besides the current and shadow ones (quick rollbacks)
WARMUP_CALLS = 3


# ------------------------------------------------------------------------ artifacts

class ArtifactCache:
    """Verified model files by sha256 in one directory; written whole or not at all."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.onnx"

    def cached(self, sha256: str) -> Path | None:
        """The file, if present and intact (a damaged one is removed)."""
        path = self.path(sha256)
        try:
            digest = _sha256_file(path)
        except FileNotFoundError:
            return None
        if digest != sha256:
            log.warning("cached model %s is damaged (its sha256 is %s); fetching it again", path, digest)
            path.unlink(missing_ok=True)
            return None
        return path

    def store(self, chunks: Iterable[collector_pb2.ArtifactChunk], sha256: str, size: int, what: str) -> Path:
        """Write the streamed file and verify it against ``sha256`` and ``size`` before it takes its name."""
        tmp = self.directory / f".{sha256}.{uuid.uuid4().hex}.tmp"
        digest, received = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                for i, chunk in enumerate(chunks):
                    if i == 0:
                        _check_first_chunk(chunk, sha256, size, what)
                    received += len(chunk.data)
                    if received > size:
                        raise FailedPrecondition(f"the collector sent more than the {size} bytes of {what}")
                    digest.update(chunk.data)
                    out.write(chunk.data)
                out.flush()
                os.fsync(out.fileno())
            if received != size:
                raise FailedPrecondition(f"the collector sent {received} bytes of {what}, expected {size}")
            if digest.hexdigest() != sha256:
                raise FailedPrecondition(f"{what} as received has sha256 {digest.hexdigest()}, "
                                         f"expected {sha256}: not loaded")
            path = self.path(sha256)
            os.replace(tmp, path)
            _fsync_dir(self.directory)
            return path
        finally:
            tmp.unlink(missing_ok=True)

    def prune(self, keep: set[str]) -> None:
        """Remove all but ``keep`` and the KEEP_ARTIFACTS newest others."""
        files = sorted(self.directory.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        others = [p for p in files if p.stem not in keep]
        for path in others[KEEP_ARTIFACTS:]:
            path.unlink(missing_ok=True)


def _check_first_chunk(chunk: collector_pb2.ArtifactChunk, sha256: str, size: int, what: str) -> None:
    if chunk.sha256 and chunk.sha256.lower() != sha256:
        raise FailedPrecondition(f"the collector's file for {what} has sha256 {chunk.sha256}, "
                                 f"but the command names {sha256}")
    if chunk.total_size and chunk.total_size != size:
        raise FailedPrecondition(f"the collector's file for {what} has {chunk.total_size} bytes, "
                                 f"but the command says {size}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Replace ``path`` with ``value`` as JSON, whole or not at all (written, fsynced, renamed)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ------------------------------------------------------------------ checks and warm-up

def _dims(shape: Iterable[Any]) -> list[int]:
    """Registry (None) and Hello (-1) spellings of a free dimension, made one."""
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def check_schema(session: Any, schema_json: str) -> None:
    """The loaded model's inputs and outputs (names, types, shapes) must be the registry's."""
    if not schema_json:
        return
    try:
        schema = json.loads(schema_json)
        expected = {part: {t["name"]: (t["type"], _dims(t.get("shape") or [])) for t in schema[part]}
                    for part in ("inputs", "outputs")}
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"the command's schema_json is not a registry schema: {exc}") from None
    problems = []
    for part, args in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        got = {a.name: (a.type, _dims(a.shape or [])) for a in args}
        want = expected[part]
        if set(got) != set(want):
            problems.append(f"{part} are {sorted(got)}, the registry says {sorted(want)}")
        for name in sorted(set(got) & set(want)):
            if got[name] != want[name]:
                problems.append(f"{part[:-1]} {name} is {got[name][0]} {got[name][1]}, "
                                f"the registry says {want[name][0]} {want[name][1]}")
    if problems:
        raise FailedPrecondition("the model does not match its registry schema: " + "; ".join(problems))


def synthetic_feed(inputs: Iterable[Any], rows: int = 1) -> dict[str, np.ndarray]:
    """Zeros (empty strings) of each input's dtype and shape, free dimensions 1 (the batch: ``rows``)."""
    feed = {}
    for arg in inputs:
        dtype = tensors.DATATYPES[tensors.oip_datatype(arg.type)]
        shape = [d if isinstance(d, int) and d >= 0 else (rows if i == 0 else 1)
                 for i, d in enumerate(arg.shape or [])]
        feed[arg.name] = np.full(shape, "", dtype=object) if dtype == object else np.zeros(shape, dtype)
    return feed


def warm_up(session: Any, calls: int = WARMUP_CALLS) -> None:
    """A few unmonitored calls, so the first real request does not pay for lazy initialisation."""
    inner = getattr(session, "inference_session", session)  # MonitoredSession: not counted in windows
    feed = synthetic_feed(session.get_inputs())
    try:
        for _ in range(calls):
            inner.run(None, feed)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FailedPrecondition(f"warm-up call failed: {first}") from None
