"""The model registry: immutable, numbered versions of each model, their artifacts and gate results.

A version is registered once and never changes: its number (1, 2, ... per
name), the ONNX file's sha256 and size, its input/output schema, its reference
profile (kept in the ``profiles`` table as that version's drift reference, with
the data's sha256 and row count: the lineage), the names of its input columns
(the profile's: managed agents are given them, so that traffic and reference
line up), its holdout metrics, who registered it and when. Only the gate's
result is written again, when the gate is re-run on request.

A profile must fit the model it is registered with (``version_names``: its
feature columns are the columns the model's inputs become under its names),
and a profile attached later must fit the traffic it will be compared with
(``Registry.profile_fit``).

Artifacts are content-addressed (``ArtifactStore``): beside a SQLite database in
``<db dir>/<db stem>-artifacts/sha256/<hex>``, on PostgreSQL in the database itself (so
that every collector serves every version). A name is a hash, so identical uploads share
one artifact and no name given by a caller ever becomes a path. An upload is written to a
temporary file, its size and sha256 checked, and only then stored; a bad upload leaves
nothing behind.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from collector.store.engine import Conn

from agent import feature_names as naming
from agent.errors import FailedPrecondition, InvalidArgument, NotFound
from collector.base.ingest import Limits, validate_model_key, validate_profile
from collector.lifecycle import gate
from collector.store import artifacts as artifact_rows
from collector.store import audit, versions
from protos import collector_pb2 as pb
from protos import summary_pb2

log = logging.getLogger(__name__)

CHUNK_MAX = 1 << 20  # bytes of artifact per RegisterChunk
DEFAULT_MAX_ARTIFACT_BYTES = 1 << 30
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def artifacts_root(db_path: str | os.PathLike) -> Path:
    """Where the artifacts of the database at ``db_path`` live."""
    db = Path(db_path).resolve()
    return db.parent / f"{db.stem}-artifacts"


class ArtifactStore:
    """Where registered versions' bytes live, named by their sha256 only; never overwritten.
    ``for_store`` picks the implementation for the store's engine: ``DirectoryArtifacts`` beside a
    SQLite file, ``DatabaseArtifacts`` in PostgreSQL (every collector serves every version)."""

    @staticmethod
    def for_store(store: Any) -> ArtifactStore:
        if store.engine.dialect.name == "sqlite":
            return DirectoryArtifacts(artifacts_root(store.engine.path))  # the file, also from a sqlite:/// URL
        return DatabaseArtifacts(store)

    @staticmethod
    def check(sha256: str) -> str:
        if not _HEX64.match(sha256):  # the only names there are: 64 lowercase hex digits
            raise InvalidArgument(f"sha256 must be 64 lowercase hex digits, got {sha256[:80]!r}")
        return sha256

    def receive(self, chunks: Iterable[bytes], size: int, sha256: str) -> bool:
        """Store ``chunks`` if they are ``size`` bytes hashing to ``sha256``; True if stored now
        (False: the same bytes were there). InvalidArgument, leaving nothing behind, if they are not."""
        raise NotImplementedError

    def read(self, sha256: str) -> bytes:
        """The whole artifact (FileNotFoundError if it is not stored)."""
        raise NotImplementedError

    def open(self, sha256: str) -> BinaryIO | None:
        """The artifact to read in pieces (``read(n)``, ``close``), None if it is not stored."""
        raise NotImplementedError

    def exists(self, sha256: str) -> bool:
        raise NotImplementedError

    def remove(self, sha256: str) -> None:
        """Delete the artifact (nothing if it is not stored)."""
        raise NotImplementedError


def _checked(chunks: Iterable[bytes], size: int, sha256: str, out: BinaryIO) -> None:
    """Copy ``chunks`` to ``out``, checking each chunk's size, the total and the hash."""
    digest, received = hashlib.sha256(), 0
    for chunk in chunks:
        if len(chunk) > CHUNK_MAX:
            raise InvalidArgument(f"a data chunk of {len(chunk)} bytes is over the {CHUNK_MAX} byte limit")
        received += len(chunk)
        if received > size:
            raise InvalidArgument(f"the upload is longer than its declared size of {size} bytes")
        digest.update(chunk)
        out.write(chunk)
    if received != size:
        raise InvalidArgument(f"the upload is truncated: {received} of {size} declared bytes arrived")
    if digest.hexdigest() != sha256:
        raise InvalidArgument(f"sha256 mismatch: the upload hashes to {digest.hexdigest()}, "
                              f"not the declared {sha256}")


