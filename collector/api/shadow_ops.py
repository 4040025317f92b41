"""The shadow report and the withdrawal of approval requests (a mixin of ``OpsServicer``).

Thin like every servicer: check the request, call the plain core
(``collector.monitoring.shadow``, ``collector.lifecycle.approval_cancel``), log who did what.
"""
from __future__ import annotations

import logging
import time

import grpc

from agent.errors import grpc_errors
from collector.base.auth import current_identity, role_at_least
from collector.base.ingest import validate_model_key
from collector.lifecycle import approvals
from collector.lifecycle.approval_cancel import cancel
from collector.monitoring import shadow
from protos import collector_pb2 as pb

log = logging.getLogger(__name__)


class ShadowOps:
    """Needs ``self.store`` and ``self.agents`` (for the limits)."""

    @grpc_errors
    def ShadowReport(self, request: pb.ShadowReportRequest,
                     context: grpc.ServicerContext) -> pb.ShadowReportResponse:
        validate_model_key(request.model_name, "-", self.agents.limits)
        return shadow.report(self.store.read(), request.model_name, request.version, request.since_unix_nano)

    @grpc_errors
    def CancelApproval(self, request: pb.DecisionRequest, context: grpc.ServicerContext) -> pb.Approval:
        reason = approvals.check_reason(request.reason, "cancelling a request")
        identity = current_identity()
        actor = identity.name if identity else "unknown"
        admin = identity is not None and role_at_least(identity.role, "admin")
        cancelled = self.store.write(lambda db: cancel(db, request.id, actor, reason, time.time_ns(), admin=admin))
        log.info("approval %d (%s version %d) cancelled by %s", cancelled.id, cancelled.model_name,
                 cancelled.version, actor)
        return cancelled
