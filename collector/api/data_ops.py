"""``ExportData`` of the operators' service (a mixin of ``OpsServicer``): the agents' sampled rows.

Thin: checks the request, streams what ``collector.store.samples.export`` reads, logs who took how much.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc

from agent.errors import grpc_stream_errors
from collector.base.auth import current_identity
from collector.base.ingest import validate_model_key
from collector.store import samples
from protos import collector_pb2 as pb

log = logging.getLogger(__name__)


class DataOps:
    """Needs ``self.store`` and ``self.agents`` (for the limits)."""

    @grpc_stream_errors
    def ExportData(self, request: pb.ExportDataRequest, context: grpc.ServicerContext) -> Iterator[pb.ExportDataChunk]:
        validate_model_key(request.model_name, request.model_version or "-", self.agents.limits)
        until = request.until_unix_nano or time.time_ns()
        windows = rows = 0
        for chunk in samples.export(self.store.read(), request.model_name, request.model_version,
                                    request.since_unix_nano, until):
            windows += 1
            rows += samples.row_count(chunk.sample)
            yield chunk
        identity = current_identity()
        log.info("%s exported %d sampled rows of %d windows of %s %s", identity.name if identity else "?", rows,
                 windows, request.model_name, request.model_version or "(every version)")
