"""The registry and governance calls of the operators' service (a mixin of ``OpsServicer``).

Thin like every servicer: check the request, call the plain core
(``collector.lifecycle.registry``, ``collector.lifecycle.approvals``) inside one store write
with its audit rows, log who did what.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc

from agent.errors import InvalidArgument, PermissionDenied, grpc_errors
from collector.base.auth import current_identity, role_at_least
from collector.base.ingest import validate_model_key
from collector.lifecycle import approvals, retraining
from collector.store import paging
from protos import collector_pb2 as pb

log = logging.getLogger(__name__)


class GovernanceOps:
    """Needs ``self.store``, ``self.registry``, ``self.agents`` (for the limits), ``self.evaluator``
    (whose webhook hears of retraining changes) and ``self.max_reply_bytes`` (``collector.store.paging``)."""

    # --- registry --------------------------------------------------------------------------

    @grpc_errors
    def RegisterModel(self, request_iterator: Iterator[pb.RegisterChunk],
                      context: grpc.ServicerContext) -> pb.ModelVersion:
        version = self.registry.register(request_iterator, _actor())
        if version.has_profile:  # agents already serving that version number (static ones) get its projection
            self.agents.rollouts.push_reference(version.name, str(version.version))
        return version

    @grpc_errors
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        after = paging.cursor("models", request.page_token, (str, int))
        page = paging.take(self.registry.rows(request.name, after=after), "models", max_bytes=self.max_reply_bytes)
        return pb.ListModelsResponse(versions=page.items, next_page_token=page.next_token)

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
        (after,) = paging.cursor("approvals", request.page_token, (int,)) or (0,)
        rows = approvals.listing_rows(self.store.read(), request.include_decided, request.model_name, after_id=after)
        page = paging.take(rows, "approvals", max_bytes=self.max_reply_bytes)
        return pb.ListApprovalsResponse(approvals=page.items, next_page_token=page.next_token)

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
        self.after_decision(decided)
        return decided

    def after_decision(self, decided: pb.Approval) -> None:
        """Called once a decision (approved or rejected) is committed, on the caller's thread, before the
        reply; what it raises goes to the caller. Nothing here: ``RolloutOps`` overrides it to push what
        an approval changed (production, the shadow it stopped) to the agents, which must follow the
        commit."""


    # --- retirement ---------------------------------------------------------------------------

    @grpc_errors
    def RetireModel(self, request: pb.RetireRequest, context: grpc.ServicerContext) -> pb.ModelVersion:
        validate_model_key(request.name, "-", self.agents.limits)
        reason = approvals.check_reason(request.reason, "retiring a version")
        actor = _actor()
        self.store.write(lambda db: approvals.retire(db, request.name, request.version, actor, reason,
                                                     time.time_ns()))
        log.info("model %s version %d retired by %s", request.name, request.version, actor)
        return self.registry.show(request.name, request.version)

    # --- retraining requests ------------------------------------------------------------------

    def _retraining_changed(self, changed: pb.RetrainingRequest) -> pb.RetrainingRequest:
        log.info("retraining request %d %s by %s (%s %s)", changed.id, changed.state,
                 changed.decided_by or changed.opened_by, changed.model_name, changed.model_version)
        webhook = getattr(self.evaluator, "webhook", None)
        if webhook is not None:
            webhook.notify(retraining.event(changed))
        return changed

    @grpc_errors
    def OpenRetraining(self, request: pb.OpenRetrainingRequest,
                       context: grpc.ServicerContext) -> pb.RetrainingRequest:
        validate_model_key(request.model_name, request.model_version, self.agents.limits)
        reason = approvals.check_reason(request.reason, "a retraining request")
        actor = _actor()
        evidence = {"features": [], "statistics": {}, "window": None, "opened_manually": True}
        return self._retraining_changed(self.store.write(lambda db: retraining.open_request(
            db, request.model_name, request.model_version, actor, reason, evidence, time.time_ns())))

    @grpc_errors
    def ListRetraining(self, request: pb.ListRetrainingRequest,
                       context: grpc.ServicerContext) -> pb.ListRetrainingResponse:
        (after,) = paging.cursor("retraining", request.page_token, (int,)) or (0,)
        rows = retraining.listing_rows(self.store.read(), request.include_closed, request.model_name, after_id=after)
        page = paging.take(rows, "retraining", max_bytes=self.max_reply_bytes)
        return pb.ListRetrainingResponse(requests=page.items, next_page_token=page.next_token)

    @grpc_errors
    def ShowRetraining(self, request: pb.RetrainingChange, context: grpc.ServicerContext) -> pb.RetrainingRequest:
        return retraining.get(self.store.read(), request.id)

    @grpc_errors
    def AcceptRetraining(self, request: pb.RetrainingChange,
                         context: grpc.ServicerContext) -> pb.RetrainingRequest:
        return self._change_retraining(request, retraining.ACCEPTED)

    @grpc_errors
    def CompleteRetraining(self, request: pb.RetrainingChange,
                           context: grpc.ServicerContext) -> pb.RetrainingRequest:
        return self._change_retraining(request, retraining.COMPLETED)

    @grpc_errors
    def RejectRetraining(self, request: pb.RetrainingChange,
                         context: grpc.ServicerContext) -> pb.RetrainingRequest:
        return self._change_retraining(request, retraining.REJECTED)

    @grpc_errors
    def CancelRetraining(self, request: pb.RetrainingChange,
                         context: grpc.ServicerContext) -> pb.RetrainingRequest:
        return self._change_retraining(request, retraining.CANCELLED)

    def _change_retraining(self, request: pb.RetrainingChange, state: str) -> pb.RetrainingRequest:
        reason = approvals.check_reason(request.reason, "rejecting a retraining request",
                                        required=state == retraining.REJECTED)
        actor = _actor()
        return self._retraining_changed(self.store.write(lambda db: retraining.change(
            db, request.id, state, actor, reason, time.time_ns(), request.version)))


def _actor() -> str:
    identity = current_identity()
    return identity.name if identity else "unknown"
