"""The parts of a reference profile an agent uses itself: its projection, from a file or the collector.

An agent computes ``@reconstruction_error`` with the PCA projection of its model
version's reference profile (``agent.sketches.joint``). It gets it from
``MonitoredSession(reference=...)`` / ``outrider agent serve --reference
PROFILE.pb``, or from the collector: a ``Command`` of kind ``reference`` whose
args are ``version`` (the model version the profile belongs to) and
``projection`` (the serialised ``summary_pb2.Projection`` in base64; empty when
the version's profile has none, which removes it). The collector sends one on
an agent's Hello and whenever a profile is attached; the agent uses it from
its next window on, if it serves that version.
"""
from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from pathlib import Path

from google.protobuf.message import DecodeError

from agent.errors import InvalidArgument
from agent.sketches import joint
from protos import summary_pb2

REFERENCE = "reference"  # the Command kind

Reference = summary_pb2.ReferenceProfile | summary_pb2.Projection | joint.Projection | str | os.PathLike | None


def load_projection(reference: Reference) -> joint.Projection | None:
    """The projection of ``reference``: a ReferenceProfile, its file, or a Projection (message or
    checked). None when it has none. Raises InvalidArgument for a file that cannot be read or
    parsed, or a projection that is not consistent."""
    if reference is None or isinstance(reference, joint.Projection):
        return reference
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference)
        try:
            reference = summary_pb2.ReferenceProfile.FromString(path.read_bytes())
        except OSError as exc:
            raise InvalidArgument(f"cannot read reference profile {path}: {exc.strerror or exc}") from None
        except DecodeError:
            raise InvalidArgument(f"{path} is not a reference profile; build one with 'outrider profile'") from None
    if isinstance(reference, summary_pb2.ReferenceProfile):
        if not reference.HasField("projection"):
            return None
        reference = reference.projection
    if not isinstance(reference, summary_pb2.Projection):
        raise InvalidArgument(f"reference must be a ReferenceProfile, its file or a Projection, "
                              f"not {type(reference).__name__}")
    return joint.Projection.from_proto(reference)


def command_args(version: str, projection: summary_pb2.Projection | None) -> dict[str, str]:
    """A ``reference`` Command's args (the collector's side)."""
    body = projection.SerializeToString() if projection is not None else b""
    return {"version": version, "projection": base64.b64encode(body).decode("ascii")}


def from_command(args: Mapping[str, str]) -> tuple[str, joint.Projection | None]:
    """(version, projection) of a ``reference`` Command; InvalidArgument saying what is wrong."""
    version = args.get("version", "")
    if not version:
        raise InvalidArgument("reference command names no version")
    try:
        body = base64.b64decode(args.get("projection", ""), validate=True)
        message = summary_pb2.Projection.FromString(body)
    except (binascii.Error, ValueError, DecodeError):
        raise InvalidArgument("reference command's projection is not a base64 serialised Projection") from None
    return version, joint.Projection.from_proto(message) if body else None
