"""The registry and governance calls of the operators' service (a mixin of ``OpsServicer``).

Thin like every servicer: check the request, call the plain core
(``collector.registry``, ``collector.approvals``) inside one store write
with its audit rows, log who did what.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc

from agent.errors import InvalidArgument, PermissionDenied, grpc_errors
from collector import approvals
from collector.auth import current_identity, role_at_least
from collector.ingest import validate_model_key
from protos import collector_pb2 as pb

log = logging.getLogger(__name__)


class GovernanceOps:
    """Needs ``self.store``, ``self.registry`` and ``self.agents`` (for the limits)."""

    # --- registry --------------------------------------------------------------------------

    @grpc_errors
    def RegisterModel(self, request_iterator: Iterator[pb.RegisterChunk],
                      context: grpc.ServicerContext) -> pb.ModelVersion:
        return self.registry.register(request_iterator, _actor())

    @grpc_errors
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(versions=self.registry.list(request.name))

    @grpc_errors
    def ShowModel(self, request: pb.ModelVersionRequest, context: grpc.ServicerContext) -> pb.ModelVersion:
        return self.registry.show(request.name, request.version)

    @grpc_errors
    def RunGate(self, request: pb.ModelVersionRequest, context: grpc.ServicerContext) -> pb.ModelVersion:
        return self.registry.run_gate(request.name, request.version, _actor())

    # --- stages and approvals ----------------------------------------------------------------

    @grpc_errors
    def SetStage(self, request: pb.SetStageRequest, context: grpc.ServicerContext) -> pb.ModelVersion:
        validate_model_key(request.name, "-", self.agents.limits)
        reason = approvals.check_reason(request.reason, "a stage change")
        actor = _actor()
        self.store.write(lambda db: approvals.set_stage(db, request.name, request.version, request.stage, actor,
                                                        reason, time.time_ns()))
        log.info("model %s version %d set to %s by %s", request.name, request.version, request.stage, actor)
        return self.registry.show(request.name, request.version)

    @grpc_errors
    def RequestPromotion(self, request: pb.PromotionRequest, context: grpc.ServicerContext) -> pb.Approval:
        validate_model_key(request.name, "-", self.agents.limits)
        reason = approvals.check_reason(request.reason, "a promotion request")
        override = approvals.check_reason(request.override_gate_reason, "a gate override", required=False)
        identity = current_identity()
        if request.override_gate_reason and not override:
            raise InvalidArgument("--override-gate needs a written reason")
        if override and not (identity and role_at_least(identity.role, "admin")):
            raise PermissionDenied(f"only an admin may override the evaluation gate; "
                                   f"{identity.name if identity else 'this caller'} has role "
                                   f"{identity.role if identity else 'none'}")
        actor = _actor()
        made = self.store.write(lambda db: approvals.request(db, request.name, request.version, actor, reason,
                                                             override, time.time_ns()))
        log.info("promotion of model %s version %d to production requested by %s (approval %d)%s", request.name,
                 request.version, actor, made.id, ", overriding the gate" if override else "")
        return made

    @grpc_errors
    def ListApprovals(self, request: pb.ListApprovalsRequest,
                      context: grpc.ServicerContext) -> pb.ListApprovalsResponse:
        return pb.ListApprovalsResponse(approvals=approvals.listing(self.store.read(), request.include_decided,
                                                                    request.model_name))

    @grpc_errors
    def Approve(self, request: pb.DecisionRequest, context: grpc.ServicerContext) -> pb.Approval:
        return self._decide(request, approve=True)

    @grpc_errors
    def Reject(self, request: pb.DecisionRequest, context: grpc.ServicerContext) -> pb.Approval:
        return self._decide(request, approve=False)

    def _decide(self, request: pb.DecisionRequest, approve: bool) -> pb.Approval:
        reason = approvals.check_reason(request.reason, "a rejection", required=not approve)
        actor = _actor()
        decided = self.store.write(lambda db: approvals.decide(db, request.id, actor, approve, reason,
                                                               time.time_ns()))
        log.info("approval %d (%s version %d) %s by %s", decided.id, decided.model_name, decided.version,
                 decided.state, actor)
        return decided


def _actor() -> str:
    identity = current_identity()
    return identity.name if identity else "unknown"