class DirectoryArtifacts(ArtifactStore):
    """Files named by their sha256 under ``root/sha256/``; written atomically (beside a SQLite file)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.objects = self.root / "sha256"
        self.incoming = self.root / "incoming"

    def path(self, sha256: str) -> Path:
        return self.objects / self.check(sha256)  # the only way a name becomes a path

    def receive(self, chunks: Iterable[bytes], size: int, sha256: str) -> bool:
        final = self.path(sha256)
        self.objects.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.incoming, prefix="upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                _checked(chunks, size, sha256, out)
                out.flush()
                os.fsync(out.fileno())
            if final.exists():  # the same bytes are already stored
                os.unlink(tmp)
                return False
            os.replace(tmp, final)
            dir_fd = os.open(self.objects, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            return True
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def open(self, sha256: str) -> BinaryIO | None:
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError:
            return None

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)


class DatabaseArtifacts(ArtifactStore):
    """Artifacts in the database's ``artifacts`` table (``collector.store.artifacts``), so that every
    collector on one PostgreSQL serves every version: nothing to share but the database. An upload is
    checked into a temporary file first (memory up to 8 MiB), then written in one transaction just
    before the version's row."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def receive(self, chunks: Iterable[bytes], size: int, sha256: str) -> bool:
        self.check(sha256)
        with tempfile.SpooledTemporaryFile(max_size=8 << 20) as spool:
            _checked(chunks, size, sha256, spool)

            def pieces() -> Iterator[bytes]:
                spool.seek(0)
                while data := spool.read(artifact_rows.CHUNK_BYTES):
                    yield data

            return self.store.write(lambda db: artifact_rows.put(db, sha256, pieces()))

    def read(self, sha256: str) -> bytes:
        stream = self.open(sha256)
        if stream is None:
            raise FileNotFoundError(f"artifact {sha256} is not in the database")
        with stream:
            return stream.read()

    def open(self, sha256: str) -> BinaryIO | None:
        self.check(sha256)
        first = artifact_rows.chunk(self.store.read(), sha256, 0)
        return None if first is None else _ChunkReader(self.store, sha256, first)

    def exists(self, sha256: str) -> bool:
        return artifact_rows.exists(self.store.read(), self.check(sha256))

    def remove(self, sha256: str) -> None:
        self.store.write(lambda db: artifact_rows.remove_unreferenced(db, self.check(sha256)))


class _ChunkReader(io.RawIOBase):
    """An artifact in the database read as a file: one chunk (one statement) at a time."""

    def __init__(self, store: Any, sha256: str, first: bytes) -> None:
        super().__init__()
        self._store, self._sha256 = store, sha256
        self._buffer, self._next = first, 1

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        if not self._buffer:
            more = artifact_rows.chunk(self._store.read(), self._sha256, self._next)
            if more is None:
                return 0
            self._buffer, self._next = more, self._next + 1
        n = min(len(target), len(self._buffer))
        target[:n], self._buffer = self._buffer[:n], self._buffer[n:]
        return n


