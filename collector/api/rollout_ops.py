"""Rollback, rollouts and the shadow switch of the operators' service (a mixin of ``OpsServicer``).

Thin like every servicer: check the request, run the plain core
(``collector.lifecycle.rollout``) inside one store write with its audit rows, then push
the change to the model's live managed agents (after the commit, through
``self.agents.rollouts``; for an approval through ``after_decision``, the hook
``GovernanceOps`` calls after its commit), and log who did what.
"""
from __future__ import annotations

import logging
import time

import grpc

from agent.errors import InvalidArgument, grpc_errors
from collector.base.auth import current_identity
from collector.base.ingest import validate_model_key
from collector.lifecycle import approvals, rollout
from collector.store import paging
from protos import collector_pb2 as pb

log = logging.getLogger(__name__)


def _actor() -> str:
    identity = current_identity()
    return identity.name if identity else "unknown"


class RolloutOps:
    """Needs ``self.store``, ``self.agents`` (its ``rollouts`` pusher and ``limits``) and
    ``self.max_reply_bytes`` (``collector.store.paging``)."""

    def _pushed(self, rollout_id: int) -> pb.Rollout:
        reached = self.agents.rollouts.push_rollout(rollout_id)
        made = rollout.get(self.store.read(), rollout_id)
        log.info("rollout %d: %s %s version %d by %s, sent to %d agent stream(s)", made.id, made.kind,
                 made.model_name, made.version, made.actor, reached)
        return made

    @grpc_errors
    def Rollback(self, request: pb.RollbackRequest, context: grpc.ServicerContext) -> pb.Rollout:
        validate_model_key(request.model_name, "-", self.agents.limits)
        reason = approvals.check_reason(request.reason, "a rollback")
        actor = _actor()
        rollout_id = self.store.write(lambda db: rollout.rollback(db, request.model_name, request.to_version, actor,
                                                                  reason, time.time_ns()))
        return self._pushed(rollout_id)

    @grpc_errors
    def ListRollouts(self, request: pb.ListRolloutsRequest,
                     context: grpc.ServicerContext) -> pb.ListRolloutsResponse:
        if request.limit > rollout.MAX_LIST_LIMIT:
            raise InvalidArgument(f"limit {request.limit} is over the maximum of {rollout.MAX_LIST_LIMIT}")
        if request.model_name:
            validate_model_key(request.model_name, "-", self.agents.limits)
        (before,) = paging.cursor("rollouts", request.page_token, (int,)) or (0,)
        limit = request.limit or rollout.DEFAULT_LIST_LIMIT
        rows = rollout.listing_rows(self.store.read(), request.model_name, before_id=before, limit=limit)
        page = paging.take(rows, "rollouts", max_bytes=self.max_reply_bytes, limit=limit)
        return pb.ListRolloutsResponse(rollouts=page.items, next_page_token=page.next_token)

    @grpc_errors
    def ShowRollout(self, request: pb.ShowRolloutRequest, context: grpc.ServicerContext) -> pb.Rollout:
        return rollout.get(self.store.read(), request.id)

    @grpc_errors
    def SetShadow(self, request: pb.SetShadowRequest, context: grpc.ServicerContext) -> pb.Rollout:
        validate_model_key(request.model_name, "-", self.agents.limits)
        share = rollout.check_share(request.share)
        reason = approvals.check_reason(request.reason, "a shadow")
        actor = _actor()
        rollout_id = self.store.write(lambda db: rollout.set_shadow(db, request.model_name, request.version, share,
                                                                    actor, reason, time.time_ns()))
        return self._pushed(rollout_id)

    @grpc_errors
    def ClearShadow(self, request: pb.SetShadowRequest, context: grpc.ServicerContext) -> pb.Rollout:
        validate_model_key(request.model_name, "-", self.agents.limits)
        reason = approvals.check_reason(request.reason, "clearing a shadow")
        actor = _actor()
        rollout_id = self.store.write(lambda db: rollout.clear_shadow(db, request.model_name, actor, reason,
                                                                      time.time_ns()))
        return self._pushed(rollout_id)

    def after_decision(self, decided: pb.Approval) -> None:
        """GovernanceOps' post-commit hook: an approval (a promotion or a rollback) started rollouts in
        its transaction (``approvals.decide``: serve, and an unshadow if the promoted version was in
        shadow), all at its ``decided_unix_nano``; they reach the agents now, after the commit."""
        if decided.state == "approved":
            self.agents.rollouts.push_started(decided.model_name, decided.decided_unix_nano)
