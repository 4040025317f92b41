"""The checksum a window carries from the agent's spool to the collector's store.

``seal`` sets ``WindowSummary.crc32`` to the CRC-32 of the window serialised
deterministically with that field at 0; ``check`` recomputes it. The agent
seals a window when it enters the spool; the collector checks it before
storing, so a window damaged on disk or on the way is refused with a reason
instead of being stored (a bit flip in a count or a sketch would otherwise
pass every other check). Both sides serialise with the same protobuf runtime
and fields are written in field-number order, so the bytes they hash agree;
fields unknown to an older collector are kept and re-serialised after the
known ones, which is also where a newer agent (higher field numbers) wrote
them.

CRC-32 (zlib's, in C) rather than a cryptographic hash: this detects damage,
it does not authenticate (the stream's token and TLS do that), and it costs
about a microsecond per kilobyte.
"""
from __future__ import annotations

import zlib

from protos import summary_pb2


def window_crc32(window: summary_pb2.WindowSummary) -> int:
    """The CRC-32 of ``window`` as it would be sealed (whatever its ``crc32`` holds now)."""
    sealed = window.crc32
    if sealed:
        window.crc32 = 0
    try:
        crc = zlib.crc32(window.SerializeToString(deterministic=True))
    finally:
        if sealed:
            window.crc32 = sealed
    return crc or 1  # 0 means "not sealed"; a window whose CRC is 0 carries 1 instead


def seal(window: summary_pb2.WindowSummary) -> summary_pb2.WindowSummary:
    """Set ``window.crc32`` (in place) and return the window."""
    window.crc32 = window_crc32(window)
    return window


def check(window: summary_pb2.WindowSummary) -> str:
    """"" when the window is unsealed or its checksum matches; else what is wrong, for the ack."""
    if not window.crc32:
        return ""
    expected = window_crc32(window)
    if window.crc32 != expected:
        return (f"checksum mismatch (carried {window.crc32:08x}, contents hash to {expected:08x}): "
                "the window was damaged in the agent's spool or on the way")
    return ""