class Registry:
    """Registers versions (from RegisterModel's stream), lists them, runs their gate."""

    def __init__(self, store: Any, artifacts: ArtifactStore | None = None, *,
                 policy: gate.GatePolicy = gate.GatePolicy(), limits: Limits = Limits(),
                 max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES) -> None:
        self.store = store
        self.artifacts = artifacts or ArtifactStore.for_store(store)
        self.policy = policy
        self.limits = limits
        self.max_artifact_bytes = max_artifact_bytes
        self._lock = threading.Lock()  # placing an artifact and committing its row, one upload at a time

    # -------------------------------------------------------- register

    def register(self, chunks: Iterable[pb.RegisterChunk], actor: str) -> pb.ModelVersion:
        """Store the version the stream describes, then run its gate. InvalidArgument, with
        nothing stored, for a bad stream (no metadata first, wrong size or hash, not ONNX)."""
        stream = iter(chunks)
        first = next(stream, None)
        if first is None or first.WhichOneof("kind") != "metadata":
            raise InvalidArgument("the first RegisterChunk must carry the metadata")
        meta = first.metadata
        validate_model_key(meta.name, "-", self.limits)
        self.artifacts.check(meta.sha256)
        if not 0 < meta.size <= self.max_artifact_bytes:
            raise InvalidArgument(f"size must be between 1 and {self.max_artifact_bytes} bytes, got {meta.size}")
        metrics = gate.parse_metrics(meta.metrics_json)
        profile = meta.profile if meta.HasField("profile") else None
        if profile is not None:
            validate_profile(profile, self.limits)
            if profile.model_sha256 and profile.model_sha256 != meta.sha256:
                raise InvalidArgument(f"the profile was built with another model (sha256 {profile.model_sha256[:16]}"
                                      f"...), not this artifact ({meta.sha256[:16]}...)")

        def data() -> Iterable[bytes]:
            for chunk in stream:
                if chunk.WhichOneof("kind") != "data":
                    raise InvalidArgument("only the first RegisterChunk may carry metadata")
                yield chunk.data

        with self._lock:
            created = self.artifacts.receive(data(), meta.size, meta.sha256)
            try:
                schema = gate.read_schema(self.artifacts.read(meta.sha256))
                names = version_names(schema, profile) if profile is not None else {}
                version = self.store.write(lambda db: _insert(db, meta, schema, names, metrics, profile, actor,
                                                              time.time_ns()))
            except BaseException:
                if created:  # no row refers to it: an orphan otherwise
                    self.artifacts.remove(meta.sha256)
                raise
        log.info("model %s version %d registered by %s (sha256 %s, %d bytes)", meta.name, version, actor,
                 meta.sha256[:16], meta.size)
        return self.run_gate(meta.name, version, actor)

    # -------------------------------------------------------- gate

    def run_gate(self, name: str, version: int, actor: str) -> pb.ModelVersion:
        """(Re-)run the gate on a stored version and record its result."""
        row = self._row(self.store.read(), name, version)
        if row["stage"] == "retired":
            raise FailedPrecondition(f"{name} version {row['version']} is retired: its gate is not run again")
        # The baseline is what clients get now: the production version; before there is one, the newest
        # earlier version that passed (so a series of candidates cannot drift down one tolerance at a time).
        baseline = versions.gate_baseline(self.store.read(), name, row["version"])
        base = {"version": baseline[0], "schema": json.loads(baseline[1]),
                "metrics": json.loads(baseline[2])} if baseline else None
        model = self.artifacts.read(row["sha256"])
        profile = self.store.profile(name, str(row["version"]))
        result = gate.run_gate(model, json.loads(row["schema"]), json.loads(row["metrics"]), profile, base,
                               self.policy)
        now = time.time_ns()

        def save(db: Conn) -> None:
            before = versions.stage_row(db, name, row["version"])
            versions.set_gate(db, name, row["version"], json.dumps(result), result["passed"], now)
            audit.append(db, actor, "model.gate", f"model/{name}/{row['version']}", model_name=name,
                         before={"passed": bool(before["gate_passed"])} if before["gate"] else None,
                         after={"passed": result["passed"],
                                "failed": [c["name"] for c in result["checks"] if not c["passed"]]}, now_ns=now)

        self.store.write(save)
        log.info("gate of model %s version %d: %s", name, row["version"], "passed" if result["passed"] else "failed")
        return self.show(name, row["version"])

    # -------------------------------------------------------- retired artifacts

    def remove_retired_artifacts(self, retention_seconds: float, now_ns: int) -> list[tuple[str, int]]:
        """Delete the artifact files of versions retired more than ``retention_seconds`` before
        ``now_ns``, unless a version that is not retired shares the file (same sha256). Each
        removal is marked on the version (``artifact_removed_ns``) and audited; the record stays.
        Returns the (name, version) pairs marked. Called by the collector's rollup loop."""
        cutoff = now_ns - int(retention_seconds * 1e9)

        def mark(db: Conn) -> list[tuple[str, int, str]]:
            marked = []
            for name, version, sha256, retired_ns in versions.retired_before(db, cutoff):
                if versions.artifact_in_use(db, sha256):  # still needed: kept, and looked at again next pass
                    continue
                versions.mark_artifact_removed(db, name, version, now_ns)
                audit.append(db, audit.COLLECTOR, "model.artifact_removed", f"model/{name}/{version}",
                             model_name=name, before={"artifact": sha256},
                             after={"artifact": None, "retired_ns": retired_ns},
                             reason=f"retired more than {retention_seconds:g} s ago", now_ns=now_ns)
                marked.append((name, version, sha256))
            return marked

        with self._lock:  # no upload of the same bytes can land between the check and the unlink
            marked = self.store.write(mark)
            for name, version, sha256 in marked:
                self.artifacts.remove(sha256)
                log.info("artifact of retired model %s version %d removed (sha256 %s)", name, version, sha256[:16])
        return [(n, v) for n, v, _ in marked]

    # -------------------------------------------------------- attaching a profile

    def profile_fit(self, name: str, version: str, profile: summary_pb2.ReferenceProfile) -> list[str]:
        """Whether ``profile`` describes the columns the version's traffic has: drift compares columns
        by name, and a reference whose columns the traffic lacks compares nothing. Its feature columns
        are checked against, in order: the names the version was registered with (what its managed
        agents report), else the columns of the newest window agents sent for the version; and, for a
        registered version, its inputs' widths. FailedPrecondition, saying what differs and how to fix
        it, when they disagree; the warnings to give when nothing could be checked."""
        got = naming.feature_columns(profile.columns)
        row = self._registered(name, version)
        if row is not None:
            schema, names = json.loads(row["schema"]), json.loads(row["feature_names"] or "{}")
            if names:
                expected = naming.all_feature_columns(schema["inputs"], names)
                if expected is not None:
                    _refuse_unless_same(expected, got, f"the columns {name} version {version} was registered with",
                                        "build the profile with those names (outrider profile --feature-names), or "
                                        f"register a version with this reference (outrider models register {name} "
                                        "--file M.onnx --reference DATA)")
                    return []
            _check_widths(schema["inputs"], naming.columns_by_input(profile.columns), name, version)
        newest = self.store.windows(name, version, limit=1, include_summaries=True)
        if newest:
            window = newest[0].summary
            who = f"agent {window.agent_id}" if window.agent_id else "the agents"
            _refuse_unless_same(naming.feature_columns(window.columns), got,
                                f"the columns {who} reported for {name} version {version}",
                                "build the profile with the agents' names (outrider profile --feature-names), or "
                                "restart the agents with the profile's (outrider agent serve --feature-names)")
            return []
        if row is not None:
            return [f"{name} version {version} was registered without a reference, and no agent has reported it "
                    f"yet: the profile's column names ({naming.few(got)}) could not be checked against its traffic"]
        return [f"{name} version {version} is not registered and no agent has reported it yet: the profile's "
                f"column names ({naming.few(got)}) could not be checked against its traffic; agents must name "
                "their columns alike (outrider agent serve --feature-names)"]

    def _registered(self, name: str, version: str) -> dict[str, Any] | None:
        if not version.isdigit() or not 0 < int(version) < 2**31:
            return None
        return versions.schema_and_names(self.store.read(), name, int(version))

    # -------------------------------------------------------- reads

    def list(self, name: str = "") -> list[pb.ModelVersion]:
        """Every version (of model ``name`` if given), by name and version."""
        return [v for _, v in self.rows(name)]

    def rows(self, name: str = "", *, after: tuple[str, int] | None = None
             ) -> Iterator[tuple[tuple[str, int], pb.ModelVersion]]:
        """``list`` read lazily as ((name, version), version); ``after``: only versions past that key."""
        for r in versions.listing(self.store.read(), name, after):
            yield (r["name"], r["version"]), _message(r)

    def show(self, name: str, version: int = 0) -> pb.ModelVersion:
        return _message(self._row(self.store.read(), name, version))

    def _row(self, db: Conn, name: str, version: int) -> dict[str, Any]:
        validate_model_key(name, "-", self.limits)
        row = versions.get(db, name, version)
        if row is None:
            raise NotFound(f"model {name!r} has no version {version}" if version else
                           f"model {name!r} is not registered; register it with: outrider models register {name} "
                           "--file MODEL.onnx")
        return row


def _insert(db: Conn, meta: pb.RegisterMetadata, schema: dict[str, Any], names: dict[str, list[str]],
            metrics: dict[str, float], profile: summary_pb2.ReferenceProfile | None, actor: str, now_ns: int) -> int:
    audit.take_turn(db)  # two collectors registering the same name number their versions in turn
    version = versions.next_version(db, meta.name)
    lineage = {"data_name": profile.data_name, "data_sha256": profile.data_sha256,
               "data_rows": profile.rows} if profile is not None else {}
    versions.insert(db, {
        "name": meta.name, "version": version, "sha256": meta.sha256, "size": meta.size,
        "schema": json.dumps(schema), "metrics": json.dumps(metrics), "registered_by": actor,
        "registered_ns": now_ns, "stage": "candidate", "stage_ns": now_ns, "feature_names": naming.to_json(names),
        **lineage})
    if profile is not None:  # the version's drift reference
        versions.save_profile(db, {"model_name": meta.name, "model_version": str(version),
                                   "body": profile.SerializeToString(), "data_sha256": profile.data_sha256,
                                   "rows": profile.rows, "attached_ns": now_ns, "attached_by": actor})
    audit.append(db, actor, "model.register", f"model/{meta.name}/{version}", model_name=meta.name,
                 after={"version": version, "sha256": meta.sha256, "size": meta.size, "metrics": metrics,
                        **lineage}, now_ns=now_ns)
    return version


def _message(r: dict[str, Any]) -> pb.ModelVersion:
    return pb.ModelVersion(
        name=r["name"], version=r["version"], sha256=r["sha256"], size=r["size"], schema_json=r["schema"],
        has_profile=bool(r["has_profile"]), data_name=r["data_name"], data_sha256=r["data_sha256"],
        data_rows=r["data_rows"], metrics_json=r["metrics"], registered_by=r["registered_by"],
        registered_unix_nano=r["registered_ns"], gate_passed=bool(r["gate_passed"]), gate_json=r["gate"],
        gated_unix_nano=r["gated_ns"], stage=r["stage"], stage_unix_nano=r["stage_ns"],
        retired_unix_nano=r["retired_ns"], retire_reason=r["retire_reason"],
        artifact_removed_unix_nano=r["artifact_removed_ns"],
        feature_names={i: summary_pb2.ColumnNames(names=n) for i, n in json.loads(r["feature_names"] or "{}").items()})


# ------------------------------------------------------------------ names


def _refuse_unless_same(expected: list[str], got: list[str], what: str, fix: str) -> None:
    problem = naming.difference(expected, got, limit=3)
    if problem:  # what is wrong, then the fix: the CLI shows the first 500 characters
        common = len(set(expected) & set(got))
        raise FailedPrecondition(f"the profile's feature columns are not {what}: {problem}; drift would compare "
                                 f"{common} of its {len(got)}: {fix}")


def _check_widths(inputs: list[dict[str, Any]], by_source: dict[str, list[str]], name: str, version: str) -> None:
    for arg in naming.inputs_of(inputs):
        columns = by_source.get(arg.name, [])
        if arg.per_column and arg.width is not None and len(columns) != arg.width:
            raise FailedPrecondition(f"the profile has {len(columns)} feature columns for input {arg.name!r}, which "
                                     f"has {arg.width} in {name} version {version}: it was built for another model; "
                                     "build it from this version's model (outrider profile --model M.onnx ...)")


def version_names(schema: dict[str, Any], profile: summary_pb2.ReferenceProfile) -> dict[str, list[str]]:
    """The names of a version's input columns, from the profile it is registered with. InvalidArgument,
    registering nothing, when the profile's feature columns are not what the model's inputs become
    under those names (names for an input it lacks, or as many as the input is wide, other columns)."""
    inputs = schema["inputs"]
    names = naming.from_profile(profile, inputs)
    fix = "; build the profile from this model: outrider profile --model M.onnx --data DATA"
    try:
        naming.for_inputs(inputs, names, "feature names of the profile")
    except InvalidArgument as exc:
        raise InvalidArgument(f"the profile does not fit the model: {exc}{fix}") from None
    expected = naming.all_feature_columns(inputs, names)
    got = naming.feature_columns(profile.columns)
    problem = naming.difference(expected, got) if expected is not None else ""
    if problem:
        raise InvalidArgument(f"the profile's feature columns are not the model's input columns: {problem}{fix}")
    return names
